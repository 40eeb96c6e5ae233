"""Real K and V of every attention layer, with keys taken back to before the rotary rotation.

Notation: B batch, L K/V layers, H_kv KV heads, T time, D head dim (D_v values), V vocab, E experts.

Stored layout (one per K/V layer, L entries; `geometry.decoder_layers` says which decoder layers those are):
keys[l], values[l] are (B, H_kv, T, D), float, padding positions hold whatever the model produced there and
must be masked with `attention_mask`. Keys are pre-rotation: the model's cached key with the rotation at
`positions` undone, so that two models (or a student and a teacher) are compared on content, not on where
their tokens sit.

Decoders, two sources giving the same K/V (tests/models/test_capture.py and test_family_sweep.py check it):
  hooks  (default where a probe finds them, `kvdistill.models.hook_source`): forward hooks on each attention's
         key and value modules give the key before the rotation and the value, for every token; the model runs
         with `use_cache=False`.
  cache  (everything else, or `source="cache"`, `kvdistill.models.cache_source`): the model's own cache, keys
         taken back through `invert_rope` with the tables the model handed each attention.
Positions are `cumsum(mask) - 1`, so left and right padding give each sample the positions it would get alone.
Encoders (BERT-style): hooks on the key/value projections. Texts become (B, T) ids and UTF-8 byte spans in
`kvdistill.models.tokenization`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from kvdistill.errors import KvdistillError
from kvdistill.models.cache_source import cached_decoder_kv
from kvdistill.models.geometry import geometry_of
from kvdistill.models.hf_forward import accepts, is_checkpointing
from kvdistill.models.hook_source import hook_plan, hooked_decoder_kv
from kvdistill.models.kv_geometry import KVGeometry
from kvdistill.models.tokenization import tokenize

SOURCES = ("auto", "hooks", "cache")


@dataclass
class KVCapture:
    keys: list[torch.Tensor]  # L × (B, H_kv, T, D), pre-rotation
    values: list[torch.Tensor]  # L × (B, H_kv, T, D_v)
    attention_mask: torch.Tensor  # (B, T) long, 1 = real token
    positions: torch.Tensor  # (B, T) long, the positions the model used
    input_ids: torch.Tensor  # (B, T)
    geometry: KVGeometry
    spans: torch.Tensor | None = None  # (B, T, 2) UTF-8 byte [start, end); specials and padding: start == end
    hidden_states: list[torch.Tensor] | None = None  # (L_dec + 1) × (B, T, H)
    logits: torch.Tensor | None = None  # (B, T, V)
    attentions: list[torch.Tensor] | None = None  # L_dec × (B, H, T, T)
    router_logits: list[torch.Tensor] | None = None  # L_moe × (B·T, E)
    spans_cpu: torch.Tensor | None = None  # (B, T, 2) CPU copy of spans: token alignment is built on the CPU
    attention_mask_cpu: torch.Tensor | None = None  # (B, T) CPU copy of attention_mask
    importance: dict[int, torch.Tensor] | None = None  # rkv: layer -> (B, H_kv, T) answer-row importance, or
    # (scoring rkv) the window rows' logits (B, H_kv, Q, T) with window_valid (B, Q) marking real rows
    window_valid: torch.Tensor | None = None
    rotary: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None
    """Per K/V layer the (cos, sin) (B, T, R) the model applied (`kvdistill.models.rope` layout), None:
    unrotated."""
    candidates: torch.Tensor | None = None  # (B, T) tokens a compression may keep (span 'cot': the reasoning)

    def select(self, index: int) -> KVCapture:
        """Sample `index` alone, with its padding removed: K/V (1, H_kv, T_i, D)."""
        keep = self.attention_mask[index].bool()

        def cut(x, time_dim):
            if x is None:
                return None
            x = x[index : index + 1]
            return x.index_select(time_dim, keep.nonzero().squeeze(1))

        return replace(
            self,
            keys=[cut(k, 2) for k in self.keys],
            values=[cut(v, 2) for v in self.values],
            attention_mask=cut(self.attention_mask, 1),
            positions=cut(self.positions, 1),
            input_ids=cut(self.input_ids, 1),
            spans=cut(self.spans, 1),
            hidden_states=None if self.hidden_states is None else [cut(h, 1) for h in self.hidden_states],
            logits=cut(self.logits, 1),
            attentions=None,
            router_logits=None,
            spans_cpu=None,
            attention_mask_cpu=None,
            importance=None,
            window_valid=None,
            rotary=None
            if self.rotary is None
            else [None if t is None else (cut(t[0], 1), cut(t[1], 1)) for t in self.rotary],
        )


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions each real token has when its sample runs alone: cumsum(mask) - 1, padding at 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _check_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
        raise KvdistillError(
            f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} must both "
            "be (B, T)",
            "pass the tensors a tokenizer returns for one padded batch",
        )


def _encoder_kv(model, geometry, input_ids, attention_mask, positions, want_hidden, want_attn):
    """Encoders: K/V from forward hooks on each layer's key/value projections, (B, T, H·D) -> (B, H, T, D)."""
    targets = {"key": [], "value": []}
    for name, module in model.named_modules():
        tail = name.split(".")
        if len(tail) >= 2 and tail[-2] == "self" and tail[-1] in targets:
            targets[tail[-1]].append(module)
    if len(targets["key"]) != geometry.num_layers:
        raise KvdistillError(
            f"found {len(targets['key'])} key projections in {geometry.name}, expected {geometry.num_layers}",
            "this encoder layout is not supported",
        )
    store: dict[str, list] = {"key": [None] * geometry.num_layers, "value": [None] * geometry.num_layers}
    handles = []
    B, T = input_ids.shape
    for kind, modules in targets.items():
        for i, m in enumerate(modules):

            def hook(_m, _inp, out, kind=kind, i=i):
                store[kind][i] = out.view(B, T, geometry.num_kv_heads, geometry.head_dim).transpose(1, 2)

            handles.append(m.register_forward_hook(hook))
    try:
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            output_hidden_states=want_hidden,
            output_attentions=want_attn,
        )
    finally:
        for h in handles:
            h.remove()
    return store["key"], store["value"], out


