"""Distillation losses as pure functions.

Notation: B batch, H heads (H_s student, H_t teacher), T time, D head dim (D_s, D_t), V vocabulary,
F hidden width (F_s, F_t).

Mask semantics, shared by every loss here:
- ``mask`` is (B, T) (bool, int or float) with 1 = counted, 0 = padding / not covered.
- Masked positions contribute nothing, whatever values they hold (selected with ``torch.where``,
  so even NaN or inf there is harmless).
- Averages run over counted elements only: a batch with one long and one short sample weighs every
  counted token alike, it does not average per-sample means.
- Each loss returns a 0-dim float32 tensor; a mask with nothing counted gives 0 (no NaN), with a
  zero gradient.

Inputs of any float dtype are computed in float32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from kvdistill.errors import KvdistillError

__all__ = ["kv_loss", "cosine_loss", "attention_kl", "relation_loss", "ce_loss", "logit_kd", "hidden_mse"]


# ---------------------------------------------------------------------------------------------- helpers
def _shape(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def _check_dims(x: torch.Tensor, ndim: int, name: str, layout: str) -> None:
    if x.dim() != ndim:
        raise KvdistillError(f"{name} {_shape(x)} must have {ndim} dims {layout}",
                             f"pass {name} laid out as {layout}")


def _check_same(a: torch.Tensor, b: torch.Tensor, a_name: str, b_name: str, fix: str) -> None:
    if a.shape != b.shape:
        raise KvdistillError(f"{a_name} {_shape(a)} and {b_name} {_shape(b)} differ", fix)


def _check_mask(mask: torch.Tensor, B: int, T: int, H: int | None = None) -> torch.Tensor:
    """Validate a (B, T) mask (or (B, H, T) when H is given) and return it as bool."""
    ok = _shape(mask) == (B, T) or (H is not None and _shape(mask) == (B, H, T))
    if not ok:
        want = f"({B}, {T})" + (f" or ({B}, {H}, {T})" if H is not None else "")
        raise KvdistillError(f"mask {_shape(mask)} does not match the inputs: expected {want}",
                             "pass the (B, T) attention mask of the same batch, 1 = counted")
    return mask != 0


def _masked_mean(err: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """Mean of err over the elements where counted (bool, broadcastable to err) is True; 0 if none."""
    counted = counted.expand_as(err)
    total = torch.where(counted, err, torch.zeros((), dtype=err.dtype, device=err.device)).sum()
    return total / counted.sum().clamp(min=1).to(err.dtype)


# ---------------------------------------------------------------------------------------------- K/V
def kv_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, kind: str = "mse",
            normalize: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """Elementwise error between student K/V ``pred`` and teacher K/V ``target``.

    pred, target: (B, H, T, D), same geometry (map the student into the teacher's geometry first).
    mask: (B, T), or (B, H, T) for per-head masks (per-head KV selection); 1 = counted.
    kind: "mse" (squared error) or "smooth_l1" (Huber with beta 1).
    normalize: divide pred and target by the standard deviation of ``target`` over its counted elements
        (one scalar per call, i.e. per layer and teacher; detached, floored at ``eps``), so layers and
        teachers of different scales weigh alike. The loss is then invariant to scaling pred and target
        by the same constant.
    Returns the mean over counted (B, H, T) positions and all D: a 0-dim tensor.
    """
    _check_dims(pred, 4, "pred", "(B, H, T, D)")
    _check_same(pred, target, "pred", "target", "map the student K/V into the teacher's geometry first")
    if kind not in ("mse", "smooth_l1"):
        raise KvdistillError(f"kv_loss kind '{kind}' is unknown", "use kind='mse' or kind='smooth_l1'")
    B, H, T, _ = pred.shape
    counted = _check_mask(mask, B, T, H)
    counted = (counted[:, None] if counted.dim() == 2 else counted)[..., None]  # (B, H|1, T, 1)
    pred, target = pred.float(), target.float()
    if normalize:
        with torch.no_grad():
            mean = _masked_mean(target, counted)
            std = _masked_mean((target - mean).square(), counted).sqrt().clamp(min=eps)
        pred, target = pred / std, target / std
    if kind == "mse":
        err = (pred - target).square()
    else:
        err = F.smooth_l1_loss(pred, target, reduction="none", beta=1.0)
    return _masked_mean(err, counted)


def cosine_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """1 - cosine similarity over D between pred and target (B, H, T, D), mean over counted (B, H, T).

    mask: (B, T) or (B, H, T), 1 = counted. Scale-free per vector: only directions are matched.
    """
    _check_dims(pred, 4, "pred", "(B, H, T, D)")
    _check_same(pred, target, "pred", "target", "map the student K/V into the teacher's geometry first")
    B, H, T, _ = pred.shape
    counted = _check_mask(mask, B, T, H)
    counted = counted[:, None] if counted.dim() == 2 else counted  # (B, H|1, T)
    cos = F.cosine_similarity(pred.float(), target.float(), dim=-1, eps=eps)  # (B, H, T)
    return _masked_mean(1.0 - cos, counted)


# ---------------------------------------------------------------------------------------------- attention
def attention_kl(student_probs: torch.Tensor, teacher_probs: torch.Tensor, mask: torch.Tensor,
                 eps: float = 1e-8) -> torch.Tensor:
    """KL(teacher || student) between attention maps, over the key axis.

    student_probs: (B, H_s, T, T), teacher_probs: (B, H_t, T, T): rows (queries) are distributions over
    keys (the last axis). If H_s == H_t heads are compared one to one; otherwise each side is averaged
    over its heads to one map first.
    mask: (B, T), 1 = counted. Query rows that are masked are not counted; key columns that are masked are
    dropped and both rows renormalised over the remaining keys (a row with no mass left counts 0).
    eps: floor inside the logarithms.
    Returns the mean KL over counted (B, heads, query) rows: a 0-dim tensor.
    """
    _check_dims(student_probs, 4, "student_probs", "(B, H_s, T, T)")
    _check_dims(teacher_probs, 4, "teacher_probs", "(B, H_t, T, T)")
    B, H_s, T, T_k = student_probs.shape
    if T_k != T or teacher_probs.shape[0] != B or teacher_probs.shape[2:] != (T, T):
        raise KvdistillError(f"student_probs {_shape(student_probs)} and teacher_probs {_shape(teacher_probs)} "
                             "do not match", "pass (B, H, T, T) attention maps over the same T tokens")
    counted = _check_mask(mask, B, T)
    p_s, p_t = student_probs.float(), teacher_probs.float()
    if H_s != teacher_probs.shape[1]:
        p_s, p_t = p_s.mean(1, keepdim=True), p_t.mean(1, keepdim=True)  # (B, 1, T, T)
    keys = counted[:, None, None, :]  # (B, 1, 1, T)
    zero = torch.zeros((), device=p_s.device)
    p_s = torch.where(keys, p_s, zero)
    p_t = torch.where(keys, p_t, zero)
    p_s = p_s / p_s.sum(-1, keepdim=True).clamp(min=eps)
    p_t = p_t / p_t.sum(-1, keepdim=True).clamp(min=eps)
    kl = (p_t * (torch.log(p_t + eps) - torch.log(p_s + eps))).sum(-1)  # (B, H|1, T)
    return _masked_mean(kl, counted[:, None, :])


def _relation(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Head-averaged cosine Gram matrix of x (B, H, T, D) -> (B, T, T)."""
    unit = x / x.norm(dim=-1, keepdim=True).clamp(min=eps)  # (B, H, T, D)
    return (unit @ unit.transpose(-1, -2)).mean(1)  # (B, T, T)


def relation_loss(student_kv: torch.Tensor, teacher_kv: torch.Tensor, mask: torch.Tensor,
                  eps: float = 1e-8) -> torch.Tensor:
    """Token-relation loss that needs no map between geometries (MiniLMv2-style, cosine variant).

    student_kv: (B, H_s, T, D_s), teacher_kv: (B, H_t, T, D_t) (keys or values); H and D may differ.
    Each side becomes a relation matrix R (B, T, T): per head the cosine Gram matrix
    R_h[i, j] = cos(x_i, x_j) over D, averaged over heads. The loss is the MSE between the student's
    and the teacher's R over pairs (i, j) where both tokens are counted in mask (B, T).

    Why cosine (not softmax of X Xᵀ / sqrt(D)): it is exactly invariant to head dim, to orthogonal
    rotations (and isometric embeddings) of D, to per-token scale and to duplicating heads, so student
    and teacher of any width compare directly; it does not match vector norms (kv_loss does).
    """
    _check_dims(student_kv, 4, "student_kv", "(B, H_s, T, D_s)")
    _check_dims(teacher_kv, 4, "teacher_kv", "(B, H_t, T, D_t)")
    B, _, T, _ = student_kv.shape
    if teacher_kv.shape[0] != B or teacher_kv.shape[2] != T:
        raise KvdistillError(f"student_kv {_shape(student_kv)} and teacher_kv {_shape(teacher_kv)} differ "
                             "in batch or time", "align the teacher's tokens to the student's first")
    counted = _check_mask(mask, B, T)
    pairs = counted[:, :, None] & counted[:, None, :]  # (B, T, T)
    diff = _relation(student_kv.float(), eps) - _relation(teacher_kv.float(), eps)
    return _masked_mean(diff.square(), pairs)


# ---------------------------------------------------------------------------------------------- logits
def ce_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy; the shift is done here.

    logits: (B, T, V) from the model at positions 0..T-1; labels: (B, T) token ids (usually input_ids).
    logits[:, t] predicts labels[:, t + 1]; a prediction counts where mask[:, t] and mask[:, t + 1] are both
    1 (a real token predicting a real token). Labels at uncounted positions are ignored (may be -100).
    Returns the mean negative log-likelihood over counted predictions: a 0-dim tensor.
    """
    _check_dims(logits, 3, "logits", "(B, T, V)")
    B, T, V = logits.shape
    if _shape(labels) != (B, T):
        raise KvdistillError(f"labels {_shape(labels)} do not match logits {_shape(logits)}",
                             f"pass labels as ({B}, {T}) token ids of the same batch")
    counted = _check_mask(mask, B, T)
    counted = counted[:, 1:] & counted[:, :-1]  # (B, T-1)
    targets = torch.where(counted, labels[:, 1:], torch.zeros_like(labels[:, 1:]))  # (B, T-1)
    if bool(((targets < 0) | (targets >= V)).any()):
        bad = targets[(targets < 0) | (targets >= V)][0].item()
        raise KvdistillError(f"label id {bad} is outside the vocabulary of {V} logits",
                             "labels must be token ids of the model's own tokenizer")
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    nll = -logp.gather(-1, targets[..., None]).squeeze(-1)  # (B, T-1)
    return _masked_mean(nll, counted)


def logit_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
             temperature: float = 2.0) -> torch.Tensor:
    """Logit distillation: KL(teacher_τ || student_τ) · τ², mean over counted positions.

    student_logits, teacher_logits: (B, T, V) at the same positions (no shift) and the same vocabulary.
    teacher_τ = softmax(teacher_logits / τ); the τ² factor keeps gradient size comparable across τ.
    mask: (B, T), 1 = counted. Returns a 0-dim tensor. Gradients flow into both inputs; detach the
    teacher if it is not meant to learn.
    """
    _check_dims(student_logits, 3, "student_logits", "(B, T, V)")
    _check_dims(teacher_logits, 3, "teacher_logits", "(B, T, V)")
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise KvdistillError(
            f"logit KD needs the same vocabulary; student_logits {_shape(student_logits)} has "
            f"{student_logits.shape[-1]} and teacher_logits {_shape(teacher_logits)} has "
            f"{teacher_logits.shape[-1]} entries",
            "set the logit_kd weight to 0 for teachers with another tokenizer (KV losses align by characters)")
    _check_same(student_logits, teacher_logits, "student_logits", "teacher_logits",
                "logit KD needs both models run on the same tokens")
    if not temperature > 0:
        raise KvdistillError(f"temperature ({temperature}) must be > 0", "use e.g. temperature=2.0")
    B, T, _ = student_logits.shape
    counted = _check_mask(mask, B, T)
    log_s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1) * temperature**2  # (B, T)
    return _masked_mean(kl, counted)


# ---------------------------------------------------------------------------------------------- hidden
def hidden_mse(student_h: torch.Tensor, teacher_h: torch.Tensor, mask: torch.Tensor,
               proj: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """MSE between hidden states, student (B, T, F_s) and teacher (B, T, F_t).

    proj: applied to student_h when given, mapping F_s -> F_t (e.g. an nn.Linear); required when the
    widths differ. mask: (B, T), 1 = counted. Returns the mean over counted (B, T) and F_t: a 0-dim tensor.
    """
    _check_dims(student_h, 3, "student_h", "(B, T, F_s)")
    _check_dims(teacher_h, 3, "teacher_h", "(B, T, F_t)")
    if proj is None and student_h.shape[-1] != teacher_h.shape[-1]:
        raise KvdistillError(
            f"hidden widths differ: student_h {_shape(student_h)} and teacher_h {_shape(teacher_h)}",
            f"pass proj, e.g. nn.Linear({student_h.shape[-1]}, {teacher_h.shape[-1]})")
    pred = proj(student_h) if proj is not None else student_h
    _check_same(pred, teacher_h, "projected student_h" if proj is not None else "student_h", "teacher_h",
                "proj must map the student's width to the teacher's, on the same (B, T) tokens")
    B, T, _ = pred.shape
    counted = _check_mask(mask, B, T)
    return _masked_mean((pred.float() - teacher_h.float()).square(), counted[..., None])
