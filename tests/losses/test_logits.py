"""logit_kd / topk_logit_kd against independent references: the closed forms of forward KL, reverse KL and the
generalised JSD written with probabilities, at several temperatures, with padding and with vocabulary entries
that both sides make impossible (-inf); the top-k variant equals its closed form with a tail bucket. The
chunking every logit KD term shares (`kvdistill.losses.divergence`): chunked equals unchunked (value and
gradient) and keeps no float32 copy of the logits for backward."""

from __future__ import annotations

import math

import pytest
import torch
from tests.losses.reference import divergence as divergence_of
from tests.losses.reference import kl_np, rand64, value_and_grad

from kvdistill import losses as L
from kvdistill.errors import KvdistillError


def _reference(s, t, mask, tau, divergence, beta):
    """Per-sample divergence · τ², averaged over counted positions, from probabilities (0·log 0 = 0)."""
    p_s, p_t = torch.softmax(s / tau, -1), torch.softmax(t / tau, -1)

    div = divergence_of(p_t, p_s, divergence, beta)
    m = mask.double()
    return (div * tau**2 * m).sum(1) / m.sum(1).clamp(min=1)


@pytest.mark.parametrize("divergence, beta", [("forward", 0.5), ("reverse", 0.5), ("jsd", 0.5), ("jsd", 0.1)])
@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0, 4.0])
def test_logit_kd_equals_closed_form(divergence, beta, tau):
    s, t = rand64(3, 6, 11, seed=1) * 3, rand64(3, 6, 11, seed=2) * 3
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
        math.log(2), rel=1e-4
    )


def test_logit_kd_errors():
    with pytest.raises(KvdistillError, match="(?s)logit KD needs the same vocabulary.*use cross_logit_kd"):
        L.logit_kd(torch.zeros(1, 2, 5), torch.zeros(1, 2, 6), torch.ones(1, 2))
    with pytest.raises(KvdistillError, match="divergence 'tvd' is unknown"):
        L.logit_kd(torch.zeros(1, 2, 5), torch.zeros(1, 2, 5), torch.ones(1, 2), divergence="tvd")
    with pytest.raises(KvdistillError, match=r"jsd beta \(1.0\) must lie strictly between 0 and 1"):
        L.logit_kd(torch.zeros(1, 2, 5), torch.zeros(1, 2, 5), torch.ones(1, 2), divergence="jsd", beta=1.0)
    with pytest.raises(KvdistillError, match=r"chunk \(-1\) must be >= 0"):
        L.logit_kd(torch.zeros(1, 2, 5), torch.zeros(1, 2, 5), torch.ones(1, 2), chunk=-1)
    with pytest.raises(KvdistillError, match=r"top-k k \(5\) must lie in \[1, 4\]"):
        L.topk_log_probs(torch.zeros(1, 2, 5), 5)
    with pytest.raises(KvdistillError, match=r"teacher_ids hold ids outside \[0, 5\)"):
        L.topk_logit_kd(
            torch.zeros(1, 2, 5), torch.full((1, 2, 2), 7), torch.zeros(1, 2, 2), torch.ones(1, 2)
        )


@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("chunk", [1, 4, 7])
def test_chunked_equals_unchunked_value_and_gradient(divergence, chunk):
    """Every logit KD function, cut into chunks of positions (recomputed in backward), gives the one-pass
    value and gradient; padded positions (NaN there) stay out of both."""
    B, T, V = 3, 6, 13
    s, t = rand64(B, T, V, seed=3) * 2, rand64(B, T, V, seed=4) * 2
    s[1, 4:] = float("nan")
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
    ids, lp = L.topk_log_probs(t, 5, temperature=1.5)
    pos = torch.tensor(
        [[0, 2, -1, 3, 4, 5], [1, 1, 2, 3, 0, 0], [5, 4, 3, 2, 1, 0]]
    )  # any partners, one missing
    s_b = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 7, 8, 8, 8, 9])  # two merged buckets, bucket 9 = other
    t_b = torch.tensor([9, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 2])
    calls = {
        "logit_kd": lambda x, c: L.logit_kd(x, t, mask, temperature=1.5, divergence=divergence, chunk=c),
        "topk": lambda x, c: L.topk_logit_kd(
            x, ids, lp, mask, temperature=1.5, divergence=divergence, chunk=c
        ),
        "cross": lambda x, c: L.cross_logit_kd(
            x, t, pos, mask, s_b, t_b, shared=9, temperature=1.5, divergence=divergence, chunk=c
        ),
        "cross_topk": lambda x, c: L.cross_logit_kd(
            x, (ids, lp), pos, mask, s_b, t_b, shared=9, temperature=1.5, divergence=divergence, chunk=c
        ),
    }
    for name, fn in calls.items():
        v0, g0 = value_and_grad(lambda x, fn=fn: fn(x, 0), s)
        v1, g1 = value_and_grad(lambda x, fn=fn: fn(x, chunk), s)
        assert torch.isfinite(v0).all() and (v0 > 0).all(), name
        torch.testing.assert_close(v1, v0, rtol=1e-6, atol=1e-7, msg=name)
        torch.testing.assert_close(g1, g0, rtol=1e-6, atol=1e-8, msg=name)
        assert torch.isfinite(g0).all() and g0[1, 4:].abs().sum() == 0 and g0[2, 2:].abs().sum() == 0, name


