"""Target-space fusion: one target per sample as the weighted sum of the teachers' targets.

Notation: B batch, H heads, T time, D head dim, N teachers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvdistill.errors import KvdistillError

__all__ = ["fuse_targets"]


def fuse_targets(targets: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Target-space fusion: Σ_n w_n · targets[n].

    targets: N tensors (B, H, T, D), already in one geometry. weights: (B, N) per sample or (B, T, N) per
    token. Returns (B, H, T, D).
    """
    if not targets:
        raise KvdistillError("no targets to fuse", "pass one (B, H, T, D) tensor per teacher")
    shape = tuple(targets[0].shape)
    for n, t in enumerate(targets):
        if tuple(t.shape) != shape or t.dim() != 4:
            raise KvdistillError(
                f"targets[{n}] {tuple(t.shape)} and targets[0] {shape} differ (want (B, H, T, D))",
                "map every teacher into the student's geometry before fusing",
            )
    B, _, T, _ = shape
    N = len(targets)
    if tuple(weights.shape) not in ((B, N), (B, T, N)):
        raise KvdistillError(
            f"weights {tuple(weights.shape)} do not fit {N} targets of shape {shape}",
            f"pass weights as ({B}, {N}) or ({B}, {T}, {N})",
        )
    w = (
        weights[:, None, None, None, :] if weights.dim() == 2 else weights[:, None, :, None, :]
    )  # (B, 1, T|1, 1, N)
    fused = targets[0] * w[..., 0].to(targets[0].dtype)
    for n in range(1, N):  # accumulate: no (B, H, T, D, N) stack
        fused = fused + targets[n] * w[..., n].to(targets[n].dtype)
    return fused  # (B, H, T, D)
