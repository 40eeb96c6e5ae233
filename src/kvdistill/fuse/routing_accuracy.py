"""Routing accuracy: how much fusion weight each sample puts on the teacher that specialises in its skill.

Notation: N samples, K teachers.

For sample n of skill s with specialist teacher k = specialist_of[s], its accuracy is weights[n, k] (1 when
all its weight is on the specialist, 1/K for uniform weights). `routing_acc_<s>` is the mean over the samples
of skill s; `routing_acc` the mean over every sample whose skill has a specialist. Per-token weights are first
averaged over each sample's counted tokens (`kvdistill.objectives.fusion.per_sample`), so a sample's row is
what the weights gave its tokens on average.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from kvdistill.errors import KvdistillError

__all__ = ["routing_accuracy"]


def routing_accuracy(
    weights: torch.Tensor, skills: Sequence[str | None], specialist_of: Mapping[str, int]
) -> dict[str, float]:
    """weights (N, K) (rows sum to 1), skills (N,), specialist_of {skill: teacher index} ->
    {"routing_acc": x, "routing_acc_<skill>": x, ...} for the skills that occur and have a specialist."""
    if weights.dim() != 2 or weights.shape[0] != len(skills):
        raise KvdistillError(
            f"weights {tuple(weights.shape)} must be (N, K) with N = {len(skills)} skills",
            "pool per-token weights per sample first (objectives.fusion.per_sample)",
        )
    K = weights.shape[1]
    bad = {s: k for s, k in specialist_of.items() if not 0 <= k < K}
    if bad:
        raise KvdistillError(
            f"specialist_of {bad}: teacher indices must lie in [0, {K})",
            "map each skill to the position of its specialist among the run's teachers",
        )
    w = weights.detach().float().cpu()
    per_skill: dict[str, list[float]] = {}
    for n, skill in enumerate(skills):
        if skill in specialist_of:
            per_skill.setdefault(skill, []).append(float(w[n, specialist_of[skill]]))
    if not per_skill:
        return {}
    every = [x for values in per_skill.values() for x in values]
    out = {"routing_acc": sum(every) / len(every)}
    out.update({f"routing_acc_{s}": sum(v) / len(v) for s, v in sorted(per_skill.items())})
    return out
