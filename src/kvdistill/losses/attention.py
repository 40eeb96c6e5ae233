"""Losses on token relations that need no map between geometries: attention-map KL and K/V relation matrices.

Notation: B batch, H heads (H_s student, H_t teacher), T time, D head dim (D_s, D_t).
"""

from __future__ import annotations

import torch

from kvdistill.errors import KvdistillError
from kvdistill.losses.reduce import check_dims, check_mask, sample_mean, shape_of


def attention_kl(
    student_probs: torch.Tensor, teacher_probs: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """Per-sample KL(teacher || student) between attention maps over the key axis -> (B,).

    student_probs: (B, H_s, T, T), teacher_probs: (B, H_t, T, T): rows (queries) are distributions over keys
    (the last axis). If H_s == H_t heads are compared one to one; otherwise each side is averaged over its
    heads first. mask: (B, T), 1 = counted. Masked query rows are not counted; masked key columns are dropped
    and both rows renormalised over the remaining keys. eps: floor inside the logarithms.
    Returns, per sample, the mean KL over its counted (head, query) rows.
    """
    check_dims(student_probs, 4, "student_probs", "(B, H_s, T, T)")
    check_dims(teacher_probs, 4, "teacher_probs", "(B, H_t, T, T)")
    B, H_s, T, T_k = student_probs.shape
    if T_k != T or teacher_probs.shape[0] != B or teacher_probs.shape[2:] != (T, T):
        raise KvdistillError(
            f"student_probs {shape_of(student_probs)} and teacher_probs {shape_of(teacher_probs)} "
            "do not match",
            "pass (B, H, T, T) attention maps over the same T tokens",
        )
    counted = check_mask(mask, (B, T), "the maps' (B, T)")
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
    return sample_mean(kl, counted[:, None, :].expand(kl.shape), 2)


def relation_matrix(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Head-averaged cosine Gram matrix of x (B, H, T, D) -> (B, T, T): R[i, j] = mean_h cos(x_hi, x_hj)."""
    unit = x.float() / x.float().norm(dim=-1, keepdim=True).clamp(min=eps)  # (B, H, T, D)
    return (unit @ unit.transpose(-1, -2)).mean(1)  # (B, T, T)


def relation_loss(
    student_kv: torch.Tensor, teacher_kv: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """Per-sample token-relation loss (MiniLMv2-style, cosine variant) -> (B,); needs no map between
    geometries.

    student_kv: (B, H_s, T, D_s), teacher_kv: (B, H_t, T, D_t) (keys or values) on the same T tokens; H and D
    may differ. Each side becomes `relation_matrix` (B, T, T); the loss is the MSE between the two over pairs
    (i, j) of counted tokens (mask (B, T)). Cosine (not softmax(X Xᵀ/√D)) makes it exactly invariant to head
    dim, to orthogonal rotations of D, to per-token scale and to duplicated heads; it does not match norms
    (kv_error does).
    """
    check_dims(student_kv, 4, "student_kv", "(B, H_s, T, D_s)")
    check_dims(teacher_kv, 4, "teacher_kv", "(B, H_t, T, D_t)")
    B, _, T, _ = student_kv.shape
    if teacher_kv.shape[0] != B or teacher_kv.shape[2] != T:
        raise KvdistillError(
            f"student_kv {shape_of(student_kv)} and teacher_kv {shape_of(teacher_kv)} differ "
            "in batch or time",
            "align the teacher's tokens to the student's first",
        )
    counted = check_mask(mask, (B, T), "the K/V's (B, T)")
    pairs = counted[:, :, None] & counted[:, None, :]  # (B, T, T)
    diff = relation_matrix(student_kv, eps) - relation_matrix(teacher_kv, eps)
    return sample_mean(diff.square(), pairs, 2)