def forward_kv(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    geometry: KVGeometry | None = None,
    positions: torch.Tensor | None = None,
    hidden_states: bool = False,
    logits: bool = False,
    attentions: bool = False,
    router_logits: bool = False,
    source: str = "auto",
    inputs_embeds: torch.Tensor | None = None,
) -> KVCapture:
    """One forward pass returning K/V of every attention layer (keys pre-rotation). Gradients flow if enabled.

    input_ids, attention_mask: (B, T). Use under `torch.no_grad()` for teachers; the student calls it with
    grad to get its own K/V and logits in one pass. `positions` (B, T) defaults to `cumsum(mask) - 1`.
    `source` (decoders): "hooks" (projection hooks, no cache), "cache" (the model's cache, rotation undone) or
    "auto": hooks where `hook_plan` finds them, else the cache.
    `inputs_embeds` (B, T, H) (decoders): fed instead of the embeddings of input_ids (a latent student's
    latent slots have no token); input_ids is then only recorded in the capture.
    """
    if source not in SOURCES:
        raise KvdistillError(f"forward_kv source '{source}' is unknown", f"use one of {', '.join(SOURCES)}")
    _check_batch(input_ids, attention_mask)
    geometry = geometry or geometry_of(model)
    attn_impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if attentions and attn_impl not in (None, "eager"):
        raise KvdistillError(
            f"attention probabilities were asked of {geometry.name}, which runs {attn_impl} attention (it "
            "returns none)",
            "load the model with attn_implementation='eager' "
            "(kvdistill.models.load.attn_implementation_for(True))",
        )
    if positions is None:
        positions = positions_from_mask(attention_mask)  # (B, T)
    if inputs_embeds is not None and (geometry.is_encoder or inputs_embeds.shape[:2] != input_ids.shape):
        raise KvdistillError(
            f"inputs_embeds {tuple(inputs_embeds.shape)} given for {geometry.name} with input_ids "
            f"{tuple(input_ids.shape)}" + (" (an encoder)" if geometry.is_encoder else ""),
            "pass (B, T, hidden) embeddings for the (B, T) batch of a decoder",
        )
    if geometry.is_encoder:
        keys, values, out = _encoder_kv(
            model, geometry, input_ids, attention_mask, positions, hidden_states, attentions
        )
        return KVCapture(
            keys=keys,
            values=values,
            attention_mask=attention_mask,
            positions=positions,
            input_ids=input_ids,
            geometry=geometry,
            hidden_states=list(out.hidden_states) if hidden_states else None,
            attentions=list(out.attentions) if attentions else None,
        )
    # the LM head is only run when logits are wanted (it is the largest matmul for big vocabularies)
    runner = model if logits else model.base_model
    kwargs = dict(
        attention_mask=attention_mask, output_hidden_states=hidden_states, output_attentions=attentions
    )
    if inputs_embeds is None:
        kwargs["input_ids"] = input_ids
    else:
        kwargs["inputs_embeds"] = inputs_embeds
    if accepts(runner.forward, "position_ids"):
        kwargs["position_ids"] = positions
    if router_logits:
        kwargs["output_router_logits"] = True
    checkpointing = model.training and torch.is_grad_enabled() and is_checkpointing(model)  # a walk: last
    plan = hook_plan(model, geometry) if (source != "cache" or checkpointing) else None
    if plan is None and (source == "hooks" or checkpointing):
        raise KvdistillError(
            f"{geometry.name} ({geometry.model_type}) has no module per layer whose output is the "
            "pre-rotation key "
            "and the value, so its K/V cannot be taken from hooks"
            + (" (needed with gradient checkpointing, which turns the cache off)" if checkpointing else ""),
            "turn student.gradient_checkpointing off" if checkpointing else "use source='cache' (or 'auto')",
        )
    if plan is not None:
        keys, values, out, tables = hooked_decoder_kv(model, runner, geometry, kwargs, plan)
    else:
        keys, values, out, tables = cached_decoder_kv(model, runner, geometry, kwargs)
    router = getattr(out, "router_logits", None)
    return KVCapture(
        keys=keys,
        values=values,
        attention_mask=attention_mask,
        positions=positions,
        input_ids=input_ids,
        geometry=geometry,
        hidden_states=list(out.hidden_states) if hidden_states else None,
        logits=out.logits if logits else None,
        attentions=list(out.attentions) if attentions else None,
        router_logits=[r for r in router if r is not None]
        if (router_logits and router is not None)
        else None,
        rotary=tables if geometry.rope is not None else None,
    )


