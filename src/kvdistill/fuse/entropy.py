"""Entropy regulariser on routing weights over N teachers.

Both targets return a value to ADD to the loss (minimised):
- "diverse":     -H(w̄), w̄ = mean routing distribution over the batch (and tokens). Minimising it raises the
                 entropy of the average, so all teachers get used overall (load balancing); individual
                 samples may still specialise. Range [-log N, 0].
- "specialized": mean_b H(w_b), the mean per-sample (per-token) entropy. Minimising it makes each sample pick
                 few teachers (confident routing). Range [0, log N].
Entropies are in nats.
"""

from __future__ import annotations

import torch

from kvdistill.errors import KvdistillError

__all__ = ["entropy_regularizer", "entropy"]


def entropy(weights: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Entropy in nats of distributions over the last axis: (..., N) -> (...)."""
    w = weights.float()
    return -(w * torch.log(w.clamp(min=eps))).sum(-1)


def entropy_regularizer(
    weights: torch.Tensor, target: str = "diverse", mask: torch.Tensor | None = None, eps: float = 1e-12
) -> torch.Tensor:
    """Entropy term on routing weights (..., N) (rows sum to 1) -> 0-dim tensor to add to the loss.

    target: "diverse" returns -H(mean w), "specialized" returns mean H(w) (see the module docstring).
    mask: optional, shaped like weights[..., 0] (e.g. (B, T) for per-token weights), 1 = counted; only
    counted rows enter the mean. With nothing counted the result is 0.
    """
    if weights.dim() < 1 or weights.shape[-1] < 1:
        raise KvdistillError(
            f"weights {tuple(weights.shape)} must end in a teacher axis (..., N)",
            "pass the router's output, e.g. (B, N) or (B, T, N)",
        )
    if target not in ("diverse", "specialized"):
        raise KvdistillError(f"entropy target '{target}' is unknown", "use 'diverse' or 'specialized'")
    rows = weights.reshape(-1, weights.shape[-1]).float()  # (R, N)
    if mask is None:
        counted = torch.ones(rows.shape[0], dtype=torch.bool, device=rows.device)
    elif tuple(mask.shape) != tuple(weights.shape[:-1]):
        raise KvdistillError(
            f"mask {tuple(mask.shape)} does not match weights {tuple(weights.shape)}",
            f"pass a mask of shape {tuple(weights.shape[:-1])}",
        )
    else:
        counted = (mask != 0).reshape(-1)
    n = counted.sum().clamp(min=1).float()
    zero = torch.zeros((), device=rows.device)
    if target == "diverse":
        mean_w = torch.where(counted[:, None], rows, zero).sum(0) / n  # (N,)
        if not bool(counted.any()):
            return zero
        return -entropy(mean_w, eps)
    return torch.where(counted, entropy(rows, eps), zero).sum() / n
