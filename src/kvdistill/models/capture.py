"""Real K and V of every layer, with keys taken back to before the rotary rotation.

Notation: B batch, L layers, H_kv KV heads, T time, D head dim, V vocab, E experts.

Stored layout (one per layer, L entries): keys[l], values[l] are (B, H_kv, T, D), float, padding positions
hold whatever the model produced there and must be masked with `attention_mask`. Keys are pre-rotation:
the model's cached key with the rotation at `positions` undone, so that two models (or a student and a
teacher) are compared on content, not on where their tokens sit.

Decoders, two sources giving the same K/V (tests/models/test_capture.py checks they agree):
  hooks  (default where the family is listed in `KEY_PROJECTION`): forward hooks on each attention's key module
         (k_proj, or the per-head k_norm that follows it) and v_proj give the key before the rotation and the
         value directly, for every token (also past a sliding window); the model runs with `use_cache=False`, so
         no cache is built and no rotation is undone.
  cache  (other families, or `source="cache"`): the model's own cache (a plain `DynamicCache()`, which keeps
         every token even past a sliding window), keys taken back through `invert_rope`.
Positions are `cumsum(mask) - 1`, so left and right padding give each sample the positions it would get alone.
Encoders (bert): hooks on the key/value projections.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace

import torch
from transformers import DynamicCache

from kvdistill.align.bytes import byte_spans
from kvdistill.errors import KvdistillError
from kvdistill.models.geometry import KVGeometry, geometry_of
from kvdistill.models.rope import invert_rope, rope_cos_sin

# model_type -> (attribute of the attention module whose output is the pre-rotation key, its output layout).
# Read off the installed transformers' modeling_<family>.py; the value is always v_proj, flat (B, T, H_kv·D):
#   flat  (B, T, H_kv·D)   k_proj output, viewed as heads afterwards (llama & co, phi without qk_layernorm)
#   bthd  (B, T, H_kv, D)  qwen3: k_norm(k_proj(x).view(B, T, H, D)), transposed afterwards
#   bhtd  (B, H_kv, T, D)  gemma3: k_norm(k_proj(x).view(B, T, H, D).transpose(1, 2)); phi: k_layernorm likewise
KEY_PROJECTION: dict[str, tuple[str, str]] = {
    "llama": ("k_proj", "flat"),
    "mistral": ("k_proj", "flat"),
    "mixtral": ("k_proj", "flat"),
    "qwen2": ("k_proj", "flat"),
    "qwen2_moe": ("k_proj", "flat"),
    "gemma": ("k_proj", "flat"),
    "gemma2": ("k_proj", "flat"),
    "qwen3": ("k_norm", "bthd"),
    "gemma3": ("k_norm", "bhtd"),
    "gemma3_text": ("k_norm", "bhtd"),
    "phi": ("k_proj", "flat"),  # ("k_layernorm", "bhtd") when config.qk_layernorm
}
SOURCES = ("auto", "hooks", "cache")


@dataclass
class KVCapture:
    keys: list[torch.Tensor]  # L × (B, H_kv, T, D), pre-rotation
    values: list[torch.Tensor]  # L × (B, H_kv, T, D)
    attention_mask: torch.Tensor  # (B, T) long, 1 = real token
    positions: torch.Tensor  # (B, T) long, the positions the model used
    input_ids: torch.Tensor  # (B, T)
    geometry: KVGeometry
    spans: torch.Tensor | None = None  # (B, T, 2) UTF-8 byte [start, end); specials and padding: start == end
    hidden_states: list[torch.Tensor] | None = None  # (L + 1) × (B, T, H)
    logits: torch.Tensor | None = None  # (B, T, V)
    attentions: list[torch.Tensor] | None = None  # L × (B, H, T, T)
    router_logits: list[torch.Tensor] | None = None  # L_moe × (B·T, E)
    spans_cpu: torch.Tensor | None = None  # (B, T, 2) CPU copy of spans: token alignment is built on the CPU
    attention_mask_cpu: torch.Tensor | None = None  # (B, T) CPU copy of attention_mask
    importance: dict[int, torch.Tensor] | None = None  # rkv: layer -> (B, H_kv, T) answer-row importance

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
        )


def tokenize(tokenizer, texts: list[str], *, max_length: int | None = None, padding_side: str = "right",
             max_positions: int | None = None):
    """Tokenize a batch with token spans; every text must yield at least one non-special token.

    Returns a BatchEncoding with input_ids, attention_mask (B, T) and offset_mapping (B, T, 2), where the spans are
    UTF-8 byte offsets [start, end) into each text (`kvdistill.align.bytes.byte_spans` of the tokenizer's character
    offsets: exact where one character is split into several tokens; equal to them on ASCII text, except that a
    '▁' Llama-2 prepends onto the text's first character covers no byte). Special tokens have empty spans; padding
    rows are (0, 0).
    """
    if isinstance(texts, str):
        texts = [texts]
    if not texts:
        raise KvdistillError("no texts given", "pass a non-empty list of strings")
    if not getattr(tokenizer, "is_fast", False):
        raise KvdistillError(f"tokenizer {type(tokenizer).__name__} is not a fast tokenizer",
                             "character offsets need a fast (Rust) tokenizer; load it with use_fast=True")
    old_side = tokenizer.padding_side
    tokenizer.padding_side = padding_side
    try:
        enc = tokenizer(list(texts), return_offsets_mapping=True, padding=True, return_tensors="pt",
                        truncation=max_length is not None, max_length=max_length)
    finally:
        tokenizer.padding_side = old_side
    offsets = enc["offset_mapping"]  # (B, T, 2) characters
    if offsets.dim() != 3:  # every text empty and no BOS: the tokenizer returns (B, 0)
        offsets = offsets.reshape(len(texts), -1, 2)
    offsets = byte_spans(tokenizer, texts, enc["input_ids"], offsets)  # (B, T, 2) UTF-8 bytes
    enc["offset_mapping"] = offsets
    content = (offsets[..., 1] > offsets[..., 0]) & enc["attention_mask"].bool()  # (B, T)
    empty = [i for i in range(len(texts)) if not content[i].any()]
    if empty:
        shown = ", ".join(f"#{i} {texts[i][:40]!r}" for i in empty[:5])
        raise KvdistillError(f"text(s) {shown} tokenize to nothing but special tokens",
                             "drop empty or whitespace-only samples from the data")
    lengths = enc["attention_mask"].sum(1)
    if max_positions is not None and int(lengths.max()) > max_positions:
        i = int(lengths.argmax())
        raise KvdistillError(
            f"text #{i} is {int(lengths[i])} tokens, longer than the model's maximum of {max_positions} positions",
            f"set data.max_length (or --max-length) to at most {max_positions} to truncate",
        )
    return enc


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions each real token has when its sample runs alone: cumsum(mask) - 1, padding at 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):  # older transformers
        return list(zip(cache.key_cache, cache.value_cache, strict=True))
    return [(k, v) for k, v in cache]  # legacy tuple of tuples


def _check_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
        raise KvdistillError(
            f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} must both be (B, T)",
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
        raise KvdistillError(f"found {len(targets['key'])} key projections in {geometry.name}, "
                             f"expected {geometry.num_layers}", "this encoder layout is not supported")
    store: dict[str, list] = {"key": [None] * geometry.num_layers, "value": [None] * geometry.num_layers}
    handles = []
    B, T = input_ids.shape
    for kind, modules in targets.items():
        for i, m in enumerate(modules):
            def hook(_m, _inp, out, kind=kind, i=i):
                store[kind][i] = out.view(B, T, geometry.num_kv_heads, geometry.head_dim).transpose(1, 2)

            handles.append(m.register_forward_hook(hook))
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                    output_hidden_states=want_hidden, output_attentions=want_attn)
    finally:
        for h in handles:
            h.remove()
    return store["key"], store["value"], out


def is_checkpointing(model) -> bool:
    """Activation (gradient) checkpointing is on; the name changed in transformers 5."""
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), attr) or hasattr(model, attr):
            return bool(getattr(model, attr))
    return False


def enable_checkpointing(model) -> None:
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _key_projection(model, geometry) -> tuple[str, str] | None:
    """(key attribute, layout) of `KEY_PROJECTION` for this model, None when its family is not listed."""
    spec = KEY_PROJECTION.get(geometry.model_type)
    if geometry.model_type == "phi" and getattr(model.config, "qk_layernorm", False):
        spec = ("k_layernorm", "bhtd")
    return spec


def _projection_modules(model, geometry) -> tuple[list, list, str] | None:
    """Per decoder layer, the module whose output is the pre-rotation key and v_proj, plus the key's layout.

    None when the family is not in `KEY_PROJECTION` or the attention modules are not one per layer.
    """
    spec = _key_projection(model, geometry)
    if spec is None:
        return None
    key_attr, layout = spec
    found = {}
    for name, module in model.named_modules():
        if not name.endswith("self_attn") or not isinstance(getattr(module, "layer_idx", None), int):
            continue  # (vision towers of multimodal models have self_attn modules without a layer_idx)
        k, v = getattr(module, key_attr, None), getattr(module, "v_proj", None)
        if k is None or v is None:
            return None
        found[module.layer_idx] = (k, v)
    if sorted(found) != list(range(geometry.num_layers)):
        return None
    return [found[i][0] for i in range(geometry.num_layers)], [found[i][1] for i in range(geometry.num_layers)], layout


def _hooked_decoder_kv(model, runner, geometry, kwargs, modules):
    """K/V from forward hooks on the key module and v_proj of every layer (already pre-rotation), no cache."""
    key_mods, value_mods, layout = modules
    B, T = kwargs["input_ids"].shape
    H, D = geometry.num_kv_heads, geometry.head_dim
    keys, values = [None] * len(key_mods), [None] * len(key_mods)

    def as_bhtd(out: torch.Tensor, layout: str, what: str) -> torch.Tensor:
        want = {"flat": (B, T, H * D), "bthd": (B, T, H, D), "bhtd": (B, H, T, D)}[layout]
        if tuple(out.shape) != want:
            raise KvdistillError(
                f"the {what} module of {geometry.name} ({geometry.model_type}) gave {tuple(out.shape)}, "
                f"expected {want} ({layout})",
                "this transformers version lays the attention out differently; pass source='cache' to forward_kv",
            )
        if layout == "flat":
            return out.view(B, T, H, D).transpose(1, 2)  # (B, H_kv, T, D)
        if layout == "bthd":
            return out.transpose(1, 2)  # (B, H_kv, T, D)
        return out  # (B, H_kv, T, D)

    handles = []
    for i, (km, vm) in enumerate(zip(key_mods, value_mods, strict=True)):
        def k_hook(_m, _inp, out, i=i):  # recomputation in backward (checkpointing) overwrites with equal values
            keys[i] = as_bhtd(out, layout, "key")

        def v_hook(_m, _inp, out, i=i):
            values[i] = as_bhtd(out, "flat", "value")

        handles += [km.register_forward_hook(k_hook), vm.register_forward_hook(v_hook)]
    try:
        out = runner(**{**kwargs, "use_cache": False})
    finally:
        for h in handles:
            h.remove()
    return list(keys), list(values), out


def _cached_decoder_kv(model, runner, geometry, kwargs, positions):
    """K/V from the model's own cache, keys taken back through the inverse rotation."""
    out = runner(**{**kwargs, "past_key_values": DynamicCache(), "use_cache": True})
    keys, values = [], []
    tables: dict = {}  # cos/sin per layer type (one rotary table serves every layer of a type)
    for layer, (k, v) in enumerate(_cache_layers(out.past_key_values)):
        if geometry.rope is not None:
            kind = layer if geometry.model_type == "gptj" else (
                geometry.layer_types[layer] if geometry.layer_types else None)
            if kind not in tables:
                tables[kind] = rope_cos_sin(model, geometry, positions, layer)  # (B, T, R) each
            cos, sin = tables[kind]
            k = invert_rope(k.float(), cos, sin, geometry.rope.style).to(k.dtype)
        keys.append(k)  # (B, H_kv, T, D)
        values.append(v)
    return keys, values, out


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
) -> KVCapture:
    """One forward pass returning K/V of every layer (keys pre-rotation). Gradients flow if enabled.

    input_ids, attention_mask: (B, T). Use under `torch.no_grad()` for teachers; the student calls it with
    grad to get its own K/V and logits in one pass. `positions` (B, T) defaults to `cumsum(mask) - 1`.
    `source` (decoders): "hooks" (projection hooks, no cache), "cache" (the model's cache, rotation undone) or
    "auto": hooks where the family is in `KEY_PROJECTION`, else the cache.
    """
    if source not in SOURCES:
        raise KvdistillError(f"forward_kv source '{source}' is unknown", f"use one of {', '.join(SOURCES)}")
    _check_batch(input_ids, attention_mask)
    geometry = geometry or geometry_of(model)
    attn_impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if attentions and attn_impl not in (None, "eager"):
        raise KvdistillError(
            f"attention probabilities were asked of {geometry.name}, which runs {attn_impl} attention (it returns none)",
            "load the model with attn_implementation='eager' (kvdistill.models.load.attn_implementation_for(True))",
        )
    if positions is None:
        positions = positions_from_mask(attention_mask)  # (B, T)
    if geometry.is_encoder:
        keys, values, out = _encoder_kv(model, geometry, input_ids, attention_mask, positions,
                                        hidden_states, attentions)
        return KVCapture(keys=keys, values=values, attention_mask=attention_mask, positions=positions,
                         input_ids=input_ids, geometry=geometry,
                         hidden_states=list(out.hidden_states) if hidden_states else None,
                         attentions=list(out.attentions) if attentions else None)
    # the LM head is only run when logits are wanted (it is the largest matmul for big vocabularies)
    runner = model if logits else model.base_model
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=hidden_states,
                  output_attentions=attentions)
    if _accepts(runner.forward, "position_ids"):
        kwargs["position_ids"] = positions
    if router_logits:
        kwargs["output_router_logits"] = True
    checkpointing = is_checkpointing(model) and model.training and torch.is_grad_enabled()
    modules = _projection_modules(model, geometry) if (source != "cache" or checkpointing) else None
    if modules is None and (source == "hooks" or checkpointing):
        raise KvdistillError(
            f"{geometry.name} ({geometry.model_type}) has no known pre-rotation key module per layer, so its K/V "
            "cannot be taken from projections"
            + (" (needed with gradient checkpointing, which turns the cache off)" if checkpointing else ""),
            f"use a family of {', '.join(sorted(KEY_PROJECTION))}"
            + (", or turn student.gradient_checkpointing off" if checkpointing else ", or source='cache'"),
        )
    if modules is not None:
        keys, values, out = _hooked_decoder_kv(model, runner, geometry, kwargs, modules)
    else:
        keys, values, out = _cached_decoder_kv(model, runner, geometry, kwargs, positions)
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
        router_logits=[r for r in router if r is not None] if (router_logits and router is not None) else None,
    )


