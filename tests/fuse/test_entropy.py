"""Entropy regulariser: values, sign, gradient direction, masks."""

from __future__ import annotations

import math

import pytest
import torch

from kvdistill.errors import KvdistillError
from kvdistill.fuse import entropy, entropy_regularizer


def test_entropy_regularizer_golden():
    uniform = torch.full((4, 3), 1 / 3)
    assert entropy_regularizer(uniform, "diverse").item() == pytest.approx(-math.log(3))
    assert entropy_regularizer(uniform, "specialized").item() == pytest.approx(math.log(3))
    # each sample certain, but of different teachers: specialised per sample, diverse on average
    split = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert entropy_regularizer(split, "diverse").item() == pytest.approx(-math.log(2))
    assert entropy_regularizer(split, "specialized").item() == pytest.approx(0.0, abs=1e-6)
    # all samples on one teacher: neither diverse nor uncertain
    same = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert entropy_regularizer(same, "diverse").item() == pytest.approx(0.0, abs=1e-6)
    assert entropy(torch.tensor([0.5, 0.5])).item() == pytest.approx(math.log(2))


@pytest.mark.parametrize("target", ["diverse", "specialized"])
def test_gradient_descent_moves_in_the_documented_direction(target):
    torch.manual_seed(0)
    logits = (torch.randn(8, 4) + torch.tensor([2.0, 0.0, 0.0, 0.0])).requires_grad_()
    opt = torch.optim.SGD([logits], lr=0.5)

    def stats():
        w = torch.softmax(logits, -1)
        return entropy(w.mean(0)).item(), entropy(w).mean().item()

    h_mean0, h_each0 = stats()
    for _ in range(20):
        loss = entropy_regularizer(torch.softmax(logits, -1), target)
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(logits.grad).all()
        opt.step()
    h_mean, h_each = stats()
    if target == "diverse":  # the batch uses all teachers more evenly
        assert h_mean > h_mean0 + 0.1
    else:  # each sample concentrates on fewer teachers
        assert h_each < h_each0 - 0.1


def test_entropy_regularizer_mask_and_errors():
    w = torch.tensor([[[1.0, 0.0], [0.5, 0.5]], [[0.0, 1.0], [0.3, 0.7]]])  # (B, T, N) per token
    mask = torch.tensor([[1, 0], [1, 0]])
    # counted rows are the one-hots [1, 0] and [0, 1]
    assert entropy_regularizer(w, "diverse", mask=mask).item() == pytest.approx(-math.log(2))
    assert entropy_regularizer(w, "specialized", mask=mask).item() == pytest.approx(0.0, abs=1e-6)
    assert entropy_regularizer(w, "diverse", mask=torch.zeros(2, 2)).item() == 0.0
    with pytest.raises(KvdistillError, match="entropy target 'balanced' is unknown"):
        entropy_regularizer(w, "balanced")
    with pytest.raises(KvdistillError, match=r"mask \(2, 3\) does not match weights \(2, 2, 2\)"):
        entropy_regularizer(w, "diverse", mask=torch.ones(2, 3))


@pytest.mark.parametrize("target", ["diverse", "specialized"])
def test_per_token_weights_ignore_uncounted_tokens(target):
    """(B, T, N) weights with a (B, T) mask: whatever uncounted tokens hold changes neither the value nor
    gets a gradient, and the value equals the regulariser of the counted rows alone."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 3, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
    other = torch.where(mask[..., None] == 1, logits, torch.randn(2, 5, 3, generator=gen) * 10)
    leaf = other.clone().requires_grad_()
    value = entropy_regularizer(torch.softmax(leaf, -1), target, mask=mask)
    value.backward()
    assert value.item() == pytest.approx(
        entropy_regularizer(torch.softmax(logits, -1), target, mask=mask).item()
    )
    rows = torch.softmax(logits, -1)[mask == 1]  # (7, N) counted rows
    assert value.item() == pytest.approx(entropy_regularizer(rows, target).item(), abs=1e-6)
    assert torch.equal(leaf.grad[mask == 0], torch.zeros(3, 3))  # 3 uncounted tokens
