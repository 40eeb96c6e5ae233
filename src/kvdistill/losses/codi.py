"""CODI's hidden-state distillation (arXiv 2502.21074): the student's hidden states at the token before the
answer pulled towards the teacher's at the same token, at every layer.

Notation: L layers compared, B batch, F hidden width.

    codi(b) = mean_l  err(h_s[l, b], sg(h_t[l, b])) / σ_t[l, b]

err is smooth-L1 (CODI's choice) or MSE averaged over the F features; σ_t[l, b] is the standard deviation of
the teacher's vector at layer l of sample b (no gradient, plus eps), so layers of different scales weigh alike
and a sample's loss does not depend on the rest of its batch. With normalize=False the division is skipped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvdistill.errors import KvdistillError
from kvdistill.losses.reduce import check_dims, check_same

CODI_KINDS = ("smooth_l1", "mse")


def codi_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    kind: str = "smooth_l1",
    normalize: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Per-sample CODI loss (B,). student, teacher: (L, B, F) hidden states at each sample's pre-answer token;
    the teacher side never gets a gradient."""
    check_dims(student, 3, "student", "(L, B, F)")
    check_same(
        student, teacher, "student", "teacher", "take both at the token before the answer, every layer"
    )
    if kind not in CODI_KINDS:
        raise KvdistillError(f"CODI loss kind '{kind}' is unknown", f"use one of {', '.join(CODI_KINDS)}")
    target = teacher.detach().float()
    diff = student.float() - target  # (L, B, F)
    err = (
        F.smooth_l1_loss(diff, torch.zeros_like(diff), reduction="none")
        if kind == "smooth_l1"
        else diff.square()
    )
    per_layer = err.mean(-1)  # (L, B)
    if normalize:
        per_layer = per_layer / (target.std(-1, unbiased=False) + eps)
    return per_layer.mean(0)
