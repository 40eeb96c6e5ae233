"""Where a command computes when it is not told: the one device choice of evaluation, generation and
extraction."""

from __future__ import annotations

import torch


def default_device(device: str | None = None) -> str:
    """`device` when given, else "cuda" where a GPU is visible, else "cpu"."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")
