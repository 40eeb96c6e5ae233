"""Pre-rotation queries of every layer, captured by hooks, and the attention the answer rows pay to each key.

Notation: B batch, L layers, H_q query heads, H_kv KV heads, T time, D head dim, Q query rows.

R-KV needs only the rows of the attention matrix that belong to the answer tokens. Rather than asking the
model for its full (B, H_q, T, T) probabilities (eager attention), `capture_queries` hooks the query
projection of each layer during the ordinary (sdpa) forward, and `query_importance` recomputes those rows
exactly as the model's attention does: the query rotated at its position, `module.scaling` (Gemma:
query_pre_attn_scalar), `attn_logit_softcapping` (Gemma-2), causal + padding masks and the sliding window of
sliding layers.

Hooked module per layer (its output is the query before rotation):
    q_norm  where the family has one: qwen3 (B, T, H_q, D); gemma3 (B, H_q, T, D), applied after transpose
    q_proj  otherwise (B, T, H_q·D)
Families with a fused qkv projection (phi3, gpt_neox, falcon, gpt2, ...), learned positions and encoders are
not covered (`supports_queries` is False): they keep the eager-attention path.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch

from kvdistill.errors import KvdistillError
from kvdistill.models.geometry import geometry_of
from kvdistill.models.kv_geometry import KVGeometry
from kvdistill.models.rope import apply_rope, rope_cos_sin

# families whose attention is q_proj (+ optional q_norm) -> rotate_half rope -> scaled softmax(q k^T) with GQA
QUERY_FAMILIES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text", "mixtral", "qwen2_moe"}
)
# families whose q_norm runs after the transpose to (B, H_q, T, D)
_HEAD_FIRST_NORM = frozenset({"gemma3", "gemma3_text"})


def supports_queries(geometry: KVGeometry) -> bool:
    """True when `capture_queries` + `query_importance` reproduce this family's attention rows."""
    return geometry.model_type in QUERY_FAMILIES and not geometry.is_encoder and geometry.rope is not None


_ATTENTIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its attention modules


def attention_modules(model: torch.nn.Module, geometry: KVGeometry) -> list[torch.nn.Module]:
    """The L self-attention modules, in layer order (found once per model: every rkv batch asks twice)."""
    mods = _ATTENTIONS.get(model)
    if mods is None:
        mods = [m for name, m in model.named_modules() if name.endswith("self_attn") and hasattr(m, "q_proj")]
        _ATTENTIONS[model] = mods
    if len(mods) != geometry.num_layers:
        raise KvdistillError(
            f"found {len(mods)} attention modules with a q_proj in {geometry.name} ({geometry.model_type}), "
            f"expected {geometry.num_layers}",
            "this family has no separate query projection: capture attentions with eager attention instead",
        )
    return mods


class QueryCapture:
    """Filled during the forward inside `capture_queries`: queries[l] is (B, H_q, T, D), pre-rotation."""

    def __init__(self, num_layers: int):
        self.queries: list[torch.Tensor | None] = [None] * num_layers