@pytest.mark.parametrize("divergence, beta", [("forward", 0.5), ("reverse", 0.5), ("jsd", 0.3)])
def test_topk_with_tail_equals_its_closed_form(divergence, beta):
    """k + 1 events: the teacher's top k ids with their probabilities and the rest of the mass as one bucket,
    on both sides; written out with Python floats from softmax probabilities."""
    tau, k = 1.7, 3
    s, t = rand64(2, 4, 9, seed=5) * 2, rand64(2, 4, 9, seed=6) * 2
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    ids, lp = L.topk_log_probs(t, k, temperature=tau)
    got = L.topk_logit_kd(s, ids, lp, mask, temperature=tau, divergence=divergence, beta=beta)
    ref = []
    for b in range(2):
        terms = []
        for i in range(int(mask[b].sum())):
            p_t = torch.softmax(t[b, i] / tau, -1).tolist()
            p_s = torch.softmax(s[b, i] / tau, -1).tolist()
            top = sorted(range(9), key=lambda v: -p_t[v])[:k]
            assert sorted(top) == sorted(ids[b, i].tolist())
            pt = [p_t[v] for v in top] + [1 - sum(p_t[v] for v in top)]
            ps = [p_s[v] for v in top] + [1 - sum(p_s[v] for v in top)]
            if divergence == "forward":
                d = kl_np(pt, ps)
            elif divergence == "reverse":
                d = kl_np(ps, pt)
            else:
                m = [beta * a + (1 - beta) * c for a, c in zip(pt, ps, strict=True)]
                d = beta * kl_np(pt, m) + (1 - beta) * kl_np(ps, m)
            terms.append(d * tau**2)
        ref.append(sum(terms) / len(terms))
    torch.testing.assert_close(got, torch.tensor(ref, dtype=torch.float32), rtol=2e-5, atol=1e-6)
    # the whole vocabulary but one entry: the tail is that entry, so it is logit_kd
    ids, lp = L.topk_log_probs(t, 8, temperature=tau)
    full = L.logit_kd(s, t, mask, temperature=tau, divergence=divergence, beta=beta)
    torch.testing.assert_close(
        L.topk_logit_kd(s, ids, lp, mask, temperature=tau, divergence=divergence, beta=beta),
        full,
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("fn", ["logit_kd", "cross_logit_kd"])
def test_chunked_holds_no_float32_copy_of_the_logits_for_backward(fn):
    """What a call keeps for its backward, beyond views of its own inputs: one pass keeps float32 (B·T, V)
    softmaxes; chunked, nothing (each chunk is recomputed in backward from views of the inputs)."""
    B, T, V = 2, 32, 500
    s, t = (
        torch.randn(B, T, V, dtype=torch.bfloat16, requires_grad=True),
        torch.randn(B, T, V, dtype=torch.bfloat16),
    )
    mask, ident, pos = torch.ones(B, T), torch.arange(V), torch.arange(T).expand(B, T)
    inputs = {s.untyped_storage().data_ptr(), t.untyped_storage().data_ptr()}

    def kept(chunk):
        new = []

        def pack(x):
            if x.untyped_storage().data_ptr() not in inputs and x.is_floating_point():
                new.append(x.numel() * x.element_size())
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            if fn == "logit_kd":
                value = L.logit_kd(s, t, mask, chunk=chunk)
            else:
                value = L.cross_logit_kd(s, t, pos, mask, ident, ident, shared=V, chunk=chunk)
        value.sum().backward()
        return sum(new)

    assert kept(0) >= 2 * B * T * V * 4  # at least two float32 (B·T, V) tensors
    assert kept(8) <= B * T * 8  # no more than a few bytes per position
