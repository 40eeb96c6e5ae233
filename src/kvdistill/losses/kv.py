"""K/V errors between a student's K/V mapped into a teacher's geometry and the teacher's (kept) K/V.

Notation: B batch, N rows (a teacher token, or a (head, token) pair when the kept tokens differ per head),
F features of a row (H·D or D), H heads, M kept teacher tokens, D head dim.

The library's one KV error works on rows, with any leading dims (layer pairs, keys/values) before B, so a
whole teacher's layer map is reduced in one call: pred, target (..., B, N, F), mask broadcastable to (..., B,
N). `as_rows` lays a (B, H, M, D) tensor out as rows. `pairs_kv_loss` weighs a teacher's per-pair key and
value errors into its K/V loss, the one formula every objective uses.

Normalisation (the only one): with normalize=True the error of a sample is divided by σ² (mse) or σ
(smooth-L1), σ² the variance of that sample's counted target values (detached, plus eps): layers and teachers
of different scales weigh alike, and because σ is per sample the loss does not depend on how samples are
grouped into batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvdistill.errors import KvdistillError
from kvdistill.losses.reduce import check_dims, check_mask, check_same, sample_mean

KV_KINDS = ("mse", "smooth_l1")


def as_rows(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, M, D) with a mask (B, M) shared by heads -> rows (B, M, H·D), mask (B, M);
    with a per-head mask (B, H, M) -> rows (B, H·M, D), mask (B, H·M)."""
    check_dims(x, 4, "x", "(B, H, M, D)")
    B, H, M, D = x.shape
    if mask.dim() == 2:
        return x.transpose(1, 2).reshape(B, M, H * D), mask
    return x.reshape(B, H * M, D), mask.reshape(B, H * M)


class _RowSquares(torch.autograd.Function):
    """Σ_F (pred - target)² per row -> (..., B, N) in float32 (float64 for float64 inputs), the difference
    zeroed in uncounted rows. One pass for the difference, one for the row sums; the backward is one
    elementwise pass (2·diff·g per row), and only the difference (in the inputs' dtype) is kept for it. The
    composite of autograd ops this replaces kept float32 copies of the whole (..., B, N, F) difference and its
    square."""

    @staticmethod
    def forward(ctx, pred, target, rows):  # pred, target (..., B, N, F); rows (..., B, N) bool
        diff = pred - target  # (..., B, N, F), the inputs' (promoted) dtype
        diff.masked_fill_(~rows[..., None], 0)  # NaN / inf in uncounted rows: no value, no gradient
        ctx.save_for_backward(diff)
        ctx.dtypes = pred.dtype, target.dtype
        acc = torch.float64 if diff.dtype == torch.float64 else torch.float32
        return torch.linalg.vector_norm(diff, dim=-1, dtype=acc).square()  # (..., B, N)

    @staticmethod
    def backward(ctx, grad):  # grad (..., B, N)
        (diff,) = ctx.saved_tensors
        g = diff * (2 * grad).to(diff.dtype)[..., None]  # (..., B, N, F)
        pred_grad = g.to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        target_grad = (-g).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return pred_grad, target_grad, None


