"""Similarity routing: weights over teachers from how well a query matches each teacher's prototypes.

Notation: B batch, T time, N teachers, F_n feature width of teacher n, K_n prototypes of teacher n.

Each teacher is compared in its own width F_n (teachers have different K/V widths), so the inputs are
sequences with one tensor per teacher. A teacher's score is the best match over its K_n prototypes of
    "cosine": cos(q, p);   "dot": q·p / sqrt(F_n);   "l2": -||q - p||² / F_n (minus the mean squared error).
The width scaling keeps one temperature meaningful across teachers of different widths.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from kvdistill.errors import KvdistillError

__all__ = ["SIMILARITY_METRICS", "best_match", "similarity_weights"]

SIMILARITY_METRICS = ("cosine", "dot", "l2")


def similarity_weights(
    queries: Sequence[torch.Tensor],
    prototypes: Sequence[torch.Tensor],
    metric: str = "cosine",
    temperature: float = 1.0,
) -> torch.Tensor:
    """softmax over teachers of best_match(queries[n], prototypes[n]) / temperature.

    queries: N tensors (B, F_n) per sample, or (B, T, F_n) per token (all N alike). prototypes: N tensors
    (B, K_n, F_n). Returns float32 weights (B, N), or (B, T, N) for per-token queries; they sum to 1.
    """
    if isinstance(queries, torch.Tensor) or isinstance(prototypes, torch.Tensor):
        raise KvdistillError(
            "queries and prototypes must be sequences with one tensor per teacher, got a tensor",
            "pass [q_1, ..., q_N] with q_n (B, F_n) and [p_1, ..., p_N] with p_n (B, K_n, F_n)",
        )
    if not queries or len(queries) != len(prototypes):
        raise KvdistillError(
            f"{len(queries)} queries and {len(prototypes)} prototype sets: want one of "
            "each per teacher (at least one teacher)",
            "pass lists of equal length N >= 1",
        )
    lead = tuple(queries[0].shape[:-1])
    for n, q in enumerate(queries):
        if q.dim() not in (2, 3) or tuple(q.shape[:-1]) != lead:
            raise KvdistillError(
                f"queries[{n}] {tuple(q.shape)} and queries[0] {tuple(queries[0].shape)} must all be "
                "(B, F_n) or all (B, T, F_n)",
                "pool every teacher's query alike (same B, and same T per token)",
            )
    if not (math.isfinite(temperature) and temperature > 0):
        raise KvdistillError(
            f"temperature ({temperature}) must be finite and > 0", "use e.g. temperature=1.0"
        )
    scores = []  # N tensors (B,) or (B, T)
    for n, (q, p) in enumerate(zip(queries, prototypes, strict=True)):
        try:
            scores.append(best_match(q, p, metric))
        except KvdistillError as err:  # say which teacher
            raise KvdistillError(f"teacher {n}: {err.problem}", err.fix) from None
    return torch.softmax(torch.stack(scores, -1) / temperature, dim=-1)


def best_match(query: torch.Tensor, prototypes: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
    """Best similarity over the K prototypes (module docstring): query (B, F) or (B, T, F), prototypes
    (B, K, F) -> float32 (B,) or (B, T)."""
    if metric not in SIMILARITY_METRICS:
        raise KvdistillError(
            f"similarity metric '{metric}' is unknown", f"use one of {', '.join(SIMILARITY_METRICS)}"
        )
    if query.dim() not in (2, 3):
        raise KvdistillError(
            f"query {tuple(query.shape)} must be (B, F) or (B, T, F)",
            "pool the sequence, or keep its time axis for per-token weights",
        )
    B, F = query.shape[0], query.shape[-1]
    if (
        prototypes.dim() != 3
        or prototypes.shape[0] != B
        or prototypes.shape[2] != F
        or prototypes.shape[1] < 1
    ):
        raise KvdistillError(
            f"prototypes {tuple(prototypes.shape)} do not match query {tuple(query.shape)}",
            f"pass this teacher's prototypes as ({B}, K, {F}) with K >= 1, in the query's width",
        )
    q = query.float() if query.dim() == 3 else query.float()[:, None]  # (B, T|1, F)
    p = prototypes.float()  # (B, K, F)
    if metric == "cosine":  # a zero vector (a sample with no counted token) has cosine 0 with everything
        unit_q = torch.nn.functional.normalize(q, dim=-1, eps=1e-8)
        unit_p = torch.nn.functional.normalize(p, dim=-1, eps=1e-8)
        sim = unit_q @ unit_p.transpose(1, 2)  # (B, T|1, K)
    elif metric == "dot":
        sim = q @ p.transpose(1, 2) / math.sqrt(F)  # (B, T|1, K)
    else:  # exact differences, one prototype at a time: no (B, T, K, F) tensor, no cancellation
        sq = [(q - p[:, j, None]).square().sum(-1) for j in range(p.shape[1])]  # K tensors (B, T|1)
        sim = -torch.stack(sq, -1) / F  # (B, T|1, K)
    best = sim.amax(-1)  # (B, T|1)
    return best if query.dim() == 3 else best[:, 0]
