"""KV geometry of a model: what its cache looks like and how positions enter the keys.

Notation: L K/V layers, H query heads, H_kv KV heads, D head dim (keys), D_v value head dim, R rotary dim.

Derived, not looked up: the config says what it says (sizes, `rope_parameters` per layer type, the layer types
transformers builds its cache from); the model's own modules fill in the rest (each attention module's
`head_dim`, its key projection's `out_features / D` for H_kv, `use_rope`, the rotary dims it keeps), and the
family's modeling code says how pairs of dims are rotated (its `rotate_half` is called on a probe vector). A
config alone is turned into a model skeleton on the meta device (no memory, no weights), so the geometry of a
config and of the model loaded from it are the same by construction.

L counts the layers that hold K/V: hybrid models (attention + state-space / linear-attention layers) list
theirs in `attention_layers`, and layers that reuse another layer's K/V (Gemma-3n/4 KV sharing) are left out.

`geometry_of` derives a geometry once per model object and once per config content (its JSON): every later
call for the same model, or for an equal config, is answered from memory (a changed config is derived again).
"""

from __future__ import annotations

import threading
import weakref
from collections import Counter
from dataclasses import replace

import torch

from kvdistill.errors import KvdistillError
from kvdistill.models.hf_config import (
    as_int,
    cache_layer_types,
    config_attr,
    first_attr,
    is_encoder_config,
    rope_params,
    text_config,
)
from kvdistill.models.kv_geometry import KV_LAYER_TYPES, SLIDING_LAYER_TYPES, KVGeometry, RopeSpec
from kvdistill.models.modules import (
    NOT_KV_ATTENTION,
    decoder_attention_modules,
    has_kv_blocks,
    has_rotary,
    skeleton,
)
from kvdistill.models.rotation import rotation_of_code

# Families whose K/V cannot be derived from the generic rules, each with the reason.
ALIBI_FAMILIES = frozenset({"bloom"})  # bloom: ALiBi always, and its config has no flag saying so
# flint: only its sliding-window layers rotate (modeling_flint: `if self.sliding_window is not None`), its
# full layers are NoPE, and neither the config nor the modules say so
ROPE_ONLY_ON_SLIDING = frozenset({"flint"})


def _kv_projection(attn: torch.nn.Module) -> torch.nn.Module | None:
    for name in ("k_proj", "key", "k", "wk"):
        module = getattr(attn, name, None)
        if isinstance(getattr(module, "out_features", None), int):
            return module
    return None


def _layer_shape(attn: torch.nn.Module | None, config, heads: int, hidden: int) -> tuple[int, int, int]:
    """(H_kv, D, D_v) of one attention layer: the module's own attributes and projection shapes first."""
    if attn is not None and hasattr(attn, "kv_b_proj") and as_int(getattr(attn, "qk_nope_head_dim", None)):
        # multi-head latent attention: the cache holds a latent; expand_kv gives per-head K (nope | rope) and
        # V
        n = as_int(getattr(attn, "num_heads", None)) or heads
        return n, attn.qk_nope_head_dim + attn.qk_rope_head_dim, attn.v_head_dim
    D = (
        as_int(getattr(attn, "head_dim", None))
        or as_int(first_attr(config, "head_dim", "attention_head_dim", "dim_head"))
        or hidden // heads
    )
    n = as_int(getattr(attn, "num_heads", None)) or heads
    k_proj = _kv_projection(attn) if attn is not None else None
    if k_proj is not None and k_proj.out_features % D == 0:
        H_kv = k_proj.out_features // D
    elif as_int(getattr(attn, "num_key_value_heads", None)):
        H_kv = attn.num_key_value_heads
    elif as_int(getattr(attn, "num_key_value_groups", None)):
        H_kv = n // attn.num_key_value_groups
    elif config_attr(config, "multi_query") and not config_attr(config, "new_decoder_architecture"):
        H_kv = 1  # falcon / gpt_bigcode multi-query
    else:
        H_kv = int(first_attr(config, "num_key_value_heads", "num_kv_heads", "n_head_kv", default=n))
    v_proj = getattr(attn, "v_proj", None) if attn is not None else None
    D_v = D
    if isinstance(getattr(v_proj, "out_features", None), int) and v_proj.out_features % H_kv == 0:
        D_v = v_proj.out_features // H_kv
    return H_kv, D, D_v


