"""Losses: golden values on hand-computed inputs, brute-force references, mask invariance, invariances."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kvdistill import losses as L
from kvdistill.errors import KvdistillError


def _rand(*shape):
    return torch.randn(*shape, dtype=torch.float32)


def _orthonormal_rows(d_in: int, d_out: int) -> torch.Tensor:
    """(d_in, d_out) with Q Qᵀ = I: an isometric embedding of R^d_in into R^d_out."""
    q, _ = torch.linalg.qr(torch.randn(d_out, d_in, dtype=torch.float64))
    return q.T.float()


# ---------------------------------------------------------------------------------------------- kv_loss
def test_kv_loss_golden():
    pred = torch.zeros(1, 1, 2, 2)
    target = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    assert L.kv_loss(pred, target, torch.tensor([[1, 1]])).item() == pytest.approx(7.5)  # (1+4+9+16)/4
    assert L.kv_loss(pred, target, torch.tensor([[1, 0]])).item() == pytest.approx(2.5)  # (1+4)/2
    # Huber, beta 1: |1| -> 0.5, |2| -> 1.5
    assert L.kv_loss(pred, target, torch.tensor([[1, 0]]), kind="smooth_l1").item() == pytest.approx(1.0)


def test_kv_loss_normalize_golden():
    # counted target values 0 and 4: std 2 -> target / 2 = [0, 2], pred 0 -> (0 + 4) / 2
    pred = torch.zeros(1, 1, 2, 1)
    target = torch.tensor([[[[0.0], [4.0]]]])
    assert L.kv_loss(pred, target, torch.ones(1, 2), normalize=True).item() == pytest.approx(2.0)


def test_kv_loss_brute_force_pools_counted_tokens():
    pred, target = _rand(2, 3, 5, 4), _rand(2, 3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 0]])
    sel = mask.bool()
    ref = F.mse_loss(pred.transpose(1, 2)[sel], target.transpose(1, 2)[sel])  # (counted, H, D)
    assert L.kv_loss(pred, target, mask).item() == pytest.approx(ref.item(), rel=1e-6)


@pytest.mark.parametrize("kind", ["mse", "smooth_l1"])
def test_kv_loss_normalize_scale_invariant(kind):
    pred, target = _rand(2, 2, 6, 8), 3 * _rand(2, 2, 6, 8) + 1
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    base = L.kv_loss(pred, target, mask, kind=kind, normalize=True)
    scaled = L.kv_loss(37.5 * pred, 37.5 * target, mask, kind=kind, normalize=True)
    assert scaled.item() == pytest.approx(base.item(), rel=1e-5)
    # without normalize the MSE grows by the square of the scale
    if kind == "mse":
        ratio = L.kv_loss(37.5 * pred, 37.5 * target, mask) / L.kv_loss(pred, target, mask)
        assert ratio.item() == pytest.approx(37.5**2, rel=1e-5)


@pytest.mark.parametrize("normalize", [False, True])
def test_kv_loss_mask_invariance_and_per_head_mask(normalize):
    pred, target = _rand(2, 2, 4, 3), _rand(2, 2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    base = L.kv_loss(pred, target, mask, normalize=normalize)
    pred2, target2 = pred.clone(), target.clone()
    pred2[0, :, 2:] = float("nan")
    target2[1, :, 3] = 1e6
    assert L.kv_loss(pred2, target2, mask, normalize=normalize).item() == pytest.approx(base.item(), rel=1e-6)
    per_head = mask[:, None].expand(2, 2, 4)  # (B, H, T) mask equal on every head gives the same loss
    assert L.kv_loss(pred, target, per_head, normalize=normalize).item() == pytest.approx(base.item(), rel=1e-6)


def test_kv_loss_shape_errors():
    with pytest.raises(KvdistillError, match=r"pred \(2, 4, 10, 64\) and target \(2, 4, 9, 64\) differ"):
        L.kv_loss(torch.zeros(2, 4, 10, 64), torch.zeros(2, 4, 9, 64), torch.ones(2, 10))
    with pytest.raises(KvdistillError, match=r"mask \(2, 9\) does not match"):
        L.kv_loss(torch.zeros(2, 4, 10, 64), torch.zeros(2, 4, 10, 64), torch.ones(2, 9))
    with pytest.raises(KvdistillError, match="kind 'l1' is unknown"):
        L.kv_loss(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), torch.ones(1, 1), kind="l1")


# ---------------------------------------------------------------------------------------------- cosine
def test_cosine_loss_golden():
    pred = torch.tensor([[[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [5.0, 5.0]]]])
    target = torch.tensor([[[[0.0, 1.0], [2.0, 0.0], [-1.0, 0.0], [1.0, -3.0]]]])
    # 1 - cos: 1, 0, 2 on the counted tokens; the fourth is masked
    assert L.cosine_loss(pred, target, torch.tensor([[1, 1, 1, 0]])).item() == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------- attention KL
def test_attention_kl_golden_with_key_padding():
    # key 2 is padding: student row [.25, .25, .5] -> [.5, .5]; teacher [.2, .6, .2] -> [.25, .75]
    s_row, t_row = torch.tensor([0.25, 0.25, 0.5]), torch.tensor([0.2, 0.6, 0.2])
    student = s_row.expand(1, 1, 3, 3).clone()
    teacher = t_row.expand(1, 1, 3, 3).clone()
    student[0, 0, 2] = torch.tensor([0.0, 0.0, 1.0])  # query 2 is padding too: not counted
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    got = L.attention_kl(student, teacher, torch.tensor([[1, 1, 0]]))
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_attention_kl_head_averaging_and_brute_force():
    T = 5
    s = torch.softmax(_rand(2, 4, T, T), -1)
    t = torch.softmax(_rand(2, 2, T, T), -1)
    mask = torch.ones(2, T)
    # different head counts: one averaged map each, reference with F.kl_div
    ref = F.kl_div(s.mean(1).log(), t.mean(1), reduction="none").sum(-1).mean()
    assert L.attention_kl(s, t, mask, eps=0.0).item() == pytest.approx(ref.item(), rel=1e-5)
    # same head count: per head
    t4 = torch.softmax(_rand(2, 4, T, T), -1)
    ref4 = F.kl_div(s.log(), t4, reduction="none").sum(-1).mean()
    assert L.attention_kl(s, t4, mask, eps=0.0).item() == pytest.approx(ref4.item(), rel=1e-5)
    assert L.attention_kl(t4, t4, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_attention_kl_shape_error():
    with pytest.raises(KvdistillError, match=r"student_probs \(1, 2, 4, 4\) and teacher_probs \(1, 2, 3, 3\)"):
        L.attention_kl(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 3, 3), torch.ones(1, 4))


# ---------------------------------------------------------------------------------------------- relation
def test_relation_loss_golden():
    teacher = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [7.0, 7.0]]]])  # R = identity on tokens 0, 1
    student = torch.tensor([[[[1.0, 0.0], [3.0, 0.0], [-2.0, 1.0]]]])  # R = all ones on tokens 0, 1
    # counted pairs (0,0) (0,1) (1,0) (1,1): squared differences 0, 1, 1, 0
    assert L.relation_loss(student, teacher, torch.tensor([[1, 1, 0]])).item() == pytest.approx(0.5)


def test_relation_loss_head_and_width_agnostic():
    teacher = _rand(2, 2, 6, 8)  # (B, H_t, T, D_t)
    Q = _orthonormal_rows(8, 16)  # isometric embedding D_t=8 -> D_s=16
    student = torch.cat([teacher, teacher], dim=1) @ Q  # (B, 4, T, 16): heads duplicated, rotated, wider
    student = student * torch.rand(2, 1, 6, 1).add(0.5)  # per-token scale does not matter either
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    assert L.relation_loss(student, teacher, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert L.relation_loss(_rand(2, 4, 6, 16), teacher, mask).item() > 0.01  # unrelated tokens: off-diagonals differ


def test_relation_loss_mask_invariance():
    s, t = _rand(2, 3, 5, 4), _rand(2, 2, 5, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    base = L.relation_loss(s, t, mask)
    s2, t2 = s.clone(), t.clone()
    s2[0, :, 3:] = 100 * _rand(3, 2, 4)
    t2[1, :, 4] = 0.0
    assert L.relation_loss(s2, t2, mask).item() == pytest.approx(base.item(), rel=1e-6)
    s3 = s.clone()
    s3[1, :, 4] = 0.0  # zero vectors (padding) keep the gradient finite
    s3.requires_grad_()
    L.relation_loss(s3, t, mask).backward()
    assert torch.isfinite(s3.grad).all()


# ---------------------------------------------------------------------------------------------- CE
def test_ce_loss_matches_cross_entropy_on_unpadded_samples():
    V = 11
    logits = _rand(2, 6, V)
    labels = torch.randint(V, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0]])  # sample 1: left and right padding
    labels[1, 0], labels[1, 5] = -100, -100  # padding labels are never read
    pieces_logits = [logits[0, :5], logits[1, 2:4]]  # real tokens predicting real next tokens
    pieces_labels = [labels[0, 1:], labels[1, 3:5]]
    ref = F.cross_entropy(torch.cat(pieces_logits), torch.cat(pieces_labels))
    assert L.ce_loss(logits, labels, mask).item() == pytest.approx(ref.item(), rel=1e-6)


def test_ce_loss_golden_uniform_and_errors():
    V = 7
    assert L.ce_loss(torch.zeros(1, 4, V), torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4)).item() == \
        pytest.approx(math.log(V))
    with pytest.raises(KvdistillError, match=r"labels \(1, 3\) do not match logits \(1, 4, 7\)"):
        L.ce_loss(torch.zeros(1, 4, V), torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 4))
    with pytest.raises(KvdistillError, match="label id 9 is outside the vocabulary of 7"):
        L.ce_loss(torch.zeros(1, 2, V), torch.tensor([[0, 9]]), torch.ones(1, 2))


# ---------------------------------------------------------------------------------------------- logit KD
def test_logit_kd_hand_computed():
    s = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])
    t = torch.tensor([[[3.0, 2.0, 1.0], [9.0, 9.0, 9.0]]])
    tau = 2.0

    def softmax(xs):
        e = [math.exp(x / tau) for x in xs]
        return [v / sum(e) for v in e]

    ps, pt = softmax([1, 2, 3]), softmax([3, 2, 1])
    kl = sum(b * math.log(b / a) for a, b in zip(ps, pt, strict=True)) * tau**2
    # position 1 is masked; position 0 alone
    assert L.logit_kd(s, t, torch.tensor([[1, 0]]), temperature=tau).item() == pytest.approx(kl, rel=1e-5)
    # both counted: position 1 has identical (uniform) distributions, KL 0 -> mean halves
    assert L.logit_kd(s, t, torch.ones(1, 2), temperature=tau).item() == pytest.approx(kl / 2, rel=1e-5)


def test_logit_kd_vocab_error():
    with pytest.raises(KvdistillError, match="logit KD needs the same vocabulary"):
        L.logit_kd(torch.zeros(1, 2, 5), torch.zeros(1, 2, 6), torch.ones(1, 2))


# ---------------------------------------------------------------------------------------------- hidden
def test_hidden_mse_golden_and_projection():
    s = torch.tensor([[[1.0, 1.0], [5.0, 5.0]]])
    t = torch.tensor([[[0.0, 3.0], [0.0, 0.0]]])
    assert L.hidden_mse(s, t, torch.tensor([[1, 0]])).item() == pytest.approx(2.5)  # (1 + 4) / 2
    with pytest.raises(KvdistillError, match=r"hidden widths differ: student_h \(1, 2, 2\) and teacher_h \(1, 2, 3\)"):
        L.hidden_mse(s, torch.zeros(1, 2, 3), torch.ones(1, 2))
    proj = torch.nn.Linear(2, 3)
    t3 = _rand(1, 2, 3)
    ref = F.mse_loss(proj(s), t3)
    assert L.hidden_mse(s, t3, torch.ones(1, 2), proj=proj).item() == pytest.approx(ref.item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------- all losses
def _calls(mask):
    B, T = mask.shape
    kv = (_rand(B, 2, T, 4).requires_grad_(), _rand(B, 2, T, 4))
    probs = (torch.softmax(_rand(B, 2, T, T), -1).requires_grad_(), torch.softmax(_rand(B, 3, T, T), -1))
    logits = (_rand(B, T, 9).requires_grad_(), _rand(B, T, 9))
    hidden = (_rand(B, T, 6).requires_grad_(), _rand(B, T, 6))
    return {
        "kv": (L.kv_loss, kv[0], (kv[1], mask)),
        "kv_norm_huber": (lambda p, t, m: L.kv_loss(p, t, m, kind="smooth_l1", normalize=True), kv[0], (kv[1], mask)),
        "cosine": (L.cosine_loss, kv[0], (kv[1], mask)),
        "attention_kl": (L.attention_kl, probs[0], (probs[1], mask)),
        "relation": (L.relation_loss, kv[0], (_rand(B, 3, T, 5), mask)),
        "ce": (L.ce_loss, logits[0], (torch.randint(9, (B, T)), mask)),
        "logit_kd": (L.logit_kd, logits[0], (logits[1], mask)),
        "hidden": (L.hidden_mse, hidden[0], (hidden[1], mask)),
    }


@pytest.mark.parametrize("name", ["kv", "kv_norm_huber", "cosine", "attention_kl", "relation", "ce", "logit_kd",
                                  "hidden"])
@pytest.mark.parametrize("empty", [False, True])
def test_scalar_finite_gradient_and_empty_mask(name, empty):
    mask = torch.zeros(2, 5, dtype=torch.long) if empty else torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    fn, x, rest = _calls(mask)[name]
    loss = fn(x, *rest)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(x.grad).all()
    if empty:
        assert loss.item() == 0.0 and x.grad.abs().sum().item() == 0.0
    else:
        assert loss.item() > 0 and x.grad.abs().sum().item() > 0
