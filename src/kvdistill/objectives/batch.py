"""The student side of one batch, and the token alignment of a teacher's (kept) tokens onto it.

Notation: B batch, T_s student tokens, M kept teacher tokens of a layer (T_t uncompressed), H_t teacher KV heads,
K nonzeros per alignment row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvdistill.align.tokens import batch_token_alignment, batch_token_alignment_sparse
from kvdistill.models.capture import tokenize


@dataclass
class StudentBatch:
    """Token ids, mask (B, T_s) and spans (B, T_s, 2) on the device, and CPU copies of spans and mask (the token
    alignment is built on the CPU)."""

    records: list[dict]
    ids: torch.Tensor
    mask: torch.Tensor
    spans: torch.Tensor
    spans_cpu: torch.Tensor
    mask_cpu: torch.Tensor


def student_batch(tokenizer, records: list[dict], *, max_length: int | None, max_positions: int | None,
                  device) -> StudentBatch:
    """Tokenize `records` for the student (right padding, the model's position limit)."""
    enc = tokenize(tokenizer, [r["text"] for r in records], max_length=max_length, padding_side="right",
                   max_positions=max_positions)
    spans, mask = enc["offset_mapping"], enc["attention_mask"]
    return StudentBatch(records, enc["input_ids"].to(device), mask.to(device), spans.to(device), spans, mask)


def teacher_alignment(spans_t: torch.Tensor, mask_t: torch.Tensor, spans_s: torch.Tensor,
                      mask_s: torch.Tensor) -> torch.Tensor:
    """Dense alignment, rows = teacher tokens normalised over the student tokens they overlap.

    spans_t (B, M, 2) / mask_t (B, M) -> (B, M, T_s); per head (B, H, M, 2) / (B, H, M) -> (B, H, M, T_s).
    """
    if spans_t.dim() == 3:
        return batch_token_alignment(spans_t, mask_t, spans_s, mask_s)
    B, H, M, _ = spans_t.shape
    flat = batch_token_alignment(spans_t.reshape(B * H, M, 2), mask_t.reshape(B * H, M),
                                 spans_s.repeat_interleave(H, 0), mask_s.repeat_interleave(H, 0))
    return flat.view(B, H, M, spans_s.shape[1])


def teacher_alignment_sparse(spans_t: torch.Tensor, mask_t: torch.Tensor, spans_s: torch.Tensor,
                             mask_s: torch.Tensor, *, device) -> tuple[torch.Tensor, torch.Tensor]:
    """`teacher_alignment` as index, weight (B, H|1, M, K) for `resample_rows`, built on the CPU (the spans are
    small and the sweep is many tiny ops) and moved to `device` once; pass CPU spans and masks."""
    spans_t, mask_t, spans_s, mask_s = spans_t.cpu(), mask_t.cpu(), spans_s.cpu(), mask_s.cpu()
    if spans_t.dim() == 3:
        index, weight = batch_token_alignment_sparse(spans_t, mask_t, spans_s, mask_s)  # (B, M, K)
        return index[:, None].to(device, non_blocking=True), weight[:, None].to(device, non_blocking=True)
    B, H, M, _ = spans_t.shape
    index, weight = batch_token_alignment_sparse(spans_t.reshape(B * H, M, 2), mask_t.reshape(B * H, M),
                                                 spans_s.repeat_interleave(H, 0), mask_s.repeat_interleave(H, 0))
    K = index.shape[-1]
    return (index.view(B, H, M, K).to(device, non_blocking=True),
            weight.view(B, H, M, K).to(device, non_blocking=True))