@contextmanager
def capture_queries(model: torch.nn.Module, geometry: KVGeometry | None = None):
    """Hook every layer's query (q_norm or q_proj output) for the forwards run inside the block.

    Yields a `QueryCapture`; a later forward overwrites the earlier one's queries.
    """
    geometry = geometry or geometry_of(model)
    if not supports_queries(geometry):
        raise KvdistillError(
            f"{geometry.name} ({geometry.model_type}) has no separate rotary query projection to hook",
            "capture the attention probabilities with eager attention (capture_kv(..., attentions=True))",
        )
    H, D = geometry.num_attention_heads, geometry.head_dim
    head_first = geometry.model_type in _HEAD_FIRST_NORM
    store = QueryCapture(geometry.num_layers)
    handles = []

    for i, attn in enumerate(attention_modules(model, geometry)):
        norm = getattr(attn, "q_norm", None)

        def hook(_m, _inp, out, i=i, normed=norm is not None):
            if normed and head_first:
                q = out  # (B, H_q, T, D)
            else:
                B, T = out.shape[:2]
                q = out.reshape(B, T, H, D).transpose(1, 2)  # (B, H_q, T, D)
            store.queries[i] = q

        handles.append((norm if norm is not None else attn.q_proj).register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def layer_attention_params(attn: torch.nn.Module, geometry: KVGeometry, layer: int) -> dict:
    """scaling, softcap and sliding window that `layer`'s attention module `attn` applies."""
    scaling = getattr(attn, "scaling", None)
    if scaling is None:
        scaling = geometry.head_dim**-0.5
    softcap = getattr(attn, "attn_logit_softcapping", None)
    window = None
    if geometry.sliding_window is not None:
        types = geometry.layer_types or []
        # gemma2/3, qwen: only the sliding layers; mistral / mixtral: every layer
        sliding = "sliding_attention" not in types or types[layer] == "sliding_attention"
        window = int(geometry.sliding_window) if sliding else None
    return {
        "scaling": float(scaling),
        "softcap": None if softcap is None else float(softcap),
        "window": window,
    }


@torch.no_grad()
def query_importance(
    model: torch.nn.Module,
    cap,
    queries: list[torch.Tensor],
    query_mask: torch.Tensor,
    layers: list[int],
    *,
    rows: tuple[torch.Tensor, torch.Tensor] | None = None,
    group: int = 8,
) -> dict[int, torch.Tensor]:
    """layer -> I (B, H_kv, T) float32: the mean attention the query rows pay each key, as
    `importance_from_attention` computes it from the model's eager probabilities.

    cap: the `KVCapture` of the same forward (pre-rotation keys, positions, mask); queries: from
    `capture_queries`; query_mask (B, T): the answer rows (`answer_query_mask`). rows: `query_rows(query_mask,
    mask)` made beforehand on the host (computing Q on the device waits for it). Layers that share their
    rotary table, attention parameters and shapes are computed `group` at a time, stacked over a layer dim
    (equal to one layer at a time: `importance_from_queries` over (B, L, ...)).
    """
    from kvdistill.compress.select import importance_from_queries, query_rows

    geometry = cap.geometry
    style = geometry.rope.style
    rows, valid = rows if rows is not None else query_rows(query_mask, cap.attention_mask)  # (B, Q)
    attns = attention_modules(model, geometry)
    missing = [layer for layer in layers if queries[layer] is None]
    if missing:
        raise KvdistillError(
            f"no query was captured for layer(s) {missing}", "run the forward inside capture_queries(model)"
        )
    # (B, T, R) float32 per layer: the tables of the capture's own forward where it kept them
    tables = {
        layer: cap.rotary[layer] if cap.rotary else rope_cos_sin(model, geometry, cap.positions, layer)
        for layer in layers
    }
    params = {layer: layer_attention_params(attns[layer], geometry, layer) for layer in layers}
    batches: dict[tuple, list[int]] = {}  # layers that can be stacked, in order
    for layer in layers:
        cos, sin = tables[layer]
        kind = (
            id(cos),
            id(sin),
            tuple(sorted(params[layer].items())),
            queries[layer].shape,
            cap.keys[layer].shape,
        )
        batches.setdefault(kind, []).append(layer)
    out = {}
    for same in batches.values():
        cos, sin = tables[same[0]]  # (B, T, R)
        p = params[same[0]]
        idx = rows[..., None].expand(*rows.shape, cos.shape[-1])  # (B, Q, R)
        cos_q, sin_q = cos.gather(1, idx), sin.gather(1, idx)  # (B, Q, R)
        for lo in range(0, len(same), group):
            chunk = same[lo : lo + group]
            B, H_q, _, D = queries[chunk[0]].shape
            at = rows[:, None, :, None].expand(B, H_q, rows.shape[1], D)
            q_rows = torch.stack([queries[j].gather(2, at) for j in chunk], 1)  # (B, L, H_q, Q, D)
            keys = torch.stack([cap.keys[j] for j in chunk], 1)  # (B, L, H_kv, T, D)
            imp = importance_from_queries(
                apply_rope(q_rows.float(), cos_q[:, None], sin_q[:, None], style),  # (B, L, H_q, Q, D)
                rows,
                valid,
                apply_rope(keys.float(), cos[:, None], sin[:, None], style),  # (B, L, H_kv, T, D)
                cap.attention_mask,
                scaling=p["scaling"],
                softcap=p["softcap"],
                sliding_window=p["window"],
            )  # (B, L, H_kv, T)
            out.update({j: imp[:, n] for n, j in enumerate(chunk)})
    return {layer: out[layer] for layer in layers}


@torch.no_grad()
def window_logits(
    model: torch.nn.Module, cap, queries: list[torch.Tensor], rows: torch.Tensor, layers: list[int]
) -> dict[int, torch.Tensor]:
    """layer -> ℓ (B, H_kv, Q, T) float32: the attention logits q·k·scaling of the query rows `rows` (B, Q)
    onto every key, rotated as the model rotates them, with the max over each KV head's query group (R-KV's
    GQA pooling; `kvdistill.compress.latent.rkv_reference_scores` masks and normalises them). No softcap and
    no mask: R-KV reads the raw logits.

    cap: the `KVCapture` of the same forward (pre-rotation keys, positions); queries: from
    `capture_queries`."""
    geometry = cap.geometry
    style = geometry.rope.style
    attns = attention_modules(model, geometry)
    missing = [layer for layer in layers if queries[layer] is None]
    if missing:
        raise KvdistillError(
            f"no query was captured for layer(s) {missing}", "run the forward inside capture_queries(model)"
        )
    out = {}
    for layer in layers:
        cos, sin = cap.rotary[layer] if cap.rotary else rope_cos_sin(model, geometry, cap.positions, layer)
        scaling = layer_attention_params(attns[layer], geometry, layer)["scaling"]
        idx = rows[..., None].expand(*rows.shape, cos.shape[-1])  # (B, Q, R)
        B, H_q, _, D = queries[layer].shape
        at = rows[:, None, :, None].expand(B, H_q, rows.shape[1], D)
        q = apply_rope(
            queries[layer].gather(2, at).float(), cos.gather(1, idx), sin.gather(1, idx), style
        )  # (B, H_q, Q, D)
        k = apply_rope(cap.keys[layer].float(), cos, sin, style)  # (B, H_kv, T, D)
        H = k.shape[1]
        q = q.view(B, H, H_q // H, rows.shape[1], D)  # query head h reads KV head h // g
        out[layer] = (q @ k[:, :, None].transpose(-1, -2) * scaling).amax(2)  # (B, H_kv, Q, T)
    return out
