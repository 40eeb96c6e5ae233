"""Learned routers: weights over teachers from the student's hidden states.

Notation: B batch, T time, H hidden size, N teachers.

Every kind layer-normalises each token first (hidden states of different layers and models differ in
scale by orders of magnitude) and ends in a zero-initialised linear layer, so a fresh router gives
exactly uniform weights 1/N and learns away from them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kvdistill.errors import KvdistillError

__all__ = ["Router", "router_target_kl"]

ROUTER_KINDS = ("mlp", "gate", "attention")


class Router(nn.Module):
    """Weights over N teachers from hidden states (B, T, H).

    kind:
      "gate"      one linear layer on the (pooled) token: logits = W·LN(h).
      "mlp"       LN → Linear(H, hidden_dim) → GELU → Linear(hidden_dim, N).
      "attention" a learned query attends over the counted tokens (scaled dot product on LN(h)); the
                  attention-pooled vector goes through Linear(H, N). Always per sample.
    per_token: False -> one distribution per sample (B, N), from the masked mean of LN(h) over counted
               tokens ("mlp", "gate") or from attention pooling; True -> one per token (B, T, N)
               ("mlp", "gate" only), where uncounted tokens get uniform weights.
    hidden_dim: width of the "mlp" hidden layer (default min(H, 256)).
    """

    def __init__(
        self,
        hidden_size: int,
        num_teachers: int,
        kind: str = "mlp",
        per_token: bool = False,
        hidden_dim: int | None = None,
    ):
        super().__init__()
        if kind not in ROUTER_KINDS:
            raise KvdistillError(f"router kind '{kind}' is unknown", f"use one of {', '.join(ROUTER_KINDS)}")
        if hidden_size < 1 or num_teachers < 1:
            raise KvdistillError(
                f"hidden_size ({hidden_size}) and num_teachers ({num_teachers}) must be >= 1",
                "build the router from the student's hidden size and the teacher count",
            )
        if kind == "attention" and per_token:
            raise KvdistillError(
                "the attention router pools over tokens, so it cannot be per_token",
                "set fusion.router.per_token: false, or use kind 'mlp' or 'gate'",
            )
        self.hidden_size, self.num_teachers, self.kind, self.per_token = (
            hidden_size,
            num_teachers,
            kind,
            per_token,
        )
        self.norm = nn.LayerNorm(hidden_size)
        if kind == "mlp":
            width = hidden_dim or min(hidden_size, 256)
            self.head = nn.Sequential(
                nn.Linear(hidden_size, width), nn.GELU(), nn.Linear(width, num_teachers)
            )
        else:
            self.head = nn.Sequential(nn.Linear(hidden_size, num_teachers))
        if kind == "attention":
            self.query = nn.Parameter(torch.randn(hidden_size) / math.sqrt(hidden_size))  # (H,)
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """hidden (B, T, H), mask (B, T) with 1 = counted (None: all) -> weights (B, N) or (B, T, N), sum
        1."""
        if hidden.dim() != 3 or hidden.shape[-1] != self.hidden_size:
            raise KvdistillError(
                f"hidden {tuple(hidden.shape)} must be (B, T, {self.hidden_size})",
                "pass the student's hidden states of the layer the router was built for",
            )
        B, T, _ = hidden.shape
        if mask is None:
            counted = torch.ones(B, T, dtype=torch.bool, device=hidden.device)
        elif tuple(mask.shape) != (B, T):
            raise KvdistillError(
                f"mask {tuple(mask.shape)} does not match hidden {tuple(hidden.shape)}",
                f"pass the ({B}, {T}) attention mask of the same batch",
            )
        else:
            counted = mask != 0
        x = self.norm(hidden.to(self.norm.weight.dtype))  # (B, T, H)
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        if self.per_token:
            logits = self.head(x)  # (B, T, N)
            logits = torch.where(counted[..., None], logits, zero)  # uncounted tokens: uniform
            return torch.softmax(logits, dim=-1)
        if self.kind == "attention":
            scores = (x @ self.query) / math.sqrt(self.hidden_size)  # (B, T)
            scores = scores.masked_fill(~counted, float("-inf"))
            attn = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # (B, T); all-masked rows -> 0
            pooled = (attn[..., None] * x).sum(1)  # (B, H)
        else:
            pooled = torch.where(counted[..., None], x, zero).sum(1)  # (B, H)
            pooled = pooled / counted.sum(1, keepdim=True).clamp(min=1).to(x.dtype)
        return torch.softmax(self.head(pooled), dim=-1)  # (B, N)


def router_target_kl(
    weights: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-12
) -> torch.Tensor:
    """Mean KL(target || weights) in nats: the loss that trains a router toward target weights (0-dim
    float32).

    weights: the router's (B, N) per sample or (B, T, N) per token; target: (B, N) per sample (a per-token
    router's every token is pulled toward its sample's target) or (B, T, N). mask (B, T), per-token weights
    only: 1 = counted; a sample's value is the mean over its counted tokens, the result the mean over samples.
    The target carries no gradient.
    """
    if (
        weights.dim() not in (2, 3)
        or target.dim() not in (2, weights.dim())
        or target.shape[-1] != weights.shape[-1]
    ):
        raise KvdistillError(
            f"router weights {tuple(weights.shape)} and target {tuple(target.shape)} do not fit",
            "pass weights (B, N) or (B, T, N) and a target (B, N) or shaped like the weights",
        )
    t = target.detach().float()
    if weights.dim() == 3 and t.dim() == 2:
        t = t[:, None].expand_as(weights)  # (B, T, N)
    if tuple(t.shape) != tuple(weights.shape):
        raise KvdistillError(
            f"router weights {tuple(weights.shape)} and target {tuple(target.shape)} do not fit",
            "pass a target of the weights' batch (and tokens)",
        )
    kl = (t * (torch.log(t.clamp(min=eps)) - torch.log(weights.float().clamp(min=eps)))).sum(
        -1
    )  # (B,) or (B, T)
    if kl.dim() == 1:
        return kl.mean()
    B, T = kl.shape
    counted = torch.ones(B, T, device=kl.device) if mask is None else (mask != 0).float()  # (B, T)
    if tuple(counted.shape) != (B, T):
        raise KvdistillError(
            f"mask {tuple(counted.shape)} does not match weights {tuple(weights.shape)}",
            f"pass the ({B}, {T}) attention mask of the same batch",
        )
    per_sample = (kl * counted).sum(1) / counted.sum(1).clamp(min=1.0)  # (B,)
    return per_sample.mean()
