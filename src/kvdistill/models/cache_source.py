"""K/V from the model's own cache: the model runs with `use_cache=True` (where layers slide, a
`DynamicCache(config=...)` whose sliding layers record their past, so no token is dropped), and the keys are
taken back through `invert_rope` with the tables the model handed each attention. Multi-head latent attention
(DeepSeek-V2/V3 and kin) caches a latent and the shared rotated key: the rotation is undone on the latter and
the attention's own `expand_kv` gives per-head K and V.

Notation: B batch, H_kv KV heads, T time, D head dim (D_v values), r latent width, R rotary dim.
"""

from __future__ import annotations

from kvdistill.errors import KvdistillError
from kvdistill.models.hf_forward import cache_argument, cache_layers, returned_cache
from kvdistill.models.kv_geometry import SLIDING_LAYER_TYPES, KVGeometry
from kvdistill.models.modules import decoder_attention_modules
from kvdistill.models.rope import invert_rope, layer_tables, record_tables


def _fresh_cache(model, geometry: KVGeometry):
    """A cache that keeps every token, or None to let the model build its own (`use_cache=True`).

    Only sliding / chunked layers drop tokens (the last window is all transformers keeps); for them a
    `DynamicCache(config=...)` is built, whose sliding layers record their past instead."""
    if not any(t in SLIDING_LAYER_TYPES or t == "chunked_attention" for t in geometry.layer_types):
        return None
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for layer in cache.layers:
        if hasattr(layer, "activate_past_recording"):
            layer.activate_past_recording()
    return cache


def run_with_cache(model, runner, geometry, kwargs):
    """`runner(**kwargs)` with the cache on: (its output, the cache it filled)."""
    cache = _fresh_cache(model, geometry)
    extra = {"use_cache": True}
    if cache is not None:
        extra[cache_argument(runner)] = cache
    out = runner(**{**kwargs, **extra})
    found = returned_cache(out)
    if found is None:
        raise KvdistillError(
            f"{geometry.name} ({geometry.model_type}) returned no K/V cache: its attention keeps none, so "
            "there are "
            "no attention layers to capture",
            "use a family whose attention keeps a K/V cache (state-space and recurrent models have none)",
        )
    return out, found


def is_latent(attn) -> bool:
    """Multi-head latent attention: the cache holds (latent, shared rotated key), `expand_kv` makes K and
    V."""
    return attn is not None and callable(getattr(attn, "expand_kv", None))


def kv_from_cache(model, geometry, cache, tables):
    """Per K/V layer (keys pre-rotation (B, H_kv, T, D), values (B, H_kv, T, D_v)) from a filled cache."""
    layers = cache_layers(cache)
    attns = decoder_attention_modules(model)
    rope = geometry.rope
    keys, values = [], []
    for i, layer in enumerate(geometry.decoder_layers):
        k, v = layers[layer]
        if k is None or v is None:
            raise KvdistillError(
                f"{geometry.name} ({geometry.model_type}) cache layer {layer} holds no keys",
                "the attention layers derived for this family are wrong; file an issue with the model id",
            )
        attn = attns.get(layer)
        if is_latent(attn):
            latent, k_rot = k, v  # (B, 1, T, r), (B, 1, T, R) rotated
            if tables[i] is not None:
                k_rot = invert_rope(k_rot.float(), *tables[i], rope.style).to(k_rot.dtype)
            k, v = attn.expand_kv(latent, k_rot)  # (B, H, T, D), (B, H, T, D_v)
        elif tables[i] is not None:
            k = invert_rope(k.float(), *tables[i], rope.style, rope.offset).to(k.dtype)
        keys.append(k)
        values.append(v)
    return keys, values


def cached_decoder_kv(model, runner, geometry, kwargs):
    """K/V from the model's own cache, keys taken back through the inverse rotation."""
    with record_tables(model, geometry) as raw:
        out, cache = run_with_cache(model, runner, geometry, kwargs)
    tables = layer_tables(model, geometry, raw, kwargs["attention_mask"].shape[0])
    keys, values = kv_from_cache(model, geometry, cache, tables)
    return keys, values, out, tables
