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
"""

from __future__ import annotations

import importlib
import inspect
import logging
import sys
import weakref
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from kvdistill.errors import KvdistillError

log = logging.getLogger(__name__)

# Cache layer types (transformers.cache_utils) that hold per-token keys and values.
KV_LAYER_TYPES = frozenset(
    {"full_attention", "sliding_attention", "chunked_attention", "indexed_attention", "hybrid", "hybrid_sliding"}
)
SLIDING_LAYER_TYPES = frozenset({"sliding_attention", "hybrid_sliding"})
# Words in the class names of attention-looking modules that are not softmax attention over cached K/V.
_NOT_KV_ATTENTION = ("linear", "lightning", "delta", "mamba", "cross", "vision", "audio")
# Child names under which attention modules keep their key / value projections (one per family style).
KEY_MODULES = ("k_proj", "key", "k", "wk", "c_attn", "qkv_proj", "query_key_value", "Wqkv", "W_pack", "qkv",
               "kv_proj", "kv_a_proj_with_mqa")
# Families whose K/V cannot be derived from the generic rules, each with the reason.
ALIBI_FAMILIES = frozenset({"bloom"})  # bloom: ALiBi always, and its config has no flag saying so
# flint: only its sliding-window layers rotate (modeling_flint: `if self.sliding_window is not None`), its full
# layers are NoPE, and neither the config nor the modules say so
ROPE_ONLY_ON_SLIDING = frozenset({"flint"})


@dataclass(frozen=True)
class RopeSpec:
    style: Literal["rotate_half", "interleaved"]
    """rotate_half pairs dims (i, i + R/2) (llama & co); interleaved pairs (2i, 2i + 1) (gptj, cohere, glm)."""
    rotary_dim: int
    """R: dims [offset, offset + R) of each key head are rotated (R < D for partial rotary)."""
    theta: float | list[float]
    """Base frequency; a per-layer list when layers differ (Gemma-3: 10k local, 1M global)."""
    scaling: dict[str, Any] | None = None
    offset: int = 0
    """First rotated dim of a key head: 0, or qk_nope_head_dim for multi-head latent attention (DeepSeek)."""
    sign: int = 1
    """-1 where the family rotates by minus the angle (nanochat's rotate_half is (x2, -x1))."""
    unrotated_layers: list[int] = field(default_factory=list)
    """K/V layers whose keys are not rotated at all (NoPE layers of Llama-4, SmolLM3, Granite-SWA)."""
    layer_rotary_dims: list[int] | None = None
    """R per K/V layer where layers differ; None when every rotated layer has `rotary_dim`."""

    def theta_of(self, layer: int) -> float:
        return self.theta[layer] if isinstance(self.theta, list) else self.theta

    def rotary_dim_of(self, layer: int) -> int:
        return self.layer_rotary_dims[layer] if self.layer_rotary_dims else self.rotary_dim

    def rotates(self, layer: int) -> bool:
        return layer not in self.unrotated_layers


@dataclass(frozen=True)
class KVGeometry:
    name: str
    model_type: str
    num_layers: int
    """L: layers holding K/V (keys/values of a capture have L entries)."""
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    is_encoder: bool
    sliding_window: int | None
    layer_types: list[str] = field(default_factory=list)
    """Per K/V layer: the cache layer type (full_attention, sliding_attention, chunked_attention, ...)."""
    rope: RopeSpec | None = None
    position_kind: Literal["rotary", "learned", "alibi", "none"] = "rotary"
    max_positions: int | None = None
    num_experts: int | None = None
    attention_layers: list[int] | None = None
    """Decoder-layer index of each K/V layer; None when layer l of the stack is K/V layer l for every l."""
    num_hidden_layers: int | None = None
    """Depth of the decoder stack where it differs from L (hybrids, KV sharing); None when equal."""
    value_head_dim: int | None = None
    """D_v where values are not D wide (multi-head latent attention); None when equal to head_dim."""
    layer_head_dims: list[int] | None = None
    """D per K/V layer where layers differ (Gemma-4 global layers); None when every layer has head_dim."""
    layer_kv_heads: list[int] | None = None
    """H_kv per K/V layer where layers differ (MiMo-V2-Flash sliding layers); None when every layer has
    num_kv_heads. Layer maps and head alignment assume one H_kv: such teachers capture, but do not align yet."""

    @property
    def decoder_layers(self) -> list[int]:
        """Decoder-layer index of each K/V layer."""
        return list(self.attention_layers) if self.attention_layers is not None else list(range(self.num_layers))

    def kv_heads_of(self, layer: int) -> int:
        return self.layer_kv_heads[layer] if self.layer_kv_heads else self.num_kv_heads

    def head_dim_of(self, layer: int) -> int:
        return self.layer_head_dims[layer] if self.layer_head_dims else self.head_dim

    def value_dim_of(self, layer: int) -> int:
        if self.value_head_dim is not None:
            return self.value_head_dim
        return self.head_dim_of(layer)

    def kv_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """K and V of every layer for one token: Σ_l H_kv,l·(D_l + D_v,l)·bytes (2·L·H_kv·D·bytes when uniform)."""
        per_layer = (self.kv_heads_of(i) * (self.head_dim_of(i) + self.value_dim_of(i)) for i in range(self.num_layers))
        return sum(per_layer) * bytes_per_element

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["kv_bytes_per_token_bf16"] = self.kv_bytes_per_token(2)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KVGeometry:
        data = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if data.get("rope") is not None:
            rope = {k: v for k, v in data["rope"].items() if k in RopeSpec.__dataclass_fields__}
            data["rope"] = RopeSpec(**rope)
        return cls(**data)


# ------------------------------------------------------------------------------------------------ config
def _get(obj, name: str, default=None):
    """getattr that reads a config attribute transformers refuses to give globally (per-layer configs) as default."""
    try:
        return getattr(obj, name, default)
    except Exception:  # AmbiguousGlobalPerLayerAttributeError: the value varies per layer
        return default


def _first(config, *names, default=None):
    for n in names:
        value = _get(config, n)
        if value is not None:
            return value
    return default


def _int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def text_config(model_or_config):
    """The decoder (text) config of a model or config."""
    config = getattr(model_or_config, "config", model_or_config)
    if hasattr(config, "get_text_config"):
        try:
            return config.get_text_config(decoder=True)
        except TypeError:  # transformers 4.x without the decoder flag
            return config.get_text_config()
    return config


def _rope_params(config, layer_type: str | None) -> dict[str, Any]:
    """The rope parameters of one layer type, in one layout whatever the transformers version."""
    params = _get(config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        if layer_type is not None and isinstance(params.get(layer_type), dict):
            return dict(params[layer_type])
        if "rope_theta" in params or "rope_type" in params:
            return dict(params)
        nested = [v for v in params.values() if isinstance(v, dict)]
        if nested:  # keyed by layer type, but not by this one (chunked_attention -> the first given)
            return dict(nested[0])
    # transformers 4.x layout
    theta = _first(config, "rope_theta", "rotary_emb_base", default=10000.0)
    if layer_type == "sliding_attention" and _get(config, "rope_local_base_freq", None) is not None:
        theta = config.rope_local_base_freq
    out = {"rope_theta": theta, "rope_type": "default"}
    scaling = _get(config, "rope_scaling", None)
    if isinstance(scaling, dict) and layer_type != "sliding_attention":
        out.update(scaling)
        out["rope_type"] = scaling.get("rope_type", scaling.get("type", "default"))
        out["rope_theta"] = theta
    for key in ("partial_rotary_factor", "rotary_pct"):
        if _get(config, key, None) is not None:
            out["partial_rotary_factor"] = _get(config, key)
    return out


def _cache_layer_types(config, num_hidden_layers: int) -> tuple[list[str], list[dict]]:
    """Per decoder layer, the cache layer type transformers builds (and its kwargs, e.g. sliding_window)."""
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs

        types, kwargs = get_layer_types_and_kwargs(config)
        types, kwargs = list(types), list(kwargs)
        # the helper's return changed across 5.x (5.17 gives no per-layer kwargs dicts): only this shape is read
        if len(types) == len(kwargs) and all(isinstance(t, str) for t in types) and all(
                isinstance(k, dict) for k in kwargs):
            return types, kwargs
        raise TypeError("unexpected get_layer_types_and_kwargs result")
    except Exception:  # older transformers, or a config without per-layer sub-configs
        types = _get(config, "layer_types", None) or ["full_attention"] * num_hidden_layers
        window = _get(config, "sliding_window", None)
        kwargs = [{"sliding_window": window} if t in SLIDING_LAYER_TYPES else {} for t in types]
        return list(types), kwargs


# ------------------------------------------------------------------------------------------------ modules
def skeleton(config) -> torch.nn.Module:
    """The model a config describes, built on the meta device: modules and shapes, no memory, no weights."""
    from transformers import AutoModel, AutoModelForCausalLM

    if _is_encoder(text_config(config)):
        classes = (AutoModel,)
    elif _get(config, "is_encoder_decoder", False):  # t5 & co: only their decoder-only causal-LM classes
        classes = (AutoModelForCausalLM,)
    else:  # a text sub-config (emu3_text_model) may have a base model class only
        classes = (AutoModelForCausalLM, AutoModel)
    errors = []
    for cls in classes:
        try:
            with torch.device("meta"):
                return cls.from_config(config)
        except (ValueError, KeyError) as err:
            errors.append(str(err).splitlines()[0][:160])
    own = _own_causal_lm_class(config)
    if own is not None:
        with torch.device("meta"):
            return own(config)
    model_type = _get(config, "model_type", None)
    raise KvdistillError(
        f"model family '{model_type}' is not supported for KV capture: transformers builds no "
        f"{'encoder' if len(classes) == 1 else 'causal-LM'} model from its config ({errors[0]})",
        "use a decoder family with a causal-LM class in transformers (llama, qwen2, gemma3, mistral, phi3, "
        "gpt_neox, ...) or a BERT-style encoder",
    )


def _own_causal_lm_class(config):
    """The *ForCausalLM class of the config's own modeling module that takes this config class (emu3, mllama:
    their causal LM takes the text sub-config, which the auto mapping does not list)."""
    module = type(config).__module__.replace(".configuration_", ".modeling_")
    try:
        modeling = importlib.import_module(module)
    except ImportError:
        return None
    for name, cls in vars(modeling).items():
        if name.endswith("ForCausalLM") and getattr(cls, "config_class", None) is type(config):
            return cls
    return None


def _family_prefix(model: torch.nn.Module) -> str:
    """KimiLinear of KimiLinearConfig: the class names of the family's modules start with it (a wrapper such as
    PEFT keeps the config of the model it wraps)."""
    return type(getattr(model, "config", None)).__name__.removesuffix("Config")


_ATTENTIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {layer: attention module}


def decoder_attention_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Decoder-layer index -> the self-attention module of that layer (the one that writes the layer's cache).
    Found once per model (a walk over every module; every capture asks), like `hook_plan`.

    Attention modules are the ones transformers hands a `layer_idx` and a key projection; cross attention and the
    vision/audio towers of multimodal models are left out. Where a layer holds several (a hybrid layer's
    linear-attention or state-space mixer next to its softmax attention), the softmax one is kept.
    """
    cached = _ATTENTIONS.get(model)
    if cached is not None:
        return dict(cached)
    prefix = _family_prefix(model)
    found: dict[int, list[tuple[int, str, torch.nn.Module]]] = {}
    for name, module in model.named_modules():
        idx = _int(getattr(module, "layer_idx", None))
        if idx is None:
            continue
        cls = type(module).__name__.removeprefix(prefix).lower()
        if not any(word in cls for word in ("attention", "attn", "mla")):
            continue
        path = name.lower().split(".")
        if any(word in part for part in path for word in ("vision", "visual", "audio", "encoder_attn", "cross")):
            continue
        if not any(isinstance(getattr(module, k, None), torch.nn.Module) for k in KEY_MODULES):
            continue
        linear = any(word in cls for word in _NOT_KV_ATTENTION)
        found.setdefault(idx, []).append((int(linear), name, module))
    # softmax attention before linear attention, then the shallowest (a wrapper before what it wraps)
    out = {idx: min(c, key=lambda x: (x[0], x[1].count(".")))[2] for idx, c in found.items()}
    _ATTENTIONS[model] = out
    return dict(out)


def _has_rotary(model: torch.nn.Module) -> bool:
    for module in model.modules():
        cls = type(module).__name__
        if "Rotary" in cls or "RoPE" in cls or "inv_freq" in dict(module.named_buffers(recurse=False)):
            return True
    return False


# ---------------------------------------------------------------------------------------- rotation style
_PROBE = torch.arange(1.0, 9.0).view(1, 1, 1, 8)  # (B, H, T, D) = (1, 1, 1, 8)


def _classify(out: torch.Tensor) -> tuple[str, int] | None:
    x = _PROBE
    half = torch.cat((-x[..., 4:], x[..., :4]), dim=-1)  # rotate_half
    pairs = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)  # interleaved
    for style, ref in (("rotate_half", half), ("interleaved", pairs)):
        if out.shape == ref.shape and torch.equal(out, ref):
            return style, 1
        if out.shape == ref.shape and torch.equal(out, -ref):
            return style, -1
    return None


def rotation_of_code(module_name: str) -> tuple[str, int] | None:
    """(style, sign) of the rotation a modeling module applies, read by calling its own rotate function on a probe
    vector; None when the module defines none we recognise."""
    module = sys.modules.get(module_name) or importlib.import_module(module_name)
    for fn_name in ("rotate_half", "rotate_every_two", "rotate_pairwise"):
        fn = getattr(module, fn_name, None)
        if callable(fn):
            try:
                found = _classify(fn(_PROBE.clone()))
            except Exception:  # an unexpected signature
                found = None
            if found is not None:
                return found
    try:
        source = inspect.getsource(module)
    except (OSError, TypeError):
        return None
    if "view_as_complex" in source:  # freqs_cis: (x0 + i x1) * e^{i theta} rotates the pairs (2i, 2i + 1)
        return "interleaved", 1
    if "def _apply_rotary_emb" in source or "def apply_rotary_pos_emb_interleave" in source:
        # gpt-oss: first/second half chunks; DeepSeek-style interleave: even/odd slices concatenated, so the rotated
        # key (the one in the cache) is laid out as halves
        return "rotate_half", 1
    return None


# ------------------------------------------------------------------------------------------------ derive
def _is_encoder(config) -> bool:
    """A masked-LM family (BERT & co) not built as a decoder (`is_decoder=True` gives it a causal cache)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return (_get(config, "model_type", None) in MODEL_FOR_MASKED_LM_MAPPING_NAMES
            and not _get(config, "is_decoder", False) and not _get(config, "is_encoder_decoder", False))


def _kv_projection(attn: torch.nn.Module) -> torch.nn.Module | None:
    for name in ("k_proj", "key", "k", "wk"):
        module = getattr(attn, name, None)
        if isinstance(getattr(module, "out_features", None), int):
            return module
    return None


def _layer_shape(attn: torch.nn.Module | None, config, heads: int, hidden: int) -> tuple[int, int, int]:
    """(H_kv, D, D_v) of one attention layer: the module's own attributes and projection shapes first."""
    if attn is not None and hasattr(attn, "kv_b_proj") and _int(getattr(attn, "qk_nope_head_dim", None)):
        # multi-head latent attention: the cache holds a latent; expand_kv gives per-head K (nope | rope) and V
        n = _int(getattr(attn, "num_heads", None)) or heads
        return n, attn.qk_nope_head_dim + attn.qk_rope_head_dim, attn.v_head_dim
    D = (_int(getattr(attn, "head_dim", None)) or _int(_first(config, "head_dim", "attention_head_dim", "dim_head"))
         or hidden // heads)
    n = _int(getattr(attn, "num_heads", None)) or heads
    k_proj = _kv_projection(attn) if attn is not None else None
    if k_proj is not None and k_proj.out_features % D == 0:
        H_kv = k_proj.out_features // D
    elif _int(getattr(attn, "num_key_value_heads", None)):
        H_kv = attn.num_key_value_heads
    elif _int(getattr(attn, "num_key_value_groups", None)):
        H_kv = n // attn.num_key_value_groups
    elif _get(config, "multi_query") and not _get(config, "new_decoder_architecture"):
        H_kv = 1  # falcon / gpt_bigcode multi-query
    else:
        H_kv = int(_first(config, "num_key_value_heads", "num_kv_heads", "n_head_kv", default=n))
    v_proj = getattr(attn, "v_proj", None) if attn is not None else None
    D_v = D
    if isinstance(getattr(v_proj, "out_features", None), int) and v_proj.out_features % H_kv == 0:
        D_v = v_proj.out_features // H_kv
    return H_kv, D, D_v


def _inv_freq_widths(model: torch.nn.Module) -> dict[str | None, int]:
    """R read off the model-level rotary module's frequency buffers (2 per frequency): keyed by layer type where
    the module keeps one buffer per type (`sliding_attention_inv_freq`), by None for a single `inv_freq`. Empty
    when there are several rotary modules of different widths, or none."""
    widths: dict[str | None, int] = {}
    for name, module in model.named_modules():
        lowered = name.lower()
        if "rotary" not in type(module).__name__.lower() or any(w in lowered for w in _NOT_KV_ATTENTION + ("attn",)):
            continue
        for buffer, tensor in module.named_buffers(recurse=False):
            if buffer.endswith("inv_freq") and tensor.dim() == 1:
                key = buffer.removesuffix("inv_freq").removesuffix("_") or None
                if widths.get(key, 2 * tensor.numel()) != 2 * tensor.numel():
                    return {}
                widths[key] = 2 * tensor.numel()
    return widths


def _rotary_dim(attn, config, params: dict, D: int, table_width: int | None) -> int:
    if attn is not None and _int(getattr(attn, "qk_rope_head_dim", None)) and hasattr(attn, "kv_b_proj"):
        return attn.qk_rope_head_dim
    for name in ("rotary_ndims", "rotary_dim"):
        value = _int(getattr(attn, name, None))
        if value:
            return value
    if table_width:  # the frequencies the rotary module really holds
        return table_width
    if params.get("rope_type") == "proportional":  # the table spans D; the unrotated share has zero frequency
        return D
    factor = _first(attn, "partial_rotary_factor") if attn is not None else None
    factor = factor or params.get("partial_rotary_factor")
    if factor is None and _int(_get(config, "rotary_dim", None)):
        return config.rotary_dim  # gptj / codegen
    return int(D * (factor or 1.0))


def _uses_rope(attn, config, layer: int, layer_type: str) -> bool:
    if _get(config, "model_type", None) in ROPE_ONLY_ON_SLIDING and layer_type not in SLIDING_LAYER_TYPES:
        return False
    if attn is not None and getattr(attn, "use_rope", True) in (False, 0):
        return False  # llama4 / smollm3 NoPE layers
    params = _get(config, "rope_parameters", None)
    if isinstance(params, dict) and layer_type in params and params[layer_type] is None:
        return False  # beam: rope parameters per layer type, None = NoPE
    thetas = _get(config, "layer_rope_theta", None)  # granite_swa: a base per layer, 0 = NoPE
    return not (isinstance(thetas, list | tuple) and not thetas[layer])


def _rope_spec(model, config, attns: dict, decoder_layers: list[int], kv_types: list[str],
               dims: list[int]) -> RopeSpec | None:
    if not _has_rotary(model):
        return None
    rotated = [i for i, layer in enumerate(decoder_layers)
               if _uses_rope(attns.get(layer), config, layer, kv_types[i])]
    if not rotated:
        return None
    attn0 = attns.get(decoder_layers[rotated[0]])
    module_name = type(attn0).__module__ if attn0 is not None else type(model).__module__
    found = rotation_of_code(module_name) or rotation_of_code(type(model).__module__)
    if found is None:
        raise KvdistillError(
            f"{type(model).__name__} rotates its keys, but {module_name} defines no rotate function we can read",
            "capture it with a transformers version whose modeling code defines rotate_half, or file an issue",
        )
    style, sign = found
    per_layer = [_rope_params(config, t) if i in rotated else {} for i, t in enumerate(kv_types)]
    thetas = [float(p.get("rope_theta") or 10000.0) for p in per_layer]
    layer_thetas = _get(config, "layer_rope_theta", None)
    if isinstance(layer_thetas, list | tuple):
        thetas = [float(layer_thetas[layer] or 0.0) for layer in decoder_layers]
    widths = _inv_freq_widths(model)
    rdims = [_rotary_dim(attns.get(layer), config, per_layer[i], dims[i], widths.get(kv_types[i], widths.get(None)))
             for i, layer in enumerate(decoder_layers)]
    rotated_dims = [rdims[i] for i in rotated]
    attn_offset = _int(getattr(attn0, "qk_nope_head_dim", None)) if hasattr(attn0, "kv_b_proj") else None
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
    attn_config = _get(config, "attn_config", None)  # mpt keeps it in a sub-config
    if isinstance(attn_config, dict):
        return bool(attn_config.get("alibi"))
    return model_type in ALIBI_FAMILIES or _get(config, "alibi", None) is True or (
        getattr(attn_config, "alibi", None) is True)


def _position_kind(model, config, model_type: str, rope: RopeSpec | None) -> str:
    if rope is not None:
        return "rotary"
    if _uses_alibi(config, model_type):
        return "alibi"
    names = ("wpe", "embed_positions", "position_embeddings", "pos_emb", "positions_embed", "embed_position")
    if any(name.split(".")[-1] in names for name, _ in model.named_modules()):
        return "learned"
    return "none"


def geometry_of(model_or_config, name: str | None = None) -> KVGeometry:
    """The KV geometry of a model or config; raises for a model with no attention layers to capture."""
    given_model = isinstance(model_or_config, torch.nn.Module)
    full_config = getattr(model_or_config, "config", model_or_config)
    config = text_config(full_config)
    model_type = _get(config, "model_type", None) or getattr(full_config, "model_type", None)
    model = model_or_config if given_model else skeleton(full_config)
    heads = int(_first(config, "num_attention_heads", "n_head", "num_heads", "decoder_attention_heads",
                       "attention_heads", "n_heads", default=1))
    hidden = int(_first(config, "hidden_size", "n_embd", "d_model", "dim", "embed_dim"))
    depth = int(_first(config, "num_hidden_layers", "n_layer", "num_layers", "decoder_layers", "n_layers"))
    vocab = int(_first(config, "vocab_size", default=0))
    max_positions = _first(config, "max_position_embeddings", "n_positions", "max_seq_len", "max_sequence_length")
    experts = _first(config, "num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
    experts = experts if _int(experts) else None
    if _is_encoder(config):
        H_kv, D, _ = _layer_shape(None, config, heads, hidden)
        return KVGeometry(
            name=name or _get(config, "_name_or_path", "") or model_type, model_type=model_type,
            num_layers=depth, num_attention_heads=heads, num_kv_heads=H_kv, head_dim=hidden // heads,
            hidden_size=hidden, vocab_size=vocab, is_encoder=True, sliding_window=None,
            layer_types=["full_attention"] * depth, rope=None, position_kind="learned",
            max_positions=max_positions, num_experts=experts,
        )
    cache_types, cache_kwargs = _cache_layer_types(config, depth)
    attns = decoder_attention_modules(model)
    decoder_layers = [i for i, t in enumerate(cache_types) if t in KV_LAYER_TYPES]
    if not decoder_layers or (not attns and not _has_kv_blocks(model)):
        raise KvdistillError(
            f"{type(model).__name__} ({model_type}) has no attention layers to capture: its layers are "
            f"{', '.join(f'{n}x {t}' for t, n in Counter(cache_types).items())} and none of them keeps keys and "
            "values in a cache",
            "use a family with attention layers (a pure state-space model such as mamba has no K/V to distill)",
        )
    attn_heads = [_int(getattr(attns.get(layer), "num_heads", None)) for layer in decoder_layers]
    if all(attn_heads):  # per-layer configs (dots3) may refuse a global num_attention_heads
        heads = Counter(attn_heads).most_common(1)[0][0]
    shapes = [_layer_shape(attns.get(layer), config, heads, hidden) for layer in decoder_layers]
    kv_heads = [s[0] for s in shapes]
    dims = [s[1] for s in shapes]
    value_dims = [s[2] for s in shapes]
    kv_types = [cache_types[i] for i in decoder_layers]
    windows = {int(cache_kwargs[i]["sliding_window"]) for i in decoder_layers
               if cache_types[i] in SLIDING_LAYER_TYPES and _int(cache_kwargs[i].get("sliding_window"))}
    head_dim = Counter(dims).most_common(1)[0][0]
    # ALiBi biases replace the rotation (falcon builds its rotary module all the same, and leaves it unused)
    rope = None if _uses_alibi(config, model_type) else _rope_spec(model, config, attns, decoder_layers, kv_types, dims)
    return KVGeometry(
        name=name or _get(config, "_name_or_path", "") or model_type,
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


def _has_kv_blocks(model: torch.nn.Module) -> bool:
    """Older modeling code without `layer_idx` on its attention (ctrl, cpmant): any attention-named module."""
    return any("attention" in type(m).__name__.lower() and "linear" not in type(m).__name__.lower()
               for m in model.modules())
