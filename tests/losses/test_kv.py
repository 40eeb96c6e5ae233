"""kv_error / cosine_error / as_rows: golden values, a brute-force per-sample reference, normalisation, masks,
row weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvdistill import losses as L
from kvdistill.errors import KvdistillError


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _brute(pred, target, mask, kind, normalize, eps=1e-6):
    """Per-sample error of (B, H, M, D) tensors over counted (head, token) rows, one sample at a time."""
    out = []
    for b in range(pred.shape[0]):
        rows = mask[b].expand(pred.shape[1], -1).bool()  # (H, M)
        p, t = pred[b][rows], target[b][rows]  # (N, D)
        if p.numel() == 0:
            out.append(torch.zeros(()))
            continue
        err = (p - t).square() if kind == "mse" else F.smooth_l1_loss(p, t, reduction="none")
        var = t.var(unbiased=False) + eps
        out.append(err.mean() / ((var if kind == "mse" else var.sqrt()) if normalize else 1))
    return torch.stack(out)


def test_kv_error_golden():
    pred = torch.zeros(1, 2, 2)  # (B, N, F)
    target = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    assert L.kv_error(pred, target, torch.tensor([[1, 1]]), normalize=False).item() == pytest.approx(7.5)
    assert L.kv_error(pred, target, torch.tensor([[1, 0]]), normalize=False).item() == pytest.approx(2.5)
    huber = L.kv_error(pred, target, torch.tensor([[1, 0]]), kind="smooth_l1", normalize=False)
    assert huber.item() == pytest.approx(1.0)  # |1| -> 0.5, |2| -> 1.5
    # normalised: counted target values 1, 2 have variance 0.25 -> 2.5 / 0.25
    norm = L.kv_error(pred, target, torch.tensor([[1, 0]]), normalize=True, eps=0.0)
    assert norm.item() == pytest.approx(10.0)


@pytest.mark.parametrize("kind", ["mse", "smooth_l1"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("per_head", [False, True])
def test_kv_error_equals_brute_force_per_sample(kind, normalize, per_head):
    pred, target = _rand(3, 2, 5, 4, seed=1), 2 * _rand(3, 2, 5, 4, seed=2) + 1  # (B, H, M, D)
    if per_head:
        mask = (torch.rand(3, 2, 5, generator=torch.Generator().manual_seed(3)) > 0.3).long()
        mask[2] = 0  # a sample with nothing counted
        ref_mask = mask
    else:
        mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 0], [0, 0, 0, 0, 0]])
        ref_mask = mask[:, None]
    rows_p, rows_mask = L.as_rows(pred, mask)
    rows_t, _ = L.as_rows(target, mask)
    got = L.kv_error(rows_p, rows_t, rows_mask, kind=kind, normalize=normalize)
    torch.testing.assert_close(got, _brute(pred, target, ref_mask, kind, normalize), rtol=1e-5, atol=1e-7)
    assert got[2] == 0


def test_kv_error_leading_dims_and_scale_invariance():
    pred, target = _rand(4, 2, 3, 6, 5, seed=4), 3 * _rand(4, 2, 3, 6, 5, seed=5)  # (P, 2, B, N, F)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]])  # (B, N)
    batched = L.kv_error(pred, target, mask)  # (P, 2, B)
    assert batched.shape == (4, 2, 3)
    one = L.kv_error(pred[1, 0], target[1, 0], mask)
    torch.testing.assert_close(batched[1, 0], one)
    for kind in ("mse", "smooth_l1"):  # scale-free only for mse; smooth_l1 / σ is scale-free for small errors
        base = L.kv_error(pred, target, mask, kind="mse")
        torch.testing.assert_close(
            L.kv_error(40 * pred, 40 * target, mask, kind="mse"), base, rtol=1e-4, atol=1e-6
        )
        assert kind


def test_kv_error_row_weights_and_nan_in_masked_rows():
    pred = _rand(2, 4, 3, seed=6).requires_grad_()
    target = _rand(2, 4, 3, seed=7)
    target[0, 3] = float("nan")  # a masked row holding NaN changes nothing
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    ones = L.kv_error(pred, target, mask, weight=torch.ones(2, 4))
    plain = L.kv_error(pred, target, mask)
    torch.testing.assert_close(ones, plain)
    w = torch.tensor([[0.0, 1.0, 2.0, 5.0], [1.0, 1.0, 1.0, 1.0]])
    weighted = L.kv_error(pred, target, mask, weight=w, normalize=False)
    rows = (pred - target).square().mean(-1)  # (B, N)
    ref0 = (w[0, :3] * rows[0, :3]).sum() / 3
    assert weighted[0].item() == pytest.approx(ref0.item(), rel=1e-6)
    weighted.sum().backward()
    assert torch.isfinite(pred.grad).all() and pred.grad[0, 0].abs().sum() == 0  # weight 0: no gradient


def test_cosine_error_golden_and_mask():
    pred = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])  # (B, N, D)
    target = torch.tensor([[[2.0, 0.0], [1.0, 0.0], [-1.0, -1.0]]])
    assert L.cosine_error(pred, target, torch.ones(1, 3)).item() == pytest.approx((0 + 1 + 2) / 3)
    assert L.cosine_error(pred, target, torch.tensor([[1, 1, 0]])).item() == pytest.approx(0.5)


def test_shape_errors_name_the_shapes():
    with pytest.raises(KvdistillError, match=r"pred \(1, 2, 3\) and target \(1, 2, 4\) differ"):
        L.kv_error(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), torch.ones(1, 2))
    with pytest.raises(KvdistillError, match=r"mask \(1, 5\) does not match"):
        L.kv_error(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.ones(1, 5))
    with pytest.raises(KvdistillError, match="kind 'l1' is unknown"):
        L.kv_error(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.ones(1, 2), kind="l1")


def _composite_mse(pred, target, mask, weight, eps=1e-6):
    """The mse kv_error as plain autograd ops in float64 (the reference for `_RowSquares`' backward)."""
    counted = torch.broadcast_to(mask != 0, pred.shape[:-1])[..., None].expand(pred.shape)
    diff = torch.where(counted, pred - target, torch.zeros((), dtype=pred.dtype))
    n = counted.sum((-2, -1)).clamp(min=1)
    err = (diff.square() * weight[..., None]).sum((-2, -1)) / n
    t = target.detach()
    mean = torch.where(counted, t, 0).sum((-2, -1)) / n
    var = torch.where(counted, (t - mean[..., None, None]).square(), 0).sum((-2, -1)) / n
    return err / (var + eps)


def test_kv_error_gradients_equal_the_autograd_composite():
    """Gradients of pred, target (a learnable target, as in target-space fusion) and the row weights equal
    those of the same error written as elementwise autograd ops, in float64; leading dims (P, 2) and a masked
    row."""
    pred = _rand(3, 2, 4, 5, 6, seed=11).double().requires_grad_()  # (P, 2, B, N, F)
    target = (2 * _rand(3, 2, 4, 5, 6, seed=12) + 0.5).double().requires_grad_()
    weight = torch.rand(4, 5, generator=torch.Generator().manual_seed(13)).double().requires_grad_()
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [1, 1, 0, 0, 0]])
    scale = _rand(3, 2, 4, seed=14).double()
    got = L.kv_error(pred, target, mask, weight=weight)
    assert got.dtype == torch.float64 and got.shape == (3, 2, 4)
    grads = torch.autograd.grad((got * scale).sum(), (pred, target, weight))
    ref = _composite_mse(pred, target, mask, weight)
    ref_grads = torch.autograd.grad((ref * scale).sum(), (pred, target, weight))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-14)
    assert grads[0][:, :, 2].abs().sum() == 0  # a sample with nothing counted: no gradient