def tokenize_for(geometry: KVGeometry, tokenizer, texts: list[str] | str, *, max_length: int | None,
                 padding_side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`tokenize` under the model's position limit: input_ids, attention_mask (B, T) and spans (B, T, 2) (UTF-8 byte
    offsets, padding (0, 0)), all on the CPU."""
    enc = tokenize(tokenizer, texts, max_length=max_length, padding_side=padding_side,
                   max_positions=None if geometry.is_encoder and max_length else geometry.max_positions)
    mask = enc["attention_mask"]
    return enc["input_ids"], mask, enc["offset_mapping"] * mask[..., None]


def capture_tokenized(model: torch.nn.Module, geometry: KVGeometry, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor, spans: torch.Tensor, **flags) -> KVCapture:
    """`forward_kv` (no grad) on CPU inputs from `tokenize_for` (pinned ones are copied asynchronously), with the
    spans attached; `flags` are forward_kv's hidden_states / logits / attentions / router_logits."""
    device = next(model.parameters()).device
    with torch.no_grad():
        cap = forward_kv(model, input_ids.to(device, non_blocking=True),
                         attention_mask.to(device, non_blocking=True), geometry=geometry, **flags)
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
    ids, mask, spans = tokenize_for(geometry, tokenizer, texts, max_length=max_length,
                                    padding_side=padding_side or tokenizer.padding_side)
    return capture_tokenized(model, geometry, ids, mask, spans, hidden_states=hidden_states, logits=logits,
                             attentions=attentions, router_logits=router_logits)
