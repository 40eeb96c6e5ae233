"""Fixed weights: normalisation and refusals."""

from __future__ import annotations

import pytest
import torch

from kvdistill.errors import KvdistillError
from kvdistill.fuse import fixed_weights


def test_fixed_weights_normalised():
    w = fixed_weights([1, 3])
    assert w.dtype == torch.float32 and torch.allclose(w, torch.tensor([0.25, 0.75]))
    assert torch.allclose(fixed_weights([0.0, 2.0, 0.0]), torch.tensor([0.0, 1.0, 0.0]))


@pytest.mark.parametrize(
    ("weights", "message"),
    [([1.0, -0.5], "negative"), ([0, 0], "all 0"), ([], "empty"), ([1.0, float("nan")], "non-finite")],
)
def test_fixed_weights_errors(weights, message):
    with pytest.raises(KvdistillError, match=message):
        fixed_weights(weights)
