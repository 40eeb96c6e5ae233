"""KV geometry of a model family: what its cache looks like and how positions enter the keys.

Notation: L layers, H query heads, H_kv KV heads, D head dim, R rotary dim (R <= D, R even).

Read from a Hugging Face config (or a model's `.config`) without loading weights. Both the transformers 4.x
config layout (`rope_theta`, `partial_rotary_factor`, `rotary_pct`, Gemma-3's `rope_local_base_freq`) and the 5.x
layout (`rope_parameters`, keyed by layer type for Gemma-3) are understood.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from kvdistill.errors import KvdistillError

# model_type -> (rotary style or None, position kind). Rotary style names how pairs of dims are rotated:
#   rotate_half: pairs (i, i + R/2)  (llama & co, partial R < D for phi / gpt_neox)
#   interleaved: pairs (2i, 2i + 1)  (gptj)
FAMILIES: dict[str, tuple[str | None, str]] = {
    "llama": ("rotate_half", "rotary"),
    "mistral": ("rotate_half", "rotary"),
    "qwen2": ("rotate_half", "rotary"),
    "qwen3": ("rotate_half", "rotary"),
    "gemma": ("rotate_half", "rotary"),
    "gemma2": ("rotate_half", "rotary"),
    "gemma3": ("rotate_half", "rotary"),
    "gemma3_text": ("rotate_half", "rotary"),
    "phi": ("rotate_half", "rotary"),
    "phi3": ("rotate_half", "rotary"),
    "gpt_neox": ("rotate_half", "rotary"),
    "gptj": ("interleaved", "rotary"),
    "gpt2": (None, "learned"),
    "opt": (None, "learned"),
    "falcon": ("rotate_half", "rotary"),  # alibi when config.alibi
    "mixtral": ("rotate_half", "rotary"),
    "qwen2_moe": ("rotate_half", "rotary"),
    "bert": (None, "learned"),
}
SUPPORTED_FAMILIES = tuple(sorted(FAMILIES))
MOE_FAMILIES = {"mixtral", "qwen2_moe"}


@dataclass(frozen=True)
class RopeSpec:
    style: Literal["rotate_half", "interleaved"]
    rotary_dim: int
    """R: the first R dims of each head are rotated (R < D for partial rotary)."""
    theta: float | list[float]
    """Base frequency; a per-layer list when layers differ (Gemma-3: 10k local, 1M global)."""
    scaling: dict[str, Any] | None = None

    def theta_of(self, layer: int) -> float:
        return self.theta[layer] if isinstance(self.theta, list) else self.theta


@dataclass(frozen=True)
class KVGeometry:
    name: str
    model_type: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    is_encoder: bool
    sliding_window: int | None
    layer_types: list[str] = field(default_factory=list)
    rope: RopeSpec | None = None
    position_kind: Literal["rotary", "learned", "alibi", "none"] = "rotary"
    max_positions: int | None = None
    num_experts: int | None = None

    def kv_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """K and V of every layer for one token: 2·L·H_kv·D·bytes."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * bytes_per_element

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["kv_bytes_per_token_bf16"] = self.kv_bytes_per_token(2)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KVGeometry:
        data = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if data.get("rope") is not None:
            data["rope"] = RopeSpec(**data["rope"])
        return cls(**data)


def _first(config, *names, default=None):
    for n in names:
        value = getattr(config, n, None)
        if value is not None:
            return value
    return default