def _inv_freq_widths(model: torch.nn.Module) -> dict[str | None, int]:
    """R read off the model-level rotary module's frequency buffers (2 per frequency): keyed by layer type
    where the module keeps one buffer per type (`sliding_attention_inv_freq`), by None for a single
    `inv_freq`. Empty when there are several rotary modules of different widths, or none."""
    widths: dict[str | None, int] = {}
    for name, module in model.named_modules():
        lowered = name.lower()
        if "rotary" not in type(module).__name__.lower() or any(
            w in lowered for w in NOT_KV_ATTENTION + ("attn",)
        ):
            continue
        for buffer, tensor in module.named_buffers(recurse=False):
            if buffer.endswith("inv_freq") and tensor.dim() == 1:
                key = buffer.removesuffix("inv_freq").removesuffix("_") or None
                if widths.get(key, 2 * tensor.numel()) != 2 * tensor.numel():
                    return {}
                widths[key] = 2 * tensor.numel()
    return widths


def _rotary_dim(attn, config, params: dict, D: int, table_width: int | None) -> int:
    if attn is not None and as_int(getattr(attn, "qk_rope_head_dim", None)) and hasattr(attn, "kv_b_proj"):
        return attn.qk_rope_head_dim
    for name in ("rotary_ndims", "rotary_dim"):
        value = as_int(getattr(attn, name, None))
        if value:
            return value
    if table_width:  # the frequencies the rotary module really holds
        return table_width
    if params.get("rope_type") == "proportional":  # the table spans D; the unrotated share has zero frequency
        return D
    factor = first_attr(attn, "partial_rotary_factor") if attn is not None else None
    factor = factor or params.get("partial_rotary_factor")
    if factor is None and as_int(config_attr(config, "rotary_dim", None)):
        return config.rotary_dim  # gptj / codegen
    return int(D * (factor or 1.0))


def _uses_rope(attn, config, layer: int, layer_type: str) -> bool:
    if (
        config_attr(config, "model_type", None) in ROPE_ONLY_ON_SLIDING
        and layer_type not in SLIDING_LAYER_TYPES
    ):
        return False
    if attn is not None and getattr(attn, "use_rope", True) in (False, 0):
        return False  # llama4 / smollm3 NoPE layers
    params = config_attr(config, "rope_parameters", None)
    if isinstance(params, dict) and layer_type in params and params[layer_type] is None:
        return False  # beam: rope parameters per layer type, None = NoPE
    thetas = config_attr(config, "layer_rope_theta", None)  # granite_swa: a base per layer, 0 = NoPE
    return not (isinstance(thetas, list | tuple) and not thetas[layer])


def _rope_spec(
    model, config, attns: dict, decoder_layers: list[int], kv_types: list[str], dims: list[int]
) -> RopeSpec | None:
    if not has_rotary(model):
        return None
    rotated = [
        i
        for i, layer in enumerate(decoder_layers)
        if _uses_rope(attns.get(layer), config, layer, kv_types[i])
    ]
    if not rotated:
        return None
    attn0 = attns.get(decoder_layers[rotated[0]])
    module_name = type(attn0).__module__ if attn0 is not None else type(model).__module__
    found = rotation_of_code(module_name) or rotation_of_code(type(model).__module__)
    if found is None:
        raise KvdistillError(
            f"{type(model).__name__} rotates its keys, but {module_name} defines no rotate function we can "
            "read",
            "capture it with a transformers version whose modeling code defines rotate_half, or file an "
            "issue",
        )
    style, sign = found
    per_layer = [rope_params(config, t) if i in rotated else {} for i, t in enumerate(kv_types)]
    thetas = [float(p.get("rope_theta") or 10000.0) for p in per_layer]
    layer_thetas = config_attr(config, "layer_rope_theta", None)
    if isinstance(layer_thetas, list | tuple):
        thetas = [float(layer_thetas[layer] or 0.0) for layer in decoder_layers]
    widths = _inv_freq_widths(model)
    rdims = [
        _rotary_dim(
            attns.get(layer), config, per_layer[i], dims[i], widths.get(kv_types[i], widths.get(None))
        )
        for i, layer in enumerate(decoder_layers)
    ]
    rotated_dims = [rdims[i] for i in rotated]
    attn_offset = as_int(getattr(attn0, "qk_nope_head_dim", None)) if hasattr(attn0, "kv_b_proj") else None
    first = per_layer[rotated[0]]
    scaling = {k: v for k, v in first.items() if k not in {"rope_theta", "partial_rotary_factor"}}
    scaling = None if scaling.get("rope_type", "default") == "default" else scaling
    rotated_thetas = [thetas[i] for i in rotated]
    return RopeSpec(
        style=style,
        rotary_dim=rotated_dims[0],
        theta=rotated_thetas[0] if len(set(rotated_thetas)) == 1 else thetas,
        scaling=scaling,
        offset=attn_offset or 0,
        sign=sign,
        unrotated_layers=[i for i in range(len(decoder_layers)) if i not in rotated],
        layer_rotary_dims=None if len(set(rotated_dims)) == 1 else rdims,
    )


