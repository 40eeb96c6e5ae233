"""Next-token cross-entropy and logit distillation, per sample.

Notation: B batch, T time, V vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kvdistill.errors import KvdistillError
from kvdistill.losses.reduce import check_dims, check_mask, check_same, sample_mean, shape_of

DIVERGENCES = ("forward", "reverse", "jsd")


def token_nll(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token negative log-likelihood at every position: (nll (B, T), counted (B, T) bool).

    logits: (B, T, V) at positions 0..T-1; labels: (B, T) token ids (usually input_ids); mask: (B, T), 1 = real.
    logits[:, t] predicts labels[:, t + 1], counted where mask[:, t] and mask[:, t + 1] are both 1; the last
    position is never counted. The shift rolls the labels, so the (B, T, V) logits are not sliced (no (B, T, V)
    copy forward, none zero-filled in backward). Labels at uncounted positions are ignored (may be -100).
    """
    check_dims(logits, 3, "logits", "(B, T, V)")
    B, T, V = logits.shape
    if shape_of(labels) != (B, T):
        raise KvdistillError(f"labels {shape_of(labels)} do not match logits {shape_of(logits)}",
                             f"pass labels as ({B}, {T}) token ids of the same batch")
    real = check_mask(mask, (B, T), "logits' (B, T)")
    counted = real & real.roll(-1, dims=1)  # (B, T) a real token predicting a real token
    counted[:, -1] = False
    following = torch.where(counted, labels.roll(-1, dims=1), torch.zeros_like(labels))  # (B, T)
    bad = (following < 0) | (following >= V)
    if bool(bad.any()):
        raise KvdistillError(f"label id {int(following[bad][0])} is outside the vocabulary of {V} logits",
                             "labels must be token ids of the model's own tokenizer")
    nll = F.cross_entropy(logits.reshape(B * T, V).float(), following.reshape(B * T), reduction="none")
    return nll.view(B, T), counted


def ce_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample next-token cross-entropy (B,): the mean of `token_nll` over the sample's counted predictions.

    Perplexity over a corpus is exp of the token-level mean of `token_nll` instead (long samples weigh more).
    """
    nll, counted = token_nll(logits, labels, mask)
    return sample_mean(nll, counted, 1)


def _kl_terms(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Σ_v p_v (log p_v - log q_v) over the last dim, with 0 where p_v = 0 (also where both are -inf)."""
    has_mass = log_p > -math.inf
    gap = torch.where(has_mass, log_p - log_q, torch.zeros((), device=log_p.device))  # no -inf - -inf = NaN
    return (log_p.exp() * gap).sum(-1)


def logit_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, *,
             temperature: float = 2.0, divergence: str = "forward", beta: float = 0.5) -> torch.Tensor:
    """Per-sample logit distillation (B,): a divergence between p_t = softmax(teacher/τ) and p_s = softmax(student/τ)
    at each counted position, times τ², averaged over the sample's counted positions.

    student_logits, teacher_logits: (B, T, V) at the same positions (no shift), the same vocabulary.
    mask: (B, T), 1 = counted. divergence:
      "forward"  KL(p_t || p_s) = Σ p_t (log p_t - log p_s)   (mean-seeking; the classic KD term)
      "reverse"  KL(p_s || p_t)                               (mode-seeking)
      "jsd"      β·KL(p_t || m) + (1-β)·KL(p_s || m), m = β·p_t + (1-β)·p_s, 0 < β < 1 (β = 0.5: the
                 Jensen-Shannon divergence; bounded by ln 2 per position before the τ² factor)
    τ²: the gradient of a softened divergence shrinks as 1/τ²; the factor keeps its size comparable across τ.
    A vocabulary entry that both distributions give probability 0 (both logits -inf: masked vocabularies, padded
    embeddings) contributes 0, so the value and its gradient stay finite there. Gradients flow into both inputs;
    detach the teacher.
    """
    check_dims(student_logits, 3, "student_logits", "(B, T, V)")
    check_dims(teacher_logits, 3, "teacher_logits", "(B, T, V)")
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise KvdistillError(
            f"logit KD needs the same vocabulary; student_logits {shape_of(student_logits)} has "
            f"{student_logits.shape[-1]} and teacher_logits {shape_of(teacher_logits)} has "
            f"{teacher_logits.shape[-1]} entries",
            "set losses.logit_kd.weight: 0 for teachers with another tokenizer (KV losses align by characters)")
    check_same(student_logits, teacher_logits, "student_logits", "teacher_logits",
               "logit KD needs both models run on the same tokens")
    if not temperature > 0:
        raise KvdistillError(f"temperature ({temperature}) must be > 0", "use e.g. temperature=2.0")
    if divergence not in DIVERGENCES:
        raise KvdistillError(f"logit KD divergence '{divergence}' is unknown", f"use one of {', '.join(DIVERGENCES)}")
    if divergence == "jsd" and not 0 < beta < 1:
        raise KvdistillError(f"jsd beta ({beta}) must lie strictly between 0 and 1",
                             "use e.g. beta=0.5 (forward or reverse KL are the limits)")
    B, T, _ = student_logits.shape
    counted = check_mask(mask, (B, T), "the logits' (B, T)")
    rows = ~counted[..., None]  # (B, T, 1) positions whose logits are not read (NaN there reaches no gradient)
    log_s = torch.log_softmax((student_logits.float() / temperature).masked_fill(rows, 0.0), dim=-1)  # (B, T, V)
    log_t = torch.log_softmax((teacher_logits.float() / temperature).masked_fill(rows, 0.0), dim=-1)
    if divergence == "forward":
        div = _kl_terms(log_t, log_s)  # (B, T)
    elif divergence == "reverse":
        div = _kl_terms(log_s, log_t)
    else:
        # log m = log(β·p_t + (1-β)·p_s); entries impossible on both sides stay -inf without a NaN gradient
        both = (log_t == -math.inf) & (log_s == -math.inf)  # (B, T, V)
        zero = torch.zeros((), device=log_t.device)
        a = torch.where(both, zero, log_t + math.log(beta))
        b = torch.where(both, zero, log_s + math.log(1 - beta))
        log_m = torch.where(both, torch.full((), -math.inf, device=a.device), torch.logaddexp(a, b))
        div = beta * _kl_terms(log_t, log_m) + (1 - beta) * _kl_terms(log_s, log_m)
    return sample_mean(div * temperature**2, counted, 1)
