"""Teacher weights without learned parameters: fixed weights, prototypes, similarity routing, target fusion.

Notation: B batch, T time, F feature width, N teachers, K prototypes per teacher, M points,
H heads, D head dim.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from kvdistill.errors import KvdistillError

__all__ = ["fixed_weights", "prototype", "kmeans_prototypes", "similarity_weights", "fuse_targets"]


def fixed_weights(weights: Sequence[float]) -> torch.Tensor:
    """One weight per teacher, normalised to sum to 1 -> float32 (N,).

    Raises KvdistillError on an empty list, a negative or non-finite weight, or weights that are all 0.
    """
    values = [float(w) for w in weights]
    if not values:
        raise KvdistillError("fixed weights are empty", "give one weight per teacher")
    bad = [w for w in values if not math.isfinite(w) or w < 0]
    if bad:
        raise KvdistillError(f"fixed weights {values} contain negative or non-finite values {bad}",
                             "use weights >= 0, one per teacher")
    total = sum(values)
    if total == 0:
        raise KvdistillError(f"fixed weights {values} are all 0", "give at least one teacher a weight > 0")
    return torch.tensor(values, dtype=torch.float32) / total


# ---------------------------------------------------------------------------------------------- prototypes
def prototype(x: torch.Tensor, mask: torch.Tensor, kind: str = "mean") -> torch.Tensor:
    """Pool a sequence of features x (B, T, F) over its counted tokens (mask (B, T), 1 = counted) -> (B, F).

    kind: "mean" (masked mean), "first" (first counted token, the CLS/BOS slot also under left padding) or
    "max" (elementwise max over counted tokens). A sample with no counted token gets zeros.
    """
    if x.dim() != 3:
        raise KvdistillError(f"x {tuple(x.shape)} must have 3 dims (B, T, F)",
                             "flatten heads into features first, e.g. kv.transpose(1, 2).flatten(2)")
    B, T, _ = x.shape
    if tuple(mask.shape) != (B, T):
        raise KvdistillError(f"mask {tuple(mask.shape)} does not match x {tuple(x.shape)}",
                             f"pass the ({B}, {T}) mask of the same batch")
    counted = mask != 0  # (B, T)
    any_counted = counted.any(1, keepdim=True)  # (B, 1)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    if kind == "mean":
        total = torch.where(counted[..., None], x, zero).sum(1)  # (B, F)
        return total / counted.sum(1, keepdim=True).clamp(min=1).to(x.dtype)
    if kind == "first":
        first = counted.int().argmax(1)  # (B,) index of the first counted token (0 if none)
        picked = x[torch.arange(B, device=x.device), first]  # (B, F)
        return torch.where(any_counted, picked, zero)
    if kind == "max":
        lowest = torch.finfo(x.dtype).min
        picked = torch.where(counted[..., None], x, torch.full((), lowest, dtype=x.dtype, device=x.device))
        return torch.where(any_counted, picked.amax(1), zero)
    raise KvdistillError(f"prototype kind '{kind}' is unknown", "use 'mean', 'first' or 'max' (or kmeans_prototypes)")


def kmeans_prototypes(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """k-means centres of points x (M, F) -> (k, F), deterministic for a given seed.

    k-means++ initialisation (sampled on a CPU generator seeded with ``seed``), then ``iters`` Lloyd steps.
    A cluster that loses all its points keeps its previous centre.
    """
    if x.dim() != 2:
        raise KvdistillError(f"x {tuple(x.shape)} must have 2 dims (M, F)", "stack pooled features into (M, F)")
    M = x.shape[0]
    if not 1 <= k <= M:
        raise KvdistillError(f"k ({k}) must be between 1 and the number of points ({M})",
                             "lower kmeans_k or pool more samples")
    x = x.detach().float()
    gen = torch.Generator().manual_seed(seed)
    first = int(torch.randint(M, (1,), generator=gen))
    centres = [x[first]]
    dist = (x - x[first]).square().sum(-1)  # (M,) squared distance to the nearest centre so far
    for _ in range(1, k):
        probs = dist.cpu()
        if float(probs.sum()) > 0:
            nxt = int(torch.multinomial(probs / probs.sum(), 1, generator=gen))
        else:  # all points coincide with a centre: any point will do
            nxt = int(torch.randint(M, (1,), generator=gen))
        centres.append(x[nxt])
        dist = torch.minimum(dist, (x - x[nxt]).square().sum(-1))
    c = torch.stack(centres)  # (k, F)
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(1)  # (M,)
        onehot = torch.nn.functional.one_hot(assign, k).to(x.dtype)  # (M, k)
        counts = onehot.sum(0)  # (k,)
        sums = onehot.T @ x  # (k, F)
        new = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], c)
        if torch.equal(new, c):
            break
        c = new
    return c


# ---------------------------------------------------------------------------------------------- routing
def similarity_weights(query: torch.Tensor, prototypes: torch.Tensor, metric: str = "cosine",
                       temperature: float = 1.0) -> torch.Tensor:
    """Weights over teachers from the similarity of each sample to each teacher's prototype(s).

    query: (B, F); prototypes: (N, F), or (N, K, F) for K prototypes per teacher (the best match of the K
    counts). metric: "cosine"; "dot" = q·p / sqrt(F); "l2" = -||q - p||² / F (negative mean squared
    distance). The width scaling keeps temperature meaningful at any F.
    Returns softmax(similarity / temperature) over teachers: (B, N), rows sum to 1.
    """
    if query.dim() != 2:
        raise KvdistillError(f"query {tuple(query.shape)} must have 2 dims (B, F)", "pool the sequence first")
    if prototypes.dim() not in (2, 3) or prototypes.shape[-1] != query.shape[-1]:
        raise KvdistillError(f"prototypes {tuple(prototypes.shape)} do not match query {tuple(query.shape)}",
                             "pass prototypes as (N, F) or (N, K, F) with the query's width F")
    if prototypes.dim() == 2:
        prototypes = prototypes[:, None]  # (N, 1, F)
    if not temperature > 0:
        raise KvdistillError(f"temperature ({temperature}) must be > 0", "use e.g. temperature=1.0")
    q = query.float()[:, None, None, :]  # (B, 1, 1, F)
    p = prototypes.float()[None]  # (1, N, K, F)
    width = query.shape[-1]
    if metric == "cosine":
        sim = torch.nn.functional.cosine_similarity(q, p, dim=-1, eps=1e-8)  # (B, N, K)
    elif metric == "dot":
        sim = (q * p).sum(-1) / math.sqrt(width)
    elif metric == "l2":
        sim = -(q - p).square().sum(-1) / width
    else:
        raise KvdistillError(f"similarity metric '{metric}' is unknown", "use 'cosine', 'dot' or 'l2'")
    best = sim.amax(-1)  # (B, N)
    return torch.softmax(best / temperature, dim=-1)


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
            raise KvdistillError(f"targets[{n}] {tuple(t.shape)} and targets[0] {shape} differ (want (B, H, T, D))",
                                 "map every teacher into the student's geometry before fusing")
    B, _, T, _ = shape
    N = len(targets)
    if tuple(weights.shape) not in ((B, N), (B, T, N)):
        raise KvdistillError(f"weights {tuple(weights.shape)} do not fit {N} targets of shape {shape}",
                             f"pass weights as ({B}, {N}) or ({B}, {T}, {N})")
    w = weights[:, None, None, None, :] if weights.dim() == 2 else weights[:, None, :, None, :]  # (B, 1, T|1, 1, N)
    fused = targets[0] * w[..., 0].to(targets[0].dtype)
    for n in range(1, N):  # accumulate: no (B, H, T, D, N) stack
        fused = fused + targets[n] * w[..., n].to(targets[n].dtype)
    return fused  # (B, H, T, D)
