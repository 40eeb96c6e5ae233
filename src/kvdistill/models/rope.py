"""Rotary position embedding: cos/sin from the model's own rotary module, rotation and its exact inverse.

Notation: B batch, H heads, T time, D head dim, R rotary dim (first R dims of a head are rotated).

cos and sin are always (B, T, R) with one entry per rotated dim, in the pairing of the style:
  rotate_half  pairs dim i with i + R/2, cos = [c, c]
  interleaved  pairs dim 2i with 2i + 1,  cos = [c0, c0, c1, c1, ...]
Taking cos/sin from the model itself (rather than recomputing from theta) keeps every scaling variant
(linear, dynamic, yarn, llama3, Gemma-3's two bases) exactly as the model applied it.
"""

from __future__ import annotations

import inspect
import weakref

import torch

from kvdistill.models.geometry import KVGeometry


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_interleaved(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def _rotate(x: torch.Tensor, style: str) -> torch.Tensor:
    return rotate_half(x) if style == "rotate_half" else rotate_interleaved(x)


def apply_rope(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    """Rotate the first R dims of k (B, H, T, D) by cos/sin (B, T, R); dims R.. pass through."""
    R = cos.shape[-1]
    cos, sin = cos[:, None].to(k.dtype), sin[:, None].to(k.dtype)  # (B, 1, T, R)
    k_rot, k_pass = k[..., :R], k[..., R:]
    return torch.cat((k_rot * cos + _rotate(k_rot, style) * sin, k_pass), dim=-1)


def invert_rope(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    """Exact inverse of `apply_rope`: rotation by -angle, divided by the scale cos² + sin².

    The division makes it exact for scaled rope too (yarn / longrope multiply cos and sin by a factor).
    """
    R = cos.shape[-1]
    cos, sin = cos[:, None].to(k.dtype), sin[:, None].to(k.dtype)  # (B, 1, T, R)
    k_rot, k_pass = k[..., :R], k[..., R:]
    unrotated = (k_rot * cos - _rotate(k_rot, style) * sin) / (cos * cos + sin * sin)
    return torch.cat((unrotated, k_pass), dim=-1)


_ROTARY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its rotary module (or None)


def rotary_module(model: torch.nn.Module) -> torch.nn.Module | None:
    """The model's shared rotary-embedding module (shallowest module named `rotary_emb`), looked up once per model."""
    if model in _ROTARY:
        return _ROTARY[model]
    found = [(name.count("."), name, m) for name, m in model.named_modules() if name.split(".")[-1] == "rotary_emb"]
    module = min(found, key=lambda x: (x[0], x[1]))[2] if found else None
    _ROTARY[model] = module
    return module


def _gptj_cos_sin(model: torch.nn.Module, positions: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Older transformers keep the table on every attention module, newer ones on one shared `rotary_emb`.
    attn = [m for name, m in model.named_modules() if hasattr(m, "embed_positions") and name.endswith("attn")]
    owner = attn[layer] if attn else rotary_module(model)
    if owner is None or not hasattr(owner, "embed_positions"):
        raise ValueError(f"no GPT-J sinusoid table (embed_positions) found in {type(model).__name__}")
    table = owner.embed_positions.to(positions.device, torch.float32)  # (P, R) = [sin | cos]
    sincos = table[positions]  # (B, T, R)
    sin, cos = sincos.chunk(2, dim=-1)  # (B, T, R/2)
    return cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)


@torch.no_grad()
def rope_cos_sin(
    model: torch.nn.Module, geometry: KVGeometry, positions: torch.Tensor, layer: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (B, T, R) in float32 that `model` used at `layer` for token positions (B, T)."""
    if geometry.rope is None:
        raise ValueError(f"{geometry.name} ({geometry.model_type}) has no rotary embedding")
    if geometry.model_type == "gptj":
        return _gptj_cos_sin(model, positions, layer)
    module = rotary_module(model)
    if module is None:
        raise ValueError(f"no rotary_emb module found in {type(model).__name__}")
    probe = torch.zeros(1, device=positions.device, dtype=torch.float32)
    layer_type = geometry.layer_types[layer] if geometry.layer_types else None
    params = inspect.signature(module.forward).parameters
    if "layer_type" in params:
        cos, sin = module(probe, positions, layer_type=layer_type)
    else:
        local = getattr(model.base_model, "rotary_emb_local", None)  # transformers 4.x Gemma-3
        use = local if (local is not None and layer_type == "sliding_attention") else module
        cos, sin = use(probe, positions)
    return cos.float(), sin.float()
