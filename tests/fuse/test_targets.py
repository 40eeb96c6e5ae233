"""Target-space fusion: per-sample and per-token weighted sums of the teachers' targets."""

from __future__ import annotations

import pytest
import torch

from kvdistill.errors import KvdistillError
from kvdistill.fuse import fuse_targets


def test_fuse_targets_per_sample_and_per_token():
    a, b = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    w = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    fused = fuse_targets([a, b], w)
    assert torch.allclose(fused[0], 0.25 * a[0] + 0.75 * b[0])
    assert torch.allclose(fused[1], a[1])
    wt = torch.rand(2, 4, 1)
    wt = torch.cat([wt, 1 - wt], -1)  # (B, T, N)
    fused = fuse_targets([a, b], wt)
    ref = wt[:, None, :, 0, None] * a + wt[:, None, :, 1, None] * b
    assert torch.allclose(fused, ref)


def test_fuse_targets_golden():
    a = torch.full((1, 1, 2, 1), 2.0)  # (B, H, T, D)
    b = torch.full((1, 1, 2, 1), -4.0)
    per_token = torch.tensor([[[0.5, 0.5], [0.25, 0.75]]])  # (B, T, N)
    assert fuse_targets([a, b], per_token).flatten().tolist() == [-1.0, -2.5]


def test_fuse_targets_errors():
    a = torch.zeros(2, 3, 4, 5)
    with pytest.raises(
        KvdistillError, match=r"targets\[1\] \(2, 3, 4, 6\) and targets\[0\] \(2, 3, 4, 5\) differ"
    ):
        fuse_targets([a, torch.zeros(2, 3, 4, 6)], torch.ones(2, 2) / 2)
    with pytest.raises(KvdistillError, match=r"weights \(2, 3\) do not fit 2 targets"):
        fuse_targets([a, a], torch.ones(2, 3) / 3)
    with pytest.raises(KvdistillError, match="no targets to fuse"):
        fuse_targets([], torch.ones(2, 0))
