"""Logit distillation across tokenizers by the likelihood of exactly aligned text (`span_logit_kd`), per
sample.

Notation: B batch, T_s/T_t student/teacher time, V vocabulary, C chunks of text both tokenizations spell.
Divergences, reduction and chunking: `kvdistill.losses.divergence`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvdistill.errors import KvdistillError
from kvdistill.losses.divergence import by_chunks, check_kd, check_logits, row_divergence, soft_log_probs
from kvdistill.losses.reduce import check_dims, sample_mean, shape_of


def _realised_log_probs(
    logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, temperature: float, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(logits[:, i-1] / τ)[ids[:, i]] of every token i: (lp (B, T), scored (B, T) bool where token
    i and its predecessor are real). The last position's logits are not read."""
    B, T, V = logits.shape
    real = mask != 0  # (B, T)
    prev = F.pad(real[:, :-1], (1, 0), value=False)  # (B, T) token i-1 is real
    scored = real & prev
    following = torch.where(scored, ids, 0).roll(-1, dims=1)  # (B, T) row i-1 reads the id of token i
    rows_used = scored.roll(-1, dims=1)  # (B, T) position i-1 predicts a scored token

    def rows(z, target, c):  # (n, V), (n,), (n,) -> (n,)
        return soft_log_probs(z, c, temperature).gather(-1, target[:, None])[:, 0]

    lp = by_chunks(rows, chunk, logits.reshape(B * T, V), following.reshape(B * T), rows_used.reshape(B * T))
    return lp.view(B, T).roll(1, dims=1), scored  # (B, T): token i's log-prob at column i


def _chunk_sums(
    lp: torch.Tensor, scored: torch.Tensor, chunks: torch.Tensor, C: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ of the token log-probs per chunk (B, C) and whether every token of the chunk was scored (B, C)
    bool."""
    B = lp.shape[0]
    slot = torch.where(chunks >= 0, chunks, C)  # (B, T): chunk, or the discarded slot C
    total = lp.new_zeros(B, C + 1).scatter_add(1, slot, torch.where(scored, lp, 0.0))[:, :C]  # (B, C)
    members = torch.zeros(B, C + 1, dtype=torch.long, device=lp.device).scatter_add(
        1, slot, torch.ones_like(slot)
    )
    missing = torch.zeros_like(members).scatter_add(1, slot, (~scored).long())  # (B, C + 1)
    return total, ((members > 0) & (missing == 0))[:, :C]


def span_logit_kd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_ids: torch.Tensor,
    teacher_ids: torch.Tensor,
    student_mask: torch.Tensor,
    teacher_mask: torch.Tensor,
    student_chunks: torch.Tensor,
    teacher_chunks: torch.Tensor,
    *,
    temperature: float = 2.0,
    divergence: str = "forward",
    beta: float = 0.5,
    chunk: int = 0,
) -> torch.Tensor:
    """Logit distillation across tokenizers by the likelihood of exactly aligned text (B,): for every chunk of
    text that a run of student tokens and a run of teacher tokens both spell exactly, the probability each
    model gives to that text after the same prefix, by the chain rule

        log P(chunk) = Σ_{tokens i of the chunk} log softmax(logits[i - 1] / τ)[id_i],

    compared as two-outcome distributions (P, 1 - P) (the text continues with this chunk, or not) with the
    divergence of `logit_kd`, times τ², averaged over the sample's chunks. Both sides are probabilities of the
    same event whatever the tokenizers; what is lost is the rest of the distribution (how the mass that misses
    the chunk is spread).

    student_logits (B, T_s, V_s), teacher_logits (B, T_t, V_t); student_ids, student_mask (B, T_s) and
    teacher_ids, teacher_mask (B, T_t) the two tokenizations; student_chunks (B, T_s), teacher_chunks (B, T_t)
    the chunk of every token or -1 (`kvdistill.align.tokens.common_chunks`). A chunk counts where each of its
    tokens on both sides has a real predecessor (a sample's first token has no logits predicting it). chunk:
    positions per chunk of the log-softmax (memory, as `logit_kd`). Gradients flow into the student only.
    """
    check_logits(student_logits, student_mask)
    check_dims(teacher_logits, 3, "teacher_logits", "(B, T_t, V_t)")
    B, T_s, _ = student_logits.shape
    T_t = teacher_logits.shape[1]
    for name, x, shape in (
        ("student_ids", student_ids, (B, T_s)),
        ("student_chunks", student_chunks, (B, T_s)),
        ("teacher_ids", teacher_ids, (B, T_t)),
        ("teacher_mask", teacher_mask, (B, T_t)),
        ("teacher_chunks", teacher_chunks, (B, T_t)),
    ):
        if shape_of(x) != shape:
            raise KvdistillError(
                f"{name} {shape_of(x)} does not match the logits' (B, T) {shape}",
                "pass the ids, mask and chunks of the tokenization the logits were computed on",
            )
    check_kd(temperature, divergence, beta, chunk)
    C = int(max(student_chunks.max(), teacher_chunks.max(), -1)) + 1 if student_chunks.numel() else 0
    device = student_logits.device  # chunks may come from the CPU (counted there: no device synchronisation)
    student_chunks = student_chunks.to(device, non_blocking=True)
    teacher_chunks = teacher_chunks.to(teacher_logits.device, non_blocking=True)
    lp_s, scored_s = _realised_log_probs(student_logits, student_ids, student_mask, temperature, chunk)
    with torch.no_grad():
        lp_t, scored_t = _realised_log_probs(
            teacher_logits.detach(), teacher_ids, teacher_mask, temperature, chunk
        )
    S_s, ok_s = _chunk_sums(lp_s, scored_s, student_chunks, C)  # (B, C)
    S_t, ok_t = _chunk_sums(lp_t, scored_t, teacher_chunks, C)
    counted = ok_s & ok_t  # (B, C)

    def two_outcomes(S):  # (B, C) log P -> (B, C, 2) log (P, 1 - P); 1 - P floored where P rounds to 1
        S = torch.where(counted, S, -1.0).clamp(max=0.0)
        return torch.stack([S, torch.log(-torch.expm1(S.clamp(max=-1e-12)))], -1)

    div = row_divergence(two_outcomes(S_t), two_outcomes(S_s), divergence, beta)  # (B, C)
    return sample_mean(div * temperature**2, counted, 1)
