"""What a model's K/V cache looks like: `KVGeometry` (layers, heads, head dims, layer types, how positions
enter the keys) and its rotary `RopeSpec`. A cache manifest stores one as `to_dict()`;
`kvdistill.models.geometry` derives it from a model or config.

Notation: L K/V layers, H query heads, H_kv KV heads, D head dim (keys), D_v value head dim, R rotary dim.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

# Cache layer types (transformers.cache_utils) that hold per-token keys and values.
KV_LAYER_TYPES = frozenset(
    {
        "full_attention",
        "sliding_attention",
        "chunked_attention",
        "indexed_attention",
        "hybrid",
        "hybrid_sliding",
    }
)
SLIDING_LAYER_TYPES = frozenset({"sliding_attention", "hybrid_sliding"})


@dataclass(frozen=True)
class RopeSpec:
    style: Literal["rotate_half", "interleaved"]
    """rotate_half pairs dims (i, i + R/2) (llama & co); interleaved pairs (2i, 2i + 1) (gptj, cohere,
    glm)."""
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
    num_kv_heads. Layer maps and head alignment assume one H_kv: such teachers capture, but do not align
    yet."""

    @property
    def decoder_layers(self) -> list[int]:
        """Decoder-layer index of each K/V layer."""
        return (
            list(self.attention_layers) if self.attention_layers is not None else list(range(self.num_layers))
        )

    def kv_heads_of(self, layer: int) -> int:
        return self.layer_kv_heads[layer] if self.layer_kv_heads else self.num_kv_heads

    def head_dim_of(self, layer: int) -> int:
        return self.layer_head_dims[layer] if self.layer_head_dims else self.head_dim

    def value_dim_of(self, layer: int) -> int:
        if self.value_head_dim is not None:
            return self.value_head_dim
        return self.head_dim_of(layer)

    def kv_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """K and V of every layer for one token: Σ_l H_kv,l·(D_l + D_v,l)·bytes (2·L·H_kv·D·bytes when
        uniform)."""
        per_layer = (
            self.kv_heads_of(i) * (self.head_dim_of(i) + self.value_dim_of(i)) for i in range(self.num_layers)
        )
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
