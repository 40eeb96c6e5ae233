"""Mask checks and the per-sample masked mean that every loss of the library reduces with.

Mask semantics, shared by every loss:
- a mask is 1 (or True, or a non-zero number) where an element is counted and 0 where it is padding / not
covered;
- masked elements contribute nothing to the value, whatever they hold (selected with ``torch.where``), and get
a zero
  gradient; kv_error's inputs and logit_kd's logits may even hold NaN or inf there;
- a sample with nothing counted gets 0 (no NaN) and a zero gradient.
"""

from __future__ import annotations

import torch

from kvdistill.errors import KvdistillError


def shape_of(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def check_dims(x: torch.Tensor, ndim: int, name: str, layout: str, *, at_least: bool = False) -> None:
    if x.dim() < ndim if at_least else x.dim() != ndim:
        raise KvdistillError(
            f"{name} {shape_of(x)} must have {'at least ' if at_least else ''}{ndim} dims {layout}",
            f"pass {name} laid out as {layout}",
        )


def check_same(a: torch.Tensor, b: torch.Tensor, a_name: str, b_name: str, fix: str) -> None:
    if a.shape != b.shape:
        raise KvdistillError(f"{a_name} {shape_of(a)} and {b_name} {shape_of(b)} differ", fix)


def check_mask(mask: torch.Tensor, shape: tuple[int, ...], what: str) -> torch.Tensor:
    """`mask` as bool, broadcast to `shape`; raises naming both shapes when it does not broadcast."""
    try:
        return torch.broadcast_to(mask != 0, shape)
    except RuntimeError:
        raise KvdistillError(
            f"mask {shape_of(mask)} does not match {what} {shape}",
            f"pass a mask broadcastable to {shape}, 1 = counted",
        ) from None


def sample_mean(
    err: torch.Tensor, counted: torch.Tensor, dims: int, weight: torch.Tensor | None = None, scale: int = 1
) -> torch.Tensor:
    """Mean of err over its last `dims` dims, counting only where `counted` (bool, err's shape) is True.

    err (..., B, *R) with len(R) == dims -> (..., B). `weight` (broadcastable to err) multiplies the counted
    values in the numerator only (fusion weights per row); `scale` multiplies the count (features reduced
    before).
    """
    zero = torch.zeros((), dtype=err.dtype, device=err.device)
    kept = torch.where(counted, err, zero)  # before the weight: NaN at uncounted places reaches no gradient
    kept = kept if weight is None else kept * weight
    reduce = tuple(range(-dims, 0))
    count = counted.sum(reduce).clamp(min=1).to(err.dtype) * scale
    return kept.sum(reduce) / count
