"""Hidden-state distillation, per sample. Notation: B batch, N tokens, F hidden width (F_s, F_t)."""

from __future__ import annotations

import torch

from kvdistill.errors import KvdistillError
from kvdistill.losses.kv import kv_error
from kvdistill.losses.reduce import check_dims, shape_of


def hidden_error(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    *,
    normalize: bool = True,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample MSE between hidden states -> (B,): the student's (projected) pred (B, N, F_t) and the
    teacher's target (B, N, F_t) on the same N tokens; mask (B, N), 1 = counted.

    The student's width is mapped to the teacher's by the caller (a learned nn.Linear F_s -> F_t in the
    objective). normalize: divide by the variance of the sample's counted target values, as `kv_error` does.
    """
    check_dims(pred, 3, "pred", "(B, N, F_t)")
    check_dims(target, 3, "target", "(B, N, F_t)")
    if pred.shape != target.shape:
        raise KvdistillError(
            f"hidden states differ: pred {shape_of(pred)} and target {shape_of(target)}",
            f"project the student's width to the teacher's ({target.shape[-1]}) on the same tokens",
        )
    return kv_error(pred, target, mask, kind="mse", normalize=normalize, weight=weight)
