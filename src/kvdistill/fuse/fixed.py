"""Fixed weights over teachers: one weight per teacher, the same for every sample and token.

Notation: N teachers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from kvdistill.errors import KvdistillError

__all__ = ["fixed_weights"]


def fixed_weights(weights: Sequence[float]) -> torch.Tensor:
    """One weight per teacher, normalised to sum to 1 -> float32 (N,).

    Raises KvdistillError on an empty list, a negative or non-finite weight, or weights that are all 0.
    """
    values = [float(w) for w in weights]
    if not values:
        raise KvdistillError("fixed weights are empty", "give one weight per teacher")
    bad = [w for w in values if not math.isfinite(w) or w < 0]
    if bad:
        raise KvdistillError(
            f"fixed weights {values} contain negative or non-finite values {bad}",
            "use weights >= 0, one per teacher",
        )
    total = sum(values)
    if total == 0:
        raise KvdistillError(f"fixed weights {values} are all 0", "give at least one teacher a weight > 0")
    return torch.tensor(values, dtype=torch.float32) / total