def _uses_alibi(config, model_type: str) -> bool:
    attn_config = config_attr(config, "attn_config", None)  # mpt keeps it in a sub-config
    if isinstance(attn_config, dict):
        return bool(attn_config.get("alibi"))
    return (
        model_type in ALIBI_FAMILIES
        or config_attr(config, "alibi", None) is True
        or (getattr(attn_config, "alibi", None) is True)
    )


def _position_kind(model, config, model_type: str, rope: RopeSpec | None) -> str:
    if rope is not None:
        return "rotary"
    if _uses_alibi(config, model_type):
        return "alibi"
    names = ("wpe", "embed_positions", "position_embeddings", "pos_emb", "positions_embed", "embed_position")
    if any(name.split(".")[-1] in names for name, _ in model.named_modules()):
        return "learned"
    return "none"


_BY_MODEL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (config key, KVGeometry)
_BY_CONFIG: dict[
    str, KVGeometry
] = {}  # config key -> KVGeometry (at most _CONFIGS_KEPT, oldest dropped first)
_CONFIGS_KEPT = 64
_LOCK = threading.Lock()  # teachers captured ahead on threads may ask at once


def _config_key(config) -> str | None:
    """What a geometry of `config` depends on: its class and full JSON (with `_name_or_path`, the default
    name); None for a config that does not serialise (derived every time)."""
    try:
        return (
            f"{type(config).__module__}.{type(config).__qualname__}\n{config.to_json_string(use_diff=False)}"
        )
    except Exception:  # not a transformers config, or a value JSON cannot hold
        return None


def geometry_of(model_or_config, name: str | None = None) -> KVGeometry:
    """The KV geometry of a model or config (`name`: the geometry's name, default the config's
    `_name_or_path`); raises for a model with no attention layers to capture.

    Derived once per model object (from its own modules) and once per config content (from a meta-device
    skeleton, which takes about a second for a 30-layer model): later calls are answered from memory, so
    callers that hold no geometry may ask again. A model whose config changed since is derived again."""
    given_model = isinstance(model_or_config, torch.nn.Module)
    key = _config_key(getattr(model_or_config, "config", model_or_config))
    if given_model:
        held = _BY_MODEL.get(model_or_config)
        geometry = held[1] if held is not None and key is not None and held[0] == key else None
    else:
        geometry = _BY_CONFIG.get(key) if key is not None else None
    if geometry is None:
        geometry = _derive(model_or_config)
        with _LOCK:
            if key is not None and given_model:
                _BY_MODEL[model_or_config] = (key, geometry)
            elif key is not None:
                _BY_CONFIG[key] = geometry
                while len(_BY_CONFIG) > _CONFIGS_KEPT:
                    del _BY_CONFIG[next(iter(_BY_CONFIG))]
    return replace(geometry, name=name) if name else geometry


