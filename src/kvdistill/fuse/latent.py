"""A shared latent space Z for teachers of any architecture (decoders and encoders alike).

Every teacher's per-token K/V features x (keys and values of all KV heads of one layer, concatenated: F_n =
2·H_t·D_t wide) are mapped into one d_z-dimensional space Z by a frozen map fitted once on a fixed batch:

    z_n = ((x - μ_n) · U_n / sqrt(λ_n)) · R_n          (tokens, d_z)

U_n, λ_n: the top-d_z principal directions and variances of teacher n (whitening: every Z coordinate has unit
variance); R_n: an orthogonal rotation (Procrustes) that best matches teacher n's whitened coordinates to the
reference teacher's (n = 0) on the same characters, through the token alignment. Z is therefore one space:
coordinate k means the same thing for every teacher, so one student head predicts all of them and the
per-teacher targets can be compared and fused. The maps are buffers, never trained: a frozen, whitened target
cannot collapse (a constant student prediction has error d_z per token).
"""

from __future__ import annotations

import torch
from torch import nn

from kvdistill.errors import KvdistillError


def kv_features(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """keys, values (B, H, T, D) -> per-token features (B, T, 2·H·D)."""
    B, H, T, D = keys.shape
    k = keys.transpose(1, 2).reshape(B, T, H * D)
    v = values.transpose(1, 2).reshape(B, T, H * D)
    return torch.cat([k, v], dim=-1).float()


def pca_whitener(x: torch.Tensor, weight: torch.Tensor, dim: int, eps: float = 1e-6):
    """Weighted PCA whitening of samples x (N, F) with weights (N,) >= 0.

    Returns (mean (F,), proj (F, dim)) so that (x - mean) @ proj has weighted covariance ≈ identity on the
    top-`dim` principal directions. Directions with (near) zero variance are left at zero.
    """
    if x.shape[0] < 2 or float(weight.sum()) <= 0:
        raise KvdistillError(
            "the latent space needs at least two real tokens to fit on",
            "raise fusion.latent.fit_samples or use longer texts",
        )
    w = weight.double() / weight.double().sum()
    xd = x.double()
    mean = (w[:, None] * xd).sum(0)  # (F,)
    xc = (xd - mean) * w[:, None].sqrt()  # (N, F)
    # right singular vectors of the weighted, centred data = principal directions
    _, s, vh = torch.linalg.svd(xc, full_matrices=False)  # s (K,), vh (K, F)
    k = min(dim, vh.shape[0])
    var = s[:k].square()  # weighted variances (sum of w = 1)
    scale = torch.where(
        var > eps * var.max().clamp(min=eps), var.clamp(min=1e-30).rsqrt(), torch.zeros_like(var)
    )
    proj = torch.zeros(x.shape[1], dim, dtype=torch.float64)
    proj[:, :k] = vh[:k].T * scale  # (F, k)
    return mean.float(), proj.float()


def procrustes(source: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Orthogonal R (d, d) minimising Σ_i w_i ||source_i R - target_i||² for paired rows (N, d)."""
    w = weight.double()[:, None]
    m = (source.double() * w).T @ target.double()  # (d, d)
    u, _, vh = torch.linalg.svd(m)
    return (u @ vh).float()


class LatentSpace(nn.Module):
    """Frozen maps of each teacher's K/V (per student layer) into the shared space Z.

    Buffers `{teacher}.{layer}.mean` (F_n,) and `.proj` (F_n, d_z) (whitening and rotation folded together);
    `fitted` says whether `fit` has run (checkpoints carry both, so a resumed run uses the same Z).
    """

    def __init__(self, feature_dims: dict[str, dict[int, int]], dim: int):
        super().__init__()
        self.dim = dim
        self.keys_ = {}
        for teacher, layers in feature_dims.items():
            for layer, width in layers.items():
                key = f"{teacher}__{layer}"
                self.register_buffer(f"{key}__mean", torch.zeros(width))
                self.register_buffer(f"{key}__proj", torch.zeros(width, dim))
                self.keys_[(teacher, layer)] = key
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def feature_layers(self, teacher: str) -> list[int]:
        """Student layers that have a map for this teacher."""
        return sorted(layer for name, layer in self.keys_ if name == teacher)

    def encode(self, teacher: str, layer: int, features: torch.Tensor) -> torch.Tensor:
        """features (B, T, F_n) of teacher at student layer `layer` -> Z (B, T, d_z)."""
        if not bool(self.fitted):
            raise KvdistillError(
                "the latent space is used before it was fitted",
                "call Objective.prepare(records) before training (the trainer does)",
            )
        key = self.keys_[(teacher, layer)]
        mean, proj = getattr(self, f"{key}__mean"), getattr(self, f"{key}__proj")
        return (features.float() - mean) @ proj

    @torch.no_grad()
    def fit(
        self,
        samples: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]],
        pairs: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        reference: str,
    ) -> None:
        """Fit every map.

        samples[(teacher, layer)] = (features (N, F_n), weight (N,)): real tokens of the fit batch.
        pairs[(teacher, layer)] = (features of teacher (P, F_n), features of the reference teacher (P, F_0),
            weight (P,)) on P aligned token pairs; not needed for the reference teacher itself.
        """
        for (teacher, layer), (x, w) in samples.items():
            mean, proj = pca_whitener(x, w, self.dim)
            key = self.keys_[(teacher, layer)]
            getattr(self, f"{key}__mean").copy_(mean)
            getattr(self, f"{key}__proj").copy_(proj)
        for (teacher, layer), (x, x_ref, w) in pairs.items():
            if teacher == reference:
                continue
            key, ref = self.keys_[(teacher, layer)], self.keys_[(reference, layer)]
            z = (x.float() - getattr(self, f"{key}__mean")) @ getattr(self, f"{key}__proj")
            z_ref = (x_ref.float() - getattr(self, f"{ref}__mean")) @ getattr(self, f"{ref}__proj")
            rot = procrustes(z, z_ref, w)  # (d_z, d_z)
            getattr(self, f"{key}__proj").copy_(getattr(self, f"{key}__proj") @ rot)
        self.fitted.fill_(True)