def _target_variance(target: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Variance of each sample's counted target values -> (..., B), no gradient: row sums of x and x² in one
    pass each (float32 accumulation, float64 for float64 inputs), combined per sample in float64."""
    with torch.no_grad():
        acc = torch.float64 if target.dtype == torch.float64 else torch.float32
        zero = torch.zeros((), dtype=acc, device=target.device)
        s1 = torch.where(rows, target.sum(-1, dtype=acc), zero).sum(-1).double()  # (..., B)
        s2 = (
            torch.where(rows, torch.linalg.vector_norm(target, dim=-1, dtype=acc).square(), zero)
            .sum(-1)
            .double()
        )
        n = (rows.sum(-1) * target.shape[-1]).clamp(min=1).double()  # (..., B)
        mean = s1 / n
        return (s2 / n - mean.square()).clamp(min=0).to(acc)


def kv_error(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    *,
    kind: str = "mse",
    normalize: bool = True,
    weight: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Per-sample error between rows of pred and target -> (..., B).

    pred, target: (..., B, N, F), the same shape (map the student into the teacher's geometry first).
    mask: broadcastable to (..., B, N), 1 = the row counts. kind: "mse" (squared error) or "smooth_l1"
    (Huber, beta 1) per element. The error of a sample is the mean over its counted rows and their F features.
    normalize: divide by σ² (mse) or σ (smooth_l1), σ² the variance of the sample's counted target values
    (no gradient). weight: broadcastable to (..., B, N), multiplies each row's error (per-token fusion
    weights); the mean still divides by the number of counted rows, so weight 1 everywhere is the unweighted
    error. The difference is taken in the inputs' dtype; it is squared and reduced in float32 (float64 inputs:
    float64). mse runs as `_RowSquares` (a few passes over the rows, only the difference kept for the
    backward), smooth_l1 as elementwise autograd ops.
    """
    check_dims(pred, 3, "pred", "(..., B, N, F)", at_least=True)
    check_same(pred, target, "pred", "target", "map the student K/V into the teacher's geometry first")
    if kind not in KV_KINDS:
        raise KvdistillError(f"KV error kind '{kind}' is unknown", "use kind 'mse' or 'smooth_l1'")
    rows = check_mask(mask, pred.shape[:-1], "the rows of pred")  # (..., B, N)
    row_weight = None if weight is None else weight.to(torch.promote_types(weight.dtype, torch.float32))
    if kind == "mse":
        out = sample_mean(_RowSquares.apply(pred, target, rows), rows, 1, row_weight, scale=pred.shape[-1])
    else:
        counted = rows[..., None].expand(pred.shape)  # (..., B, N, F)
        diff = (pred - target).float().masked_fill(~counted, 0.0)  # (..., B, N, F)
        err = F.smooth_l1_loss(diff, torch.zeros_like(diff), reduction="none")
        out = sample_mean(err, counted, 2, None if row_weight is None else row_weight[..., None])  # (..., B)
    if not normalize:
        return out
    var = _target_variance(target, rows)  # (..., B)
    return out / ((var + eps) if kind == "mse" else (var + eps).sqrt())


def pairs_kv_loss(errors: torch.Tensor, coef: torch.Tensor, layers: int) -> torch.Tensor:
    """One teacher's K/V loss over the (student layer i, teacher layer j, weight w) pairs of its layer map ->
    (B,):

        Σ_p (w_p·α_K·err_K[p] + w_p·α_V·err_V[p]) / L

    errors (P, 2, B): each pair's key and value error (`kv_error`); coef (P, 2): w_p·α_K, w_p·α_V (a layer
    map's `LayerPairs.coef`; a fused target per layer: α_K, α_V with w = 1); layers: L, the student layers
    supervised.
    """
    check_dims(errors, 3, "errors", "(P, 2, B)")
    if coef.shape != errors.shape[:2]:
        raise KvdistillError(
            f"coef {tuple(coef.shape)} must be (P, 2) for errors {tuple(errors.shape)}",
            "pass one (keys, values) weight pair per layer pair",
        )
    return (coef.to(errors.device)[:, :, None] * errors).sum((0, 1)) / layers


def cosine_error(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Per-sample 1 - cosine similarity over the last dim -> (..., B): only directions are matched.

    pred, target: (..., B, N, D) (rows: one vector each, e.g. one head's key at one token); mask broadcastable
    to (..., B, N), 1 = counted; weight as in `kv_error`. Mean over counted rows.
    """
    check_dims(pred, 3, "pred", "(..., B, N, D)", at_least=True)
    check_same(pred, target, "pred", "target", "map the student K/V into the teacher's geometry first")
    counted = check_mask(mask, pred.shape[:-1], "the rows of pred")  # (..., B, N)
    cos = F.cosine_similarity(pred.float(), target.float(), dim=-1, eps=eps)  # (..., B, N)
    return sample_mean(1.0 - cos, counted, 1, None if weight is None else weight.float())