def _rope_params(config, layer_type: str | None) -> dict[str, Any]:
    """The rope parameters of one layer type, in one layout whatever the transformers version."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        if layer_type is not None and isinstance(params.get(layer_type), dict):
            return dict(params[layer_type])
        if "rope_theta" in params or "rope_type" in params:
            return dict(params)
    # transformers 4.x layout
    theta = _first(config, "rope_theta", "rotary_emb_base", default=10000.0)
    if layer_type == "sliding_attention" and getattr(config, "rope_local_base_freq", None) is not None:
        theta = config.rope_local_base_freq
    out = {"rope_theta": theta, "rope_type": "default"}
    scaling = getattr(config, "rope_scaling", None)
    if isinstance(scaling, dict) and layer_type != "sliding_attention":
        out.update(scaling)
        out["rope_type"] = scaling.get("rope_type", scaling.get("type", "default"))
        out["rope_theta"] = theta
    for key in ("partial_rotary_factor", "rotary_pct"):
        if getattr(config, key, None) is not None:
            out["partial_rotary_factor"] = getattr(config, key)
    return out


def _num_kv_heads(config, model_type: str, heads: int) -> int:
    if model_type == "falcon":
        if getattr(config, "new_decoder_architecture", False):
            return config.num_kv_heads
        return 1 if getattr(config, "multi_query", True) else heads
    return int(_first(config, "num_key_value_heads", default=heads))


def _layer_types(config, model_type: str, num_layers: int) -> list[str]:
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    if model_type == "gemma2":  # alternating, local first
        return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
    return ["full_attention"] * num_layers


def _sliding_window(config, model_type: str, layer_types: list[str]) -> int | None:
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    if model_type in {"qwen2", "qwen2_moe", "qwen3"} and not getattr(config, "use_sliding_window", False):
        return None
    if model_type in {"gemma2", "gemma3", "gemma3_text"} and "sliding_attention" not in layer_types:
        return None
    return int(window)


def _rope_spec(config, model_type: str, style: str, head_dim: int, layer_types: list[str]) -> RopeSpec:
    if model_type == "gptj":
        return RopeSpec("interleaved", int(config.rotary_dim or head_dim), 10000.0)
    per_type = {t: _rope_params(config, t) for t in sorted(set(layer_types))}
    first = per_type[layer_types[0]]
    factor = first.get("partial_rotary_factor", 1.0)
    rotary_dim = int(head_dim * factor)
    thetas = [float(per_type[t].get("rope_theta", 10000.0)) for t in layer_types]
    theta: float | list[float] = thetas[0] if len(set(thetas)) == 1 else thetas
    scaling = {k: v for k, v in first.items() if k not in {"rope_theta", "partial_rotary_factor"}}
    scaling = None if scaling.get("rope_type", "default") == "default" else scaling
    return RopeSpec(style, rotary_dim, theta, scaling)


def geometry_of(model_or_config, name: str | None = None) -> KVGeometry:
    """The KV geometry of a model or config; raises for a family we cannot capture."""
    config = getattr(model_or_config, "config", model_or_config)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise KvdistillError(
            f"model family '{model_type}' is not supported for KV capture",
            f"use one of: {', '.join(SUPPORTED_FAMILIES)}",
        )
    style, position_kind = FAMILIES[model_type]
    num_layers = int(_first(config, "num_hidden_layers", "n_layer", "num_layers"))
    heads = int(_first(config, "num_attention_heads", "n_head"))
    hidden = int(_first(config, "hidden_size", "n_embd", "d_model"))
    head_dim = int(_first(config, "head_dim", default=hidden // heads))
    if model_type in {"gpt_neox", "phi", "falcon", "gpt2", "opt", "gptj", "bert"}:
        head_dim = hidden // heads  # these configs carry no separate head_dim
    layer_types = _layer_types(config, model_type, num_layers)
    rope = None
    if model_type == "falcon" and getattr(config, "alibi", False):
        position_kind, style = "alibi", None
    if style is not None:
        rope = _rope_spec(config, model_type, style, head_dim, layer_types)
    is_encoder = model_type == "bert"
    experts = _first(config, "num_local_experts", "num_experts") if model_type in MOE_FAMILIES else None
    return KVGeometry(
        name=name or getattr(config, "_name_or_path", "") or model_type,
        model_type=model_type,
        num_layers=num_layers,
        num_attention_heads=heads,
        num_kv_heads=_num_kv_heads(config, model_type, heads),
        head_dim=head_dim,
        hidden_size=hidden,
        vocab_size=int(config.vocab_size),
        is_encoder=is_encoder,
        sliding_window=_sliding_window(config, model_type, layer_types),
        layer_types=layer_types,
        rope=rope,
        position_kind=position_kind,
        max_positions=_first(config, "max_position_embeddings", "n_positions"),
        num_experts=experts,
    )
