"""token_nll / ce_loss / logit_kd against independent references: a sliced log-softmax for CE, the closed forms of
forward KL, reverse KL and the generalised JSD written with probabilities, at several temperatures, with padding
and with vocabulary entries that both sides make impossible (-inf)."""

from __future__ import annotations

import math

import pytest
import torch

from kvdistill import losses as L
from kvdistill.errors import KvdistillError


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_ce_equals_sliced_log_softmax_reference_with_gradient():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 9, 50, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, labels[:, 1:, None]).squeeze(-1)  # (B, T-1)
    m = (mask[:, 1:] * mask[:, :-1]).float()
    ref = -(logp * m).sum(1) / m.sum(1)
    got = L.ce_loss(logits, labels, mask)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    g_ref, g_got = (torch.autograd.grad(x.sum(), logits)[0] for x in (ref, got))
    torch.testing.assert_close(g_got, g_ref, rtol=1e-6, atol=1e-7)
    nll, counted = L.token_nll(logits, labels, mask)
    assert counted.sum() == m.sum() and not counted[:, -1].any()
    with pytest.raises(KvdistillError, match="label id 50 is outside the vocabulary of 50"):
        L.ce_loss(logits, torch.full((3, 9), 50), mask)


def _reference(s, t, mask, tau, divergence, beta):
    """Per-sample divergence · τ², averaged over counted positions, from probabilities (0·log 0 = 0)."""
    p_s, p_t = torch.softmax(s / tau, -1), torch.softmax(t / tau, -1)

    def kl(p, q):
        terms = torch.where(p > 0, p * (p.clamp_min(1e-300).log() - q.clamp_min(1e-300).log()), torch.zeros(()))
        return terms.sum(-1)

    if divergence == "forward":
        div = kl(p_t, p_s)
    elif divergence == "reverse":
        div = kl(p_s, p_t)
    else:
        m = beta * p_t + (1 - beta) * p_s
        div = beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)
    m = mask.double()
    return (div * tau**2 * m).sum(1) / m.sum(1).clamp(min=1)


@pytest.mark.parametrize("divergence, beta", [("forward", 0.5), ("reverse", 0.5), ("jsd", 0.5), ("jsd", 0.1)])
@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0, 4.0])
def test_logit_kd_equals_closed_form(divergence, beta, tau):
    s, t = _rand(3, 6, 11, seed=1) * 3, _rand(3, 6, 11, seed=2) * 3
    s[..., 7:] = t[..., 7:] = -math.inf  # an impossible tail on both sides
    s[2, 4:] = float("nan")  # garbage at padded positions changes nothing
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
    s.requires_grad_()
    got = L.logit_kd(s, t, mask, temperature=tau, divergence=divergence, beta=beta)
    ref = _reference(s.detach().nan_to_num(0.0), t, mask, tau, divergence, beta)
    torch.testing.assert_close(got, ref.float(), rtol=1e-5, atol=1e-6)
    assert torch.isfinite(got).all() and (got > 0).all()
    got.sum().backward()
    assert torch.isfinite(s.grad).all()
    assert s.grad[..., 7:].abs().sum() == 0 and s.grad[2, 4:].abs().sum() == 0


def test_logit_kd_golden_and_zero_on_equal_distributions():
    s = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])
    t = torch.tensor([[[3.0, 2.0, 1.0], [9.0, 9.0, 9.0]]])
    tau = 2.0
    ps, pt = torch.softmax(s[0, 0] / tau, -1).tolist(), torch.softmax(t[0, 0] / tau, -1).tolist()
    kl = sum(b * math.log(b / a) for a, b in zip(ps, pt, strict=True)) * tau**2
    assert L.logit_kd(s, t, torch.tensor([[1, 0]]), temperature=tau).item() == pytest.approx(kl, rel=1e-5)
    assert L.logit_kd(s, t, torch.ones(1, 2), temperature=tau).item() == pytest.approx(kl / 2, rel=1e-5)
    for div in ("forward", "reverse", "jsd"):
        assert L.logit_kd(t, t, torch.ones(1, 2), divergence=div).abs().item() < 1e-6
    # JSD is bounded by ln 2 per position before τ²
    far = torch.tensor([[[50.0, -50.0]]]), torch.tensor([[[-50.0, 50.0]]])
    assert L.logit_kd(*far, torch.ones(1, 1), temperature=1.0, divergence="jsd").item() == pytest.approx(
        math.log(2), rel=1e-4)


def test_logit_kd_errors():
    with pytest.raises(KvdistillError, match="logit KD needs the same vocabulary"):
        L.logit_kd(torch.zeros(1, 2, 5), torch.zeros(1, 2, 6), torch.ones(1, 2))
    with pytest.raises(KvdistillError, match="divergence 'tvd' is unknown"):
        L.logit_kd(torch.zeros(1, 2, 5), torch.zeros(1, 2, 5), torch.ones(1, 2), divergence="tvd")
    with pytest.raises(KvdistillError, match=r"jsd beta \(1.0\) must lie strictly between 0 and 1"):
        L.logit_kd(torch.zeros(1, 2, 5), torch.zeros(1, 2, 5), torch.ones(1, 2), divergence="jsd", beta=1.0)
