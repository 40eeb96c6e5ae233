"""K/V from forward hooks on each attention's key and value modules (k_proj, or the k_norm / k_layernorm that
follows it; v_proj or v_norm; a fused qkv projection split the way the family lays it out): the key before the
rotation and the value, for every token (also past a sliding window), with no cache built and no rotation
undone. Which module and layout holds the pre-rotation key is not looked up in a table: one probe forward per
model (`hook_plan`) compares every candidate with the inverse-rotated cache and keeps the one that reproduces
it in every layer.

Notation: B batch, H_q query heads, H_kv KV heads, T time, D head dim (D_v values).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvdistill.errors import KvdistillError
from kvdistill.models.cache_source import is_latent, kv_from_cache, run_with_cache
from kvdistill.models.hf_forward import accepts
from kvdistill.models.kv_geometry import KVGeometry
from kvdistill.models.modules import decoder_attention_modules
from kvdistill.models.rope import layer_tables, probe_ids, probing, record_tables

# Child modules of an attention that may hold the pre-rotation key / the value, most specific first.
KEY_CANDIDATES = ("k_norm", "k_layernorm", "key_layernorm", "key_norm", "k_proj", "key", "k", "wk")
VALUE_CANDIDATES = ("v_norm", "v_layernorm", "value_norm", "v_proj", "value", "v", "wv")
FUSED_CANDIDATES = ("qkv_proj", "query_key_value", "c_attn", "Wqkv", "W_pack", "qkv", "kv_proj")


@dataclass(frozen=True)
class HookSource:
    """Where one layer's pre-rotation key (or its value) comes out of the model, and how to read it."""

    module: torch.nn.Module
    name: str  # the attention's child (k_proj, k_norm, qkv_proj, ...)
    layout: str  # flat (B, T, H·D) | bthd | bhtd | split:<contiguous|per_head|grouped|kv>
    part: str  # key | value

    def read(self, out: torch.Tensor, H: int, D: int, H_q: int) -> torch.Tensor | None:
        """(B, H_kv, T, D) from the module's output, None when the shape does not fit this layout."""
        return _read(out, self.layout, self.part, H, D, H_q)


def _read(out, layout: str, part: str, H: int, D: int, H_q: int) -> torch.Tensor | None:
    if not isinstance(out, torch.Tensor) or out.dim() not in (3, 4):
        return None
    B, T = out.shape[0], out.shape[1] if out.dim() == 3 else None
    if layout == "flat":
        return out.view(B, T, H, D).transpose(1, 2) if out.dim() == 3 and out.shape[-1] == H * D else None
    if layout == "bthd":
        return out.transpose(1, 2) if out.dim() == 4 and tuple(out.shape[2:]) == (H, D) else None
    if layout == "bhtd":
        return out if out.dim() == 4 and out.shape[1] == H and out.shape[3] == D else None
    if out.dim() != 3:
        return None
    width = out.shape[-1]
    split = layout.removeprefix("split:")
    j = 0 if part == "key" else 1
    if split == "contiguous" and width == (H_q + 2 * H) * D:  # [q | k | v]
        start = (H_q + j * H) * D
        return out[..., start : start + H * D].reshape(B, T, H, D).transpose(1, 2)
    if split == "per_head" and H_q == H and width == 3 * H * D:  # per head [q, k, v] (gpt_neox, bloom)
        return out.view(B, T, H, 3, D)[:, :, :, 1 + j].transpose(1, 2)
    if (
        split == "grouped" and H_q % H == 0 and width == (H_q + 2 * H) * D
    ):  # per KV group [q x g, k, v] (falcon)
        g = H_q // H
        return out.view(B, T, H, g + 2, D)[:, :, :, g + j].transpose(1, 2)
    if split == "kv" and width == 2 * H * D:  # [k | v] (jetmoe)
        return out[..., j * H * D : (j + 1) * H * D].reshape(B, T, H, D).transpose(1, 2)
    return None


_LAYOUTS = ("flat", "bthd", "bhtd")
_SPLITS = ("split:contiguous", "split:per_head", "split:grouped", "split:kv")
_PLANS: weakref.WeakKeyDictionary = (
    weakref.WeakKeyDictionary()
)  # model -> list[(key, value) HookSource] | None