def test_kv_error_bfloat16_inputs():
    """bf16 pred / target (as on a GPU): the error in float32, within bf16 rounding of the float64 value, and
    the gradient in bf16 within bf16 rounding of the float64 gradient."""
    pred64, target64 = _rand(2, 16, 64, seed=15).double(), (_rand(2, 16, 64, seed=16) + 0.3).double()
    mask = torch.ones(2, 16)
    pred = pred64.bfloat16().requires_grad_()
    target = target64.bfloat16()
    got = L.kv_error(pred, target, mask)
    assert got.dtype == torch.float32
    p_ref = pred.detach().double().requires_grad_()
    ref = L.kv_error(p_ref, target.double(), mask)
    torch.testing.assert_close(got.double(), ref, rtol=2e-2, atol=0)
    got.sum().backward()
    ref.sum().backward()
    assert pred.grad.dtype == torch.bfloat16
    torch.testing.assert_close(pred.grad.double(), p_ref.grad, rtol=2e-2, atol=1e-4)


def test_pairs_kv_loss_weighs_each_pairs_key_and_value_error_over_the_layers():
    """Σ_p (w_p·α_K·err_K + w_p·α_V·err_V) / L, worked by hand: 2 pairs on L = 1 student layer
    (interpolated)."""
    errors = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]])  # (P=2, 2, B=2)
    coef = torch.tensor([[0.25, 0.5], [0.75, 1.0]])  # (P, 2): w·α_K, w·α_V
    got = L.pairs_kv_loss(errors, coef, 1)
    want = torch.tensor([0.25 * 1 + 0.5 * 3 + 0.75 * 5 + 1.0 * 7, 0.25 * 2 + 0.5 * 4 + 0.75 * 6 + 1.0 * 8])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(L.pairs_kv_loss(errors, coef, 4), want / 4)
    with pytest.raises(KvdistillError, match=r"coef \(3, 2\) must be \(P, 2\)"):
        L.pairs_kv_loss(errors, torch.ones(3, 2), 1)
