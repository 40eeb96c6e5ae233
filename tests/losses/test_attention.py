"""attention_kl / relation_loss per sample: golden values, F.kl_div references, invariances, masks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kvdistill import losses as L
from kvdistill.errors import KvdistillError


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_attention_kl_golden_with_key_padding():
    # key 2 is padding: student row [.25, .25, .5] -> [.5, .5]; teacher [.2, .6, .2] -> [.25, .75]
    student = torch.tensor([0.25, 0.25, 0.5]).expand(1, 1, 3, 3).clone()
    teacher = torch.tensor([0.2, 0.6, 0.2]).expand(1, 1, 3, 3).clone()
    student[0, 0, 2] = torch.tensor([0.0, 0.0, 1.0])  # query 2 is padding too: not counted
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert L.attention_kl(student, teacher, torch.tensor([[1, 1, 0]])).item() == pytest.approx(
        expected, rel=1e-5
    )


def test_attention_kl_per_sample_head_averaging_and_brute_force():
    T = 5
    s = torch.softmax(_rand(2, 4, T, T, seed=1), -1)
    t = torch.softmax(_rand(2, 2, T, T, seed=2), -1)
    mask = torch.ones(2, T)
    ref = F.kl_div(s.mean(1).log(), t.mean(1), reduction="none").sum(-1).mean(-1)  # (B,): heads averaged
    torch.testing.assert_close(L.attention_kl(s, t, mask, eps=0.0), ref, rtol=1e-5, atol=1e-7)
    t4 = torch.softmax(_rand(2, 4, T, T, seed=3), -1)
    ref4 = F.kl_div(s.log(), t4, reduction="none").sum(-1).mean((1, 2))  # same head count: per head
    torch.testing.assert_close(L.attention_kl(s, t4, mask, eps=0.0), ref4, rtol=1e-5, atol=1e-7)
    assert L.attention_kl(t4, t4, mask).abs().max().item() < 1e-6
    with pytest.raises(
        KvdistillError, match=r"student_probs \(1, 2, 4, 4\) and teacher_probs \(1, 2, 3, 3\)"
    ):
        L.attention_kl(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 3, 3), torch.ones(1, 4))


def test_relation_loss_golden_and_invariances():
    teacher = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [7.0, 7.0]]]])  # R = identity on tokens 0, 1
    student = torch.tensor([[[[1.0, 0.0], [3.0, 0.0], [-2.0, 1.0]]]])  # R = all ones on tokens 0, 1
    assert L.relation_loss(student, teacher, torch.tensor([[1, 1, 0]])).item() == pytest.approx(0.5)
    t = _rand(2, 2, 6, 8, seed=4)  # (B, H_t, T, D_t)
    q, _ = torch.linalg.qr(torch.randn(16, 8, dtype=torch.float64))
    s = torch.cat([t, t], dim=1) @ q.T.float()  # heads duplicated, isometrically embedded into D = 16
    s = s * torch.rand(2, 1, 6, 1).add(0.5)  # per-token scale
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    assert L.relation_loss(s, t, mask).abs().max().item() < 1e-6
    assert (L.relation_loss(_rand(2, 4, 6, 16, seed=5), t, mask) > 0.01).all()


def test_relation_loss_per_sample_equals_each_sample_alone():
    s, t = _rand(2, 3, 5, 4, seed=6), _rand(2, 2, 5, 6, seed=7)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    batch = L.relation_loss(s, t, mask)
    for b in range(2):
        n = int(mask[b].sum())
        alone = L.relation_loss(s[b : b + 1, :, :n], t[b : b + 1, :, :n], torch.ones(1, n))
        assert batch[b].item() == pytest.approx(alone.item(), rel=1e-6)


def _calls(mask):
    B, T = mask.shape
    kv = (_rand(B, T, 8).requires_grad_(), _rand(B, T, 8, seed=1))
    probs = (
        torch.softmax(_rand(B, 2, T, T), -1).requires_grad_(),
        torch.softmax(_rand(B, 3, T, T, seed=2), -1),
    )
    logits = (_rand(B, T, 9).requires_grad_(), _rand(B, T, 9, seed=3))
    heads = _rand(B, 2, T, 4).requires_grad_()
    return {
        "kv": (L.kv_error, kv[0], (kv[1], mask)),
        "kv_huber": (lambda p, t, m: L.kv_error(p, t, m, kind="smooth_l1"), kv[0], (kv[1], mask)),
        "cosine": (L.cosine_error, kv[0], (kv[1], mask)),
        "attention_kl": (L.attention_kl, probs[0], (probs[1], mask)),
        "relation": (L.relation_loss, heads, (_rand(B, 3, T, 5, seed=4), mask)),
        "ce": (L.ce_loss, logits[0], (torch.randint(9, (B, T)), mask)),
        "logit_kd": (L.logit_kd, logits[0], (logits[1], mask)),
        "hidden": (L.hidden_error, kv[0], (kv[1], mask)),
    }


@pytest.mark.parametrize(
    "name", ["kv", "kv_huber", "cosine", "attention_kl", "relation", "ce", "logit_kd", "hidden"]
)
@pytest.mark.parametrize("empty", [False, True])
def test_every_loss_is_per_sample_float32_finite_and_zero_on_an_empty_mask(name, empty):
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    if empty:
        mask[0] = 0
    fn, x, rest = _calls(mask)[name]
    loss = fn(x, *rest)
    assert loss.shape == (2,) and loss.dtype == torch.float32
    loss.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert (loss[0].item() == 0.0) == empty and loss[1].item() > 0
    if empty:
        assert x.grad[0].abs().sum().item() == 0.0
