"""Prototypes: K feature vectors that summarise the counted tokens of each sample.

Notation: B batch, T time, F feature width, K prototypes per sample.

Kinds: "mean" (masked mean), "first" (first counted token: the CLS/BOS slot, also under left padding) and
"max" (elementwise max) give K = 1; "kmeans" gives the K = k centres of k-means over each sample's
counted tokens. Padded (uncounted) tokens never change a prototype, whatever they hold.
"""

from __future__ import annotations

import torch

from kvdistill.errors import KvdistillError

__all__ = ["PROTOTYPE_KINDS", "kmeans", "prototype"]

PROTOTYPE_KINDS = ("mean", "first", "max", "kmeans")


def prototype(x: torch.Tensor, mask: torch.Tensor, kind: str = "mean", k: int = 4) -> torch.Tensor:
    """Prototypes of features x (B, T, F) over the counted tokens (mask (B, T), 1 = counted) -> (B, K, F).

    kind "mean" | "first" | "max" give K = 1; "kmeans" gives K = k centres (see `kmeans`). A sample with
    no counted token gets zeros. The result has x's dtype.
    """
    _check_features(x, mask)
    if kind == "kmeans":
        return kmeans(x, mask, k)
    counted = mask != 0  # (B, T)
    any_counted = counted.any(1, keepdim=True)  # (B, 1)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    if kind == "mean":
        total = torch.where(counted[..., None], x, zero).sum(1)  # (B, F)
        pooled = total / counted.sum(1, keepdim=True).clamp(min=1).to(x.dtype)
    elif kind == "first":
        first = counted.int().argmax(1)  # (B,) index of the first counted token (0 if none)
        picked = x[torch.arange(x.shape[0], device=x.device), first]  # (B, F)
        pooled = torch.where(any_counted, picked, zero)
    elif kind == "max":
        lowest = torch.full((), torch.finfo(x.dtype).min, dtype=x.dtype, device=x.device)
        pooled = torch.where(any_counted, torch.where(counted[..., None], x, lowest).amax(1), zero)
    else:
        raise KvdistillError(
            f"prototype kind '{kind}' is unknown", f"use one of {', '.join(PROTOTYPE_KINDS)}"
        )
    return pooled[:, None]  # (B, 1, F)


def kmeans(x: torch.Tensor, mask: torch.Tensor, k: int, iters: int = 10) -> torch.Tensor:
    """k-means centres of each sample's counted tokens: x (B, T, F), mask (B, T) -> (B, k, F), x's dtype.

    Batched over samples on x's device, no host synchronisation. Deterministic farthest-point
    initialisation: the first counted token, then repeatedly the counted token farthest from the centres so
    far (ties: the earliest token). Then `iters` Lloyd steps (assign each counted token to its nearest
    centre, ties to the lower index; move each centre to the mean of its tokens; a centre without tokens
    stays). A sample with fewer than k distinct counted tokens repeats centres; one with none gets zeros.
    Gradients flow through the last mean step (the assignments are constants).
    """
    _check_features(x, mask)
    if not (isinstance(k, int) and k >= 1):
        raise KvdistillError(
            f"k-means k ({k!r}) must be an integer >= 1", "set fusion.similarity.kmeans_k >= 1"
        )
    if not (isinstance(iters, int) and iters >= 1):
        raise KvdistillError(f"k-means iters ({iters!r}) must be an integer >= 1", "use e.g. iters=10")
    counted = mask != 0  # (B, T)
    points = torch.where(counted[..., None], x.float(), 0.0)  # (B, T, F): padding holds zeros, never NaN/inf
    fixed = points.detach()
    centres = _farthest_points(fixed, counted, k)  # (B, k, F)
    for i in range(iters):
        centres = _lloyd_step(points if i == iters - 1 else fixed, counted, centres)
    centres = torch.where(counted.any(1)[:, None, None], centres, 0.0)
    return centres.to(x.dtype)


def _check_features(x: torch.Tensor, mask: torch.Tensor) -> None:
    if x.dim() != 3:
        raise KvdistillError(
            f"x {tuple(x.shape)} must have 3 dims (B, T, F)",
            "flatten heads into features first, e.g. kv.transpose(1, 2).flatten(2)",
        )
    B, T, _ = x.shape
    if tuple(mask.shape) != (B, T):
        raise KvdistillError(
            f"mask {tuple(mask.shape)} does not match x {tuple(x.shape)}",
            f"pass the ({B}, {T}) mask of the same batch",
        )


def _sq_dist(points: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Squared distances, exact (no |a|² - 2ab + |b|² cancellation): (B, T, F), (B, K, F) -> (B, T, K)."""
    return torch.stack([(points - centres[:, j, None]).square().sum(-1) for j in range(centres.shape[1])], -1)


def _farthest_points(points: torch.Tensor, counted: torch.Tensor, k: int) -> torch.Tensor:
    """Farthest-point initialisation: (B, T, F), (B, T) -> (B, k, F)."""
    rows = torch.arange(points.shape[0], device=points.device)
    idx = counted.int().argmax(1)  # (B,) first counted token
    chosen = [points[rows, idx]]  # k tensors (B, F)
    nearest = _sq_dist(points, chosen[0][:, None])[..., 0]  # (B, T) squared distance to the nearest centre
    for _ in range(1, k):
        idx = torch.where(counted, nearest, -1.0).argmax(1)  # (B,) farthest counted token, earliest on ties
        chosen.append(points[rows, idx])
        nearest = torch.minimum(nearest, _sq_dist(points, chosen[-1][:, None])[..., 0])
    return torch.stack(chosen, 1)  # (B, k, F)


def _lloyd_step(points: torch.Tensor, counted: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """One Lloyd step: (B, T, F), (B, T), (B, K, F) -> new centres (B, K, F)."""
    K = centres.shape[1]
    assign = _sq_dist(points.detach(), centres).argmin(-1)  # (B, T)
    onehot = torch.nn.functional.one_hot(assign, K).to(points.dtype) * counted[..., None]  # (B, T, K)
    counts = onehot.sum(1)  # (B, K)
    sums = onehot.transpose(1, 2) @ points  # (B, K, F)
    return torch.where(counts[..., None] > 0, sums / counts.clamp(min=1)[..., None], centres.detach())
