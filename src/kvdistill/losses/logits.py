"""Logit distillation with one tokenizer, per sample: the full distributions (`logit_kd`), or a teacher known
by its top-k entries and one tail bucket (`topk_logit_kd`, from `topk_log_probs`).

Notation: B batch, T time, V vocabulary, k top-k entries. Divergences, reduction and chunking:
`kvdistill.losses.divergence`.
"""

from __future__ import annotations

import math

import torch

from kvdistill.errors import KvdistillError
from kvdistill.losses.divergence import (
    by_chunks,
    check_kd,
    check_logits,
    row_divergence,
    soft_log_probs,
    with_tail,
)
from kvdistill.losses.reduce import check_dims, check_same, sample_mean, shape_of

_NEG_INF = -math.inf


def logit_kd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 2.0,
    divergence: str = "forward",
    beta: float = 0.5,
    chunk: int = 0,
) -> torch.Tensor:
    """Per-sample logit distillation (B,): a divergence between p_t = softmax(teacher/τ) and p_s =
    softmax(student/τ) at each counted position, times τ², averaged over the sample's counted positions.

    student_logits, teacher_logits: (B, T, V) at the same positions (no shift), the same vocabulary.
    mask: (B, T), 1 = counted. divergence:
      "forward"  KL(p_t || p_s) = Σ p_t (log p_t - log p_s)   (mean-seeking; the classic KD term)
      "reverse"  KL(p_s || p_t)                               (mode-seeking)
      "jsd"      β·KL(p_t || m) + (1-β)·KL(p_s || m), m = β·p_t + (1-β)·p_s, 0 < β < 1 (β = 0.5: the
                 Jensen-Shannon divergence; bounded by ln 2 per position before the τ² factor)
    τ²: the gradient of a softened divergence shrinks as 1/τ²; the factor keeps its size comparable across τ.
    chunk: positions per chunk (0: one pass; memory: `kvdistill.losses.divergence`).
    A vocabulary entry that both distributions give probability 0 (both logits -inf: masked vocabularies,
    padded embeddings) contributes 0, so the value and its gradient stay finite there. Gradients flow into
    both inputs; detach the teacher.
    """
    check_dims(teacher_logits, 3, "teacher_logits", "(B, T, V)")
    counted = check_logits(student_logits, mask)
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise KvdistillError(
            f"logit KD needs the same vocabulary; student_logits {shape_of(student_logits)} has "
            f"{student_logits.shape[-1]} and teacher_logits {shape_of(teacher_logits)} has "
            f"{teacher_logits.shape[-1]} entries",
            "use cross_logit_kd with the vocabulary projection of kvdistill.align.vocab for another "
            "tokenizer",
        )
    check_same(
        student_logits,
        teacher_logits,
        "student_logits",
        "teacher_logits",
        "logit KD needs both models run on the same tokens",
    )
    check_kd(temperature, divergence, beta, chunk)
    B, T, V = student_logits.shape

    def rows(s, t, c):  # (n, V), (n, V), (n,) -> (n,)
        return row_divergence(
            soft_log_probs(t, c, temperature), soft_log_probs(s, c, temperature), divergence, beta
        )

    div = by_chunks(
        rows,
        chunk,
        student_logits.reshape(B * T, V),
        teacher_logits.reshape(B * T, V),
        counted.reshape(B * T),
    )
    return sample_mean(div.view(B, T) * temperature**2, counted, 1)