def tokenize_for(
    geometry: KVGeometry, tokenizer, texts: list[str] | str, *, max_length: int | None, padding_side: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`tokenize` under the model's position limit: input_ids, attention_mask (B, T) and spans (B, T, 2)
    (UTF-8 byte offsets, padding (0, 0)), all on the CPU."""
    enc = tokenize(
        tokenizer,
        texts,
        max_length=max_length,
        padding_side=padding_side,
        max_positions=None if geometry.is_encoder and max_length else geometry.max_positions,
    )
    mask = enc["attention_mask"]
    return enc["input_ids"], mask, enc["offset_mapping"] * mask[..., None]


def capture_tokenized(
    model: torch.nn.Module,
    geometry: KVGeometry,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    spans: torch.Tensor,
    **flags,
) -> KVCapture:
    """`forward_kv` (no grad) on CPU inputs from `tokenize_for` (pinned ones are copied asynchronously), with
    the spans attached; `flags` are forward_kv's hidden_states / logits / attentions / router_logits."""
    device = next(model.parameters()).device
    with torch.no_grad():
        cap = forward_kv(
            model,
            input_ids.to(device, non_blocking=True),
            attention_mask.to(device, non_blocking=True),
            geometry=geometry,
            **flags,
        )
    cap.spans = spans.to(device, non_blocking=True)
    # CPU copies, so that token alignment needs no device-to-host copy
    cap.spans_cpu, cap.attention_mask_cpu = spans, attention_mask
    return cap


def capture_kv(
    model: torch.nn.Module,
    tokenizer,
    texts: list[str] | str,
    *,
    max_length: int | None = None,
    padding_side: str | None = None,
    hidden_states: bool = False,
    logits: bool = False,
    attentions: bool = False,
    router_logits: bool = False,
) -> KVCapture:
    """Tokenize `texts` and capture K/V (no grad), with UTF-8 byte spans (B, T, 2) for token alignment."""
    geometry = geometry_of(model)
    ids, mask, spans = tokenize_for(
        geometry, tokenizer, texts, max_length=max_length, padding_side=padding_side or tokenizer.padding_side
    )
    return capture_tokenized(
        model,
        geometry,
        ids,
        mask,
        spans,
        hidden_states=hidden_states,
        logits=logits,
        attentions=attentions,
        router_logits=router_logits,
    )
