"""Learned routers: shapes, uniform start, mask handling, and that they learn to route."""

from __future__ import annotations

import math

import pytest
import torch

from kvdistill.errors import KvdistillError
from kvdistill.fuse import Router, router_target_kl

CASES = [("mlp", False), ("gate", False), ("attention", False), ("mlp", True), ("gate", True)]


@pytest.mark.parametrize(("kind", "per_token"), CASES)
def test_router_shapes_sum_to_one_and_start_uniform(kind, per_token):
    router = Router(32, 3, kind=kind, per_token=per_token)
    hidden = torch.randn(4, 7, 32) * 50  # large scale: layer norm makes it irrelevant
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[1, 5:] = 0
    w = router(hidden, mask)
    assert w.shape == ((4, 7, 3) if per_token else (4, 3))
    assert torch.allclose(w.sum(-1), torch.ones(w.shape[:-1]))
    assert torch.allclose(w, torch.full_like(w, 1 / 3))


@pytest.mark.parametrize(("kind", "per_token"), CASES)
def test_router_ignores_padding(kind, per_token):
    router = Router(16, 2, kind=kind, per_token=per_token)
    for p in router.parameters():  # move off the uniform start so the output depends on the input
        torch.nn.init.normal_(p)
    hidden = torch.randn(2, 5, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    base = router(hidden, mask)
    hidden2 = hidden.clone()
    hidden2[0, 3:] = torch.randn(2, 16) * 100
    w2 = router(hidden2, mask)
    assert torch.allclose(w2, base, atol=1e-6)
    if per_token:  # padded tokens get uniform weights
        assert torch.allclose(w2[0, 3:], torch.full((2, 2), 0.5))
    assert torch.allclose(router(hidden), router(hidden, torch.ones(2, 5)))


@pytest.mark.parametrize(("kind", "per_token"), CASES)
def test_router_learns_to_route_by_input(kind, per_token):
    """Two kinds of samples, each with a cheaper teacher: the router must learn which is which."""
    torch.manual_seed(0)
    H, N = 16, 3
    direction = torch.randn(H)
    group = torch.tensor([0, 1] * 8)  # (B,)
    hidden = torch.randn(16, 6, H) * 0.5 + torch.where(group[:, None, None] == 0, direction, -direction)
    cost = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])[
        group
    ]  # group 0 -> teacher 0, group 1 -> teacher 2
    mask = torch.ones(16, 6)
    router = Router(H, N, kind=kind, per_token=per_token)
    opt = torch.optim.Adam(router.parameters(), lr=0.05)
    for _ in range(40):
        w = router(hidden, mask)
        w_sample = w.mean(1) if per_token else w  # (B, N)
        loss = (w_sample * cost).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    w = router(hidden, mask)
    w_sample = w.mean(1) if per_token else w
    assert w_sample.argmax(-1).tolist() == [0, 2] * 8
    assert (w_sample * cost).sum(-1).mean().item() < 0.1  # started at 2/3


def test_router_errors():
    with pytest.raises(KvdistillError, match="router kind 'moe' is unknown"):
        Router(8, 2, kind="moe")
    with pytest.raises(KvdistillError, match="cannot be per_token"):
        Router(8, 2, kind="attention", per_token=True)
    router = Router(8, 2)
    with pytest.raises(KvdistillError, match=r"hidden \(2, 5, 6\) must be \(B, T, 8\)"):
        router(torch.zeros(2, 5, 6), torch.ones(2, 5))
    with pytest.raises(KvdistillError, match=r"mask \(2, 4\) does not match hidden \(2, 5, 8\)"):
        router(torch.zeros(2, 5, 8), torch.ones(2, 4))


def test_router_target_kl_known_values_and_per_token_mask():
    w = torch.tensor([[0.5, 0.5], [0.25, 0.75]])
    t = torch.tensor([[0.8, 0.2], [0.25, 0.75]])
    kl0 = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)  # 0.1927; the second sample 0
    assert float(router_target_kl(w, t)) == pytest.approx(kl0 / 2)
    token_w = torch.tensor([[[0.5, 0.5], [0.8, 0.2], [0.0, 1.0]]])  # (1, 3, 2); the third token is padding
    mask = torch.tensor([[1, 1, 0]])
    assert float(router_target_kl(token_w, t[:1], mask)) == pytest.approx(kl0 / 2)
    with pytest.raises(KvdistillError, match="do not fit"):
        router_target_kl(w, torch.ones(2, 3) / 3)


@pytest.mark.parametrize(("kind", "per_token"), [("mlp", False), ("gate", True)])
def test_router_trained_toward_target_weights_routes_by_input(kind, per_token):
    """A router trained by router_target_kl alone toward targets that depend on the sample's group reaches
    them."""
    torch.manual_seed(0)
    H, N = 16, 3
    centres = torch.randn(N, H) * 2
    group = torch.arange(24) % N  # (B,)
    hidden = torch.randn(24, 5, H) * 0.5 + centres[group][:, None]
    target = torch.full((24, N), 0.05)
    target[torch.arange(24), group] = 0.9  # (B, N)
    router = Router(H, N, kind=kind, per_token=per_token)
    opt = torch.optim.Adam(router.parameters(), lr=3e-2)
    for _ in range(150):
        opt.zero_grad()
        router_target_kl(router(hidden), target).backward()
        opt.step()
    w = router(hidden)
    w = w.mean(1) if per_token else w
    torch.testing.assert_close(w, target, atol=0.03, rtol=0)