def topk_log_probs(
    teacher_logits: torch.Tensor, k: int, *, temperature: float = 1.0, chunk: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most probable entries of softmax(teacher/τ) at each position: ids (B, T, k) long and their
    log-probabilities (B, T, k) float32 (exact: normalised over the whole vocabulary), most probable first;
    under no_grad, `chunk` positions at a time. teacher_logits (B, T, V), 0 < k < V."""
    check_dims(teacher_logits, 3, "teacher_logits", "(B, T, V)")
    B, T, V = teacher_logits.shape
    if not 0 < k < V:
        raise KvdistillError(
            f"top-k k ({k}) must lie in [1, {V - 1}] for a vocabulary of {V} entries",
            "lower top_k, or use the full distribution (logit_kd) for a vocabulary this small",
        )
    if not temperature > 0:
        raise KvdistillError(f"temperature ({temperature}) must be > 0", "use e.g. temperature=2.0")
    flat = teacher_logits.detach().reshape(B * T, V)
    ids, lps = [], []
    with torch.no_grad():
        for part in flat.split(chunk if chunk > 0 else max(B * T, 1)):
            lp, idx = torch.log_softmax(part.float() / temperature, dim=-1).topk(k, dim=-1)  # (n, k)
            ids.append(idx)
            lps.append(lp)
    return torch.cat(ids).view(B, T, k), torch.cat(lps).view(B, T, k)


def check_topk(teacher_ids: torch.Tensor, teacher_log_probs: torch.Tensor, V: int, T: int | None, what: str):
    """A teacher's top-k (ids, log-probabilities) (B, T, k) of a vocabulary of V entries, at T positions
    (`what`: the tensor they must match) unless T is None."""
    check_dims(teacher_ids, 3, "teacher_ids", "(B, T, k)")
    check_same(
        teacher_ids,
        teacher_log_probs,
        "teacher_ids",
        "teacher_log_probs",
        "pass the ids and log-probabilities of one top-k (topk_log_probs)",
    )
    if T is not None and teacher_ids.shape[1] != T:
        raise KvdistillError(
            f"teacher_ids {shape_of(teacher_ids)} do not match {what}",
            "pass the teacher's top-k at the student's positions",
        )
    if teacher_ids.numel() and (int(teacher_ids.min()) < 0 or int(teacher_ids.max()) >= V):
        raise KvdistillError(
            f"teacher_ids hold ids outside [0, {V}) (min {int(teacher_ids.min())}, max "
            f"{int(teacher_ids.max())})",
            "pass token ids of the teacher's own vocabulary",
        )


def topk_logit_kd(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 2.0,
    divergence: str = "forward",
    beta: float = 0.5,
    chunk: int = 0,
) -> torch.Tensor:
    """`logit_kd` against a teacher known by its top-k entries (B,): both distributions on k + 1 events, the
    teacher's k entries and one tail bucket holding the rest of the mass.

    student_logits (B, T, V); teacher_ids (B, T, k) distinct ids of the same vocabulary, teacher_log_probs (B,
    T, k) the teacher's log-probabilities of them at this temperature (`topk_log_probs(teacher_logits, k,
    temperature=τ)`); mask (B, T). Per counted position, with P_t = Σ_i p_t(id_i) and P_s = Σ_i p_s(id_i):

        teacher (p_t(id_1), ..., p_t(id_k), max(1 - P_t, TAIL_FLOOR)),
        student (p_s(id_1), ..., p_s(id_k), 1 - P_s)

    (the student's tail in log space from its own logits, not by subtraction), then divergence · τ² as
    `logit_kd`. With the teacher's whole vocabulary but one entry it is `logit_kd` exactly. Gradients flow
    into the student only.
    """
    counted = check_logits(student_logits, mask)
    B, T, V = student_logits.shape
    check_topk(teacher_ids, teacher_log_probs, V, T, f"student_logits {shape_of(student_logits)}")
    check_kd(temperature, divergence, beta, chunk)
    k = teacher_ids.shape[-1]

    def rows(s, ids, lp, c):  # (n, V), (n, k), (n, k), (n,) -> (n,)
        lp = torch.where(
            c[:, None], lp.float(), _NEG_INF
        )  # rows not counted: no teacher mass, a zero divergence
        log_t, log_s = with_tail(
            soft_log_probs(s, c, temperature), ids, lp, torch.ones_like(ids, dtype=torch.bool)
        )
        return row_divergence(log_t, log_s, divergence, beta)

    div = by_chunks(
        rows,
        chunk,
        student_logits.reshape(B * T, V),
        teacher_ids.reshape(B * T, k),
        teacher_log_probs.detach().reshape(B * T, k),
        counted.reshape(B * T),
    )
    return sample_mean(div.view(B, T) * temperature**2, counted, 1)
