"""Weights over the teachers of a batch: fixed, similarity to teacher prototypes, or a learned router.

Notation: B batch, T_s student tokens, N teachers, F_n the width a teacher's similarity is computed in, K prototypes.

The weights are (B, N) per sample, or (B, T_s, N) per student token (`fusion.router.per_token`). Similarity compares,
per teacher, a query pooled from the student's side with the teacher's prototypes (mean / first / max pooling, or
the k-means centres of the sample's teacher tokens), in the space the fusion runs in: the teacher's geometry (loss
space, through the trained projector), the student's (target space, through the frozen maps) or Z (latent space).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kvdistill.fuse import Router, entropy_regularizer, fixed_weights, prototype, similarity_weights


@dataclass
class SimilarityInputs:
    """One teacher's side of similarity routing: query rows from the student, key rows of the teacher, both
    (B, N_rows, F_n) on the same rows, with the rows that count (B, N_rows)."""

    query: torch.Tensor
    key: torch.Tensor
    mask: torch.Tensor


class Fusion(nn.Module):
    """The fusion weights of `cfg.fusion` for N teachers over a student of width `hidden_size`."""

    def __init__(self, cfg, num_teachers: int, hidden_size: int, teacher_weights: list[float]):
        super().__init__()
        self.cfg = cfg
        self.kind = cfg.kind
        self.per_token = cfg.kind == "router" and cfg.router.per_token
        self.register_buffer("fixed", fixed_weights(cfg.weights or teacher_weights) if num_teachers else
                             torch.zeros(0), persistent=False)
        self.router = (Router(hidden_size, num_teachers, kind=cfg.router.kind, per_token=cfg.router.per_token)
                       if cfg.kind == "router" else None)

    @property
    def needs_hidden(self) -> bool:
        return self.router is not None

    def token_weights(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-token router weights (B, T_s, N) from the student's last hidden states (B, T_s, F_s), detached."""
        return self.router(hidden.detach().float(), mask)

    def weights(self, hidden: torch.Tensor | None, mask: torch.Tensor,
                similarity: list[SimilarityInputs] | None = None) -> torch.Tensor:
        """(B, N) weights per sample, or (B, T_s, N) per token (router with per_token)."""
        B = mask.shape[0]
        if self.kind == "fixed":
            return self.fixed[None].expand(B, -1)
        if self.kind == "router":
            return self.router(hidden.detach().float(), mask)
        sim = self.cfg.similarity
        pool = "mean" if sim.prototype == "kmeans" else sim.prototype
        queries = [prototype(s.query.detach().float(), s.mask, kind=pool)[:, 0] for s in similarity]  # (B, F_n)
        protos = [prototype(s.key.detach().float(), s.mask, kind=sim.prototype, k=sim.kmeans_k) for s in similarity]
        return similarity_weights(queries, protos, metric=sim.metric, temperature=sim.temperature)  # (B, N)

    def regularizer(self, weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """The router's entropy term (0-dim, to add to the loss), None without a router or with weight 0."""
        if self.router is None or self.cfg.entropy.weight == 0:
            return None
        token_mask = mask if weights.dim() == 3 else None
        return entropy_regularizer(weights, target=self.cfg.entropy.target, mask=token_mask)


def per_sample(weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, N) weights: per-sample weights as they are, per-token (B, T_s, N) averaged over counted tokens."""
    if weights.dim() == 2:
        return weights
    m = mask.to(weights.dtype)[..., None]  # (B, T_s, 1)
    return (weights * m).sum(1) / m.sum(1).clamp(min=1.0)