def _derive(model_or_config) -> KVGeometry:
    """The geometry of a model (its modules) or of a config (its meta-device skeleton's modules)."""
    given_model = isinstance(model_or_config, torch.nn.Module)
    full_config = getattr(model_or_config, "config", model_or_config)
    config = text_config(full_config)
    model_type = config_attr(config, "model_type", None) or getattr(full_config, "model_type", None)
    model = model_or_config if given_model else skeleton(full_config)
    heads = int(
        first_attr(
            config,
            "num_attention_heads",
            "n_head",
            "num_heads",
            "decoder_attention_heads",
            "attention_heads",
            "n_heads",
            default=1,
        )
    )
    hidden = int(first_attr(config, "hidden_size", "n_embd", "d_model", "dim", "embed_dim"))
    depth = int(
        first_attr(config, "num_hidden_layers", "n_layer", "num_layers", "decoder_layers", "n_layers")
    )
    vocab = int(first_attr(config, "vocab_size", default=0))
    max_positions = first_attr(
        config, "max_position_embeddings", "n_positions", "max_seq_len", "max_sequence_length"
    )
    experts = first_attr(config, "num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
    experts = experts if as_int(experts) else None
    if is_encoder_config(config):
        H_kv, D, _ = _layer_shape(None, config, heads, hidden)
        return KVGeometry(
            name=config_attr(config, "_name_or_path", "") or model_type,
            model_type=model_type,
            num_layers=depth,
            num_attention_heads=heads,
            num_kv_heads=H_kv,
            head_dim=hidden // heads,
            hidden_size=hidden,
            vocab_size=vocab,
            is_encoder=True,
            sliding_window=None,
            layer_types=["full_attention"] * depth,
            rope=None,
            position_kind="learned",
            max_positions=max_positions,
            num_experts=experts,
        )
    cache_types, cache_kwargs = cache_layer_types(config, depth)
    attns = decoder_attention_modules(model)
    decoder_layers = [i for i, t in enumerate(cache_types) if t in KV_LAYER_TYPES]
    if not decoder_layers or (not attns and not has_kv_blocks(model)):
        raise KvdistillError(
            f"{type(model).__name__} ({model_type}) has no attention layers to capture: its layers are "
            f"{', '.join(f'{n}x {t}' for t, n in Counter(cache_types).items())} and none of them keeps keys "
            "and "
            "values in a cache",
            "use a family with attention layers (a pure state-space model such as mamba has no K/V to "
            "distill)",
        )
    attn_heads = [as_int(getattr(attns.get(layer), "num_heads", None)) for layer in decoder_layers]
    if all(attn_heads):  # per-layer configs (dots3) may refuse a global num_attention_heads
        heads = Counter(attn_heads).most_common(1)[0][0]
    shapes = [_layer_shape(attns.get(layer), config, heads, hidden) for layer in decoder_layers]
    kv_heads = [s[0] for s in shapes]
    dims = [s[1] for s in shapes]
    value_dims = [s[2] for s in shapes]
    kv_types = [cache_types[i] for i in decoder_layers]
    windows = {
        int(cache_kwargs[i]["sliding_window"])
        for i in decoder_layers
        if cache_types[i] in SLIDING_LAYER_TYPES and as_int(cache_kwargs[i].get("sliding_window"))
    }
    head_dim = Counter(dims).most_common(1)[0][0]
    # ALiBi biases replace the rotation (falcon builds its rotary module all the same, and leaves it unused)
    rope = (
        None
        if _uses_alibi(config, model_type)
        else _rope_spec(model, config, attns, decoder_layers, kv_types, dims)
    )
    return KVGeometry(
        name=config_attr(config, "_name_or_path", "") or model_type,
        model_type=model_type,
        num_layers=len(decoder_layers),
        num_attention_heads=heads,
        num_kv_heads=Counter(kv_heads).most_common(1)[0][0],
        head_dim=head_dim,
        hidden_size=hidden,
        vocab_size=vocab,
        is_encoder=False,
        sliding_window=max(windows) if windows else None,
        layer_types=kv_types,
        rope=rope,
        position_kind=_position_kind(model, config, model_type, rope),
        max_positions=max_positions,
        num_experts=experts,
        attention_layers=None if decoder_layers == list(range(depth)) else decoder_layers,
        num_hidden_layers=None if len(decoder_layers) == depth else depth,
        value_head_dim=None if value_dims == dims else (value_dims[0] if len(set(value_dims)) == 1 else None),
        layer_head_dims=None if len(set(dims)) == 1 else dims,
        layer_kv_heads=None if len(set(kv_heads)) == 1 else kv_heads,
    )