def _candidates(attn, part: str) -> list[HookSource]:
    names = KEY_CANDIDATES if part == "key" else VALUE_CANDIDATES
    out = []
    for name in names + FUSED_CANDIDATES:
        module = getattr(attn, name, None)
        if isinstance(module, torch.nn.Module):
            layouts = _SPLITS if name in FUSED_CANDIDATES else _LAYOUTS
            out += [HookSource(module, name, layout, part) for layout in layouts]
    return out


def _close(a: torch.Tensor | None, b: torch.Tensor) -> bool:
    if a is None or a.shape != b.shape:
        return False
    tol = 1e-4 if b.dtype == torch.float32 else 3e-2
    scale = max(1.0, float(b.float().abs().max()))
    return float((a.float() - b.float()).abs().max()) <= tol * scale


def hook_plan(model: torch.nn.Module, geometry: KVGeometry) -> list[tuple[HookSource, HookSource]] | None:
    """Per K/V layer the modules whose outputs are its pre-rotation key and its value, or None where some
    layer has none (latent attention, a norm applied after the rotation, ...). Found once per model by a probe
    forward that compares every candidate with the keys and values taken from the cache."""
    if model in _PLANS:
        return _PLANS[model]
    attns = decoder_attention_modules(model)
    layers = [attns.get(layer) for layer in geometry.decoder_layers]
    if any(a is None or is_latent(a) for a in layers):
        _PLANS[model] = None
        return None
    candidates = [(_candidates(a, "key"), _candidates(a, "value")) for a in layers]
    seen: dict[int, torch.Tensor] = {}
    handles = []
    for module in {id(c.module): c.module for ks, vs in candidates for c in ks + vs}.values():

        def hook(m, _inp, out):
            seen[id(m)] = out

        handles.append(module.register_forward_hook(hook))
    ids = probe_ids(model, geometry)
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    if accepts(model.forward, "position_ids"):
        kwargs["position_ids"] = torch.arange(ids.shape[1], device=ids.device)[None]
    try:
        with probing(model), record_tables(model, geometry) as raw:
            _, cache = run_with_cache(model, model, geometry, kwargs)
    finally:
        for h in handles:
            h.remove()
    tables = layer_tables(model, geometry, raw, 1)
    keys, values = kv_from_cache(model, geometry, cache, tables)
    H_q = geometry.num_attention_heads
    plan = []
    for i, (key_cands, value_cands) in enumerate(candidates):
        H, D, D_v = geometry.kv_heads_of(i), geometry.head_dim_of(i), geometry.value_dim_of(i)
        key = next((c for c in key_cands if _close(c.read(seen.get(id(c.module)), H, D, H_q), keys[i])), None)
        value = next(
            (c for c in value_cands if _close(c.read(seen.get(id(c.module)), H, D_v, H_q), values[i])), None
        )
        if key is None or value is None:
            _PLANS[model] = None
            return None
        plan.append((key, value))
    _PLANS[model] = plan
    return plan


def hooked_decoder_kv(model, runner, geometry, kwargs, plan):
    """K/V from forward hooks on the key and value modules of every layer (already pre-rotation), no cache."""
    H_q = geometry.num_attention_heads
    keys, values = [None] * len(plan), [None] * len(plan)

    def store(target: list, i: int, src: HookSource, D: int) -> Callable:
        H = geometry.kv_heads_of(i)

        def hook(_m, _inp, out):  # recomputation in backward (checkpointing) overwrites with equal values
            got = src.read(out, H, D, H_q)
            if got is None:
                raise KvdistillError(
                    f"the {src.part} module {src.name} of {geometry.name} ({geometry.model_type}) gave "
                    f"{tuple(out.shape)}, which does not read as {src.layout} with H_kv={H}, D={D}",
                    "pass source='cache' to forward_kv",
                )
            target[i] = got

        return hook

    handles = []
    for i, (key_src, value_src) in enumerate(plan):
        handles.append(key_src.module.register_forward_hook(store(keys, i, key_src, geometry.head_dim_of(i))))
        handles.append(
            value_src.module.register_forward_hook(store(values, i, value_src, geometry.value_dim_of(i)))
        )
    try:
        with record_tables(model, geometry) as raw:
            out = runner(**{**kwargs, "use_cache": False})
    finally:
        for h in handles:
            h.remove()
    tables = layer_tables(model, geometry, raw, kwargs["attention_mask"].shape[0])
    return list(keys), list(values), out, tables
