"""Real K and V of every attention layer, with keys taken back to before the rotary rotation.

Notation: B batch, L K/V layers, H_kv KV heads, T time, D head dim (D_v values), V vocab, E experts.

Stored layout (one per K/V layer, L entries; `geometry.decoder_layers` says which decoder layers those are):
keys[l], values[l] are (B, H_kv, T, D), float, padding positions hold whatever the model produced there and
must be masked with `attention_mask`. Keys are pre-rotation: the model's cached key with the rotation at
`positions` undone, so that two models (or a student and a teacher) are compared on content, not on where
their tokens sit.

Decoders, two sources giving the same K/V (tests/models/test_capture.py and test_family_sweep.py check it):
  hooks  (default where a probe finds them): forward hooks on each attention's key and value modules (k_proj,
         or the k_norm / k_layernorm that follows it; v_proj or v_norm; a fused qkv projection split the way
         the family lays it out) give the key before the rotation and the value directly, for every token (also
         past a sliding window); the model runs with `use_cache=False`, so no cache is built and no rotation is
         undone. Which module and layout holds the pre-rotation key is not looked up in a table: one probe
         forward per model (`hook_plan`) compares every candidate with the inverse-rotated cache and keeps the
         one that reproduces it in every layer.
  cache  (everything else, or `source="cache"`): the model's own cache (`use_cache=True`; where layers slide,
         a `DynamicCache(config=...)` whose sliding layers record their past, so no token is dropped), keys
         taken back through `invert_rope` with the tables the model handed each attention. Multi-head latent
         attention (DeepSeek-V2/V3 and kin) caches a latent and the shared rotated key: the rotation is undone
         on the latter and the attention's own `expand_kv` gives per-head K and V.
Positions are `cumsum(mask) - 1`, so left and right padding give each sample the positions it would get alone.
Encoders (BERT-style): hooks on the key/value projections.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from kvdistill.align.bytes import byte_spans
from kvdistill.errors import KvdistillError
from kvdistill.models.chat import ChatText, render, shared_spans
from kvdistill.models.geometry import SLIDING_LAYER_TYPES, KVGeometry, decoder_attention_modules, geometry_of
from kvdistill.models.rope import invert_rope, layer_tables, probe_ids, probing, record_tables

SOURCES = ("auto", "hooks", "cache")
# Child modules of an attention that may hold the pre-rotation key / the value, most specific first.
KEY_CANDIDATES = ("k_norm", "k_layernorm", "key_layernorm", "key_norm", "k_proj", "key", "k", "wk")
VALUE_CANDIDATES = ("v_norm", "v_layernorm", "value_norm", "v_proj", "value", "v", "wv")
FUSED_CANDIDATES = ("qkv_proj", "query_key_value", "c_attn", "Wqkv", "W_pack", "qkv", "kv_proj")


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
    """Per K/V layer the (cos, sin) (B, T, R) the model applied (`kvdistill.models.rope` layout), None: unrotated."""
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
            rotary=None if self.rotary is None else [
                None if t is None else (cut(t[0], 1), cut(t[1], 1)) for t in self.rotary],
        )


def tokenize(tokenizer, texts: list[str], *, max_length: int | None = None, padding_side: str = "right",
             max_positions: int | None = None, add_special_tokens: bool = True):
    """Tokenize a batch with token spans; every text must yield at least one non-special token.
    `add_special_tokens=False`: no BOS/EOS framing (a part that continues a sequence, e.g. a latent student's answer).

    Returns a BatchEncoding with input_ids, attention_mask (B, T) and offset_mapping (B, T, 2), where the spans are
    UTF-8 byte offsets [start, end) into each text (`kvdistill.align.bytes.byte_spans` of the tokenizer's character
    offsets: exact where one character is split into several tokens; equal to them on ASCII text, except that a
    '▁' Llama-2 prepends onto the text's first character covers no byte). Special tokens have empty spans; padding
    rows are (0, 0). A conversation (`kvdistill.models.chat.ChatText`) is tokenized in this tokenizer's own chat
    template, its spans mapped into the conversation's shared text (template markup: empty spans).
    """
    if isinstance(texts, str):
        texts = [texts]
    if not texts:
        raise KvdistillError("no texts given", "pass a non-empty list of strings")
    if not getattr(tokenizer, "is_fast", False):
        raise KvdistillError(f"tokenizer {type(tokenizer).__name__} is not a fast tokenizer",
                             "character offsets need a fast (Rust) tokenizer; load it with use_fast=True")
    renderings = _chat_renderings(tokenizer, texts)
    shared_texts, texts = texts, [r.text if r is not None else t for r, t in zip(renderings, texts, strict=True)]
    old_side = tokenizer.padding_side
    tokenizer.padding_side = padding_side
    try:
        if any(r is not None for r in renderings):  # a rendered chat template carries its own special tokens
            if not all(r is not None for r in renderings):
                raise KvdistillError("a batch mixes chat (messages) records with plain texts",
                                     "give every record of a dataset the same format")
            add_special_tokens = False
        enc = tokenizer(list(texts), return_offsets_mapping=True, padding=True,
                        truncation=max_length is not None, max_length=max_length,
                        add_special_tokens=add_special_tokens)
    finally:
        tokenizer.padding_side = old_side
    # lists -> int64 tensors through numpy (torch.tensor walks nested lists several times slower, holding the GIL
    # that a tokenize thread shares with the thread launching the teacher's kernels)
    for key in list(enc.keys()):
        enc[key] = torch.from_numpy(np.asarray(enc[key], dtype=np.int64))
    offsets = enc["offset_mapping"]  # (B, T, 2) characters
    if offsets.dim() != 3:  # every text empty and no BOS: the tokenizer returns (B, 0)
        offsets = offsets.reshape(len(texts), -1, 2)
    offsets = byte_spans(tokenizer, texts, enc["input_ids"], offsets)  # (B, T, 2) UTF-8 bytes
    if renderings[0] is not None:  # bytes of each model's rendering -> bytes of the shared text (models.chat)
        real = enc["attention_mask"].bool()  # (B, T)
        for b, r in enumerate(renderings):
            offsets[b, real[b]] = shared_spans(offsets[b, real[b]], r.pieces)
    enc["offset_mapping"] = offsets
    # special tokens written out in the text ("<|endoftext|>") have a span but are no content; <unk> stands for text
    framing = {getattr(tokenizer, f"{n}_token_id", None) for n in ("bos", "eos", "pad", "cls", "sep")}
    special = [i for i in tokenizer.all_special_ids if i != tokenizer.unk_token_id or i in framing]
    content = (offsets[..., 1] > offsets[..., 0]) & enc["attention_mask"].bool()  # (B, T)
    if special:
        content &= ~torch.isin(enc["input_ids"], torch.tensor(special, dtype=enc["input_ids"].dtype))
    empty = [i for i in range(len(texts)) if not content[i].any()]
    if empty:
        shown = ", ".join(f"#{i} {shared_texts[i][:40]!r}" for i in empty[:5])
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


def token_counts(tokenizer, texts: list[str], *, chunk: int = 512) -> list[int]:
    """How many tokens each text is for this tokenizer before any truncation, as `tokenize` would make them (a
    conversation in the tokenizer's chat template)."""
    counts = []
    for lo in range(0, len(texts), chunk):
        part = texts[lo : lo + chunk]
        renderings = _chat_renderings(tokenizer, part)
        plain = [t for t, r in zip(part, renderings, strict=True) if r is None]
        chats = [r.text for r in renderings if r is not None]
        ids_plain = iter(tokenizer(plain, add_special_tokens=True)["input_ids"] if plain else [])
        ids_chat = iter(tokenizer(chats, add_special_tokens=False)["input_ids"] if chats else [])
        counts += [len(next(ids_plain) if r is None else next(ids_chat)) for r in renderings]
    return counts


def _chat_renderings(tokenizer, texts) -> list:
    """Per text: its rendering in `tokenizer`'s chat template when it is a conversation (`models.chat.ChatText`),
    else None."""
    return [render(tokenizer, t) if isinstance(t, ChatText) else None for t in texts]


def continuation(tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text `new_ids` add after `prompt_ids`: decode(prompt + new) minus decode(prompt).

    SentencePiece decoders treat the first token of a sequence specially (a leading '▁' is dropped), so the new ids
    are decoded in the context of the prompt rather than alone. (For the four zoo tokenizers both agree on
    arithmetic answers, also on transformers 5.17.) Falls back to the ids alone when the prompt's text is not a
    prefix of the whole (a tokenizer whose decoding is not prefix-stable)."""
    whole = tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=True)
    head = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    if whole.startswith(head):
        return whole[len(head) :]
    return tokenizer.decode(new_ids, skip_special_tokens=True)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions each real token has when its sample runs alone: cumsum(mask) - 1, padding at 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


_ACCEPTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # function -> {name: accepted}


def _accepts(fn, name: str) -> bool:
    """`fn` takes a keyword `name` (by name or through **kwargs); read once per function (a signature is slow next
    to a forward)."""
    func = getattr(fn, "__func__", fn)
    try:
        known = _ACCEPTS.setdefault(func, {})
    except TypeError:  # not weak-referenceable
        known = {}
    if name not in known:
        try:
            params = inspect.signature(fn).parameters
            var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
            known[name] = name in params or var_kw
        except (TypeError, ValueError):
            known[name] = True
    return known[name]


def _names(fn, name: str) -> bool:
    """`fn` names the parameter `name` itself (not only through **kwargs)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _cache_of(out):
    """The cache a forward returned (transformers 5: `cache`; 4.x: `past_key_values`), None if it returned none."""
    keys = out.keys() if hasattr(out, "keys") else ()
    for name in ("cache", "past_key_values"):
        if name in keys and out[name] is not None:
            return out[name]
    return None


def cache_argument(module: torch.nn.Module) -> str:
    """The keyword a model's forward takes its K/V cache by (transformers 5.2x: `cache`; before: `past_key_values`)."""
    return "cache" if _names(module.forward, "cache") else "past_key_values"


def returned_cache(out):
    """The cache a forward returned, None if none (public name of `_cache_of`)."""
    return _cache_of(out)


def _cache_layers(cache) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
    """(keys, values) per decoder layer of a cache; (None, None) for layers that keep no K/V."""
    cache = getattr(cache, "self_attention_cache", cache)  # encoder-decoder families: the decoder's own cache
    if hasattr(cache, "layers"):
        return [(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in cache.layers]
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



# ------------------------------------------------------------------------------------------------- cache
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


def _run_with_cache(model, runner, geometry, kwargs):
    cache = _fresh_cache(model, geometry)
    extra = {"use_cache": True}
    if cache is not None:
        extra["cache" if _names(runner.forward, "cache") else "past_key_values"] = cache
    out = runner(**{**kwargs, **extra})
    found = _cache_of(out)
    if found is None:
        raise KvdistillError(
            f"{geometry.name} ({geometry.model_type}) returned no K/V cache: its attention keeps none, so there are "
            "no attention layers to capture",
            "use a family whose attention keeps a K/V cache (state-space and recurrent models have none)",
        )
    return out, found


def _is_latent(attn) -> bool:
    """Multi-head latent attention: the cache holds (latent, shared rotated key), `expand_kv` makes K and V."""
    return attn is not None and callable(getattr(attn, "expand_kv", None))


def _kv_from_cache(model, geometry, cache, tables):
    """Per K/V layer (keys pre-rotation (B, H_kv, T, D), values (B, H_kv, T, D_v)) from a filled cache."""
    layers = _cache_layers(cache)
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
        if _is_latent(attn):
            latent, k_rot = k, v  # (B, 1, T, r), (B, 1, T, R) rotated
            if tables[i] is not None:
                k_rot = invert_rope(k_rot.float(), *tables[i], rope.style).to(k_rot.dtype)
            k, v = attn.expand_kv(latent, k_rot)  # (B, H, T, D), (B, H, T, D_v)
        elif tables[i] is not None:
            k = invert_rope(k.float(), *tables[i], rope.style, rope.offset).to(k.dtype)
        keys.append(k)
        values.append(v)
    return keys, values


def _cached_decoder_kv(model, runner, geometry, kwargs):
    """K/V from the model's own cache, keys taken back through the inverse rotation."""
    with record_tables(model, geometry) as raw:
        out, cache = _run_with_cache(model, runner, geometry, kwargs)
    tables = layer_tables(model, geometry, raw, kwargs["attention_mask"].shape[0])
    keys, values = _kv_from_cache(model, geometry, cache, tables)
    return keys, values, out, tables


# ------------------------------------------------------------------------------------------------- hooks
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
    if split == "grouped" and H_q % H == 0 and width == (H_q + 2 * H) * D:  # per KV group [q x g, k, v] (falcon)
        g = H_q // H
        return out.view(B, T, H, g + 2, D)[:, :, :, g + j].transpose(1, 2)
    if split == "kv" and width == 2 * H * D:  # [k | v] (jetmoe)
        return out[..., j * H * D : (j + 1) * H * D].reshape(B, T, H, D).transpose(1, 2)
    return None


_LAYOUTS = ("flat", "bthd", "bhtd")
_SPLITS = ("split:contiguous", "split:per_head", "split:grouped", "split:kv")
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> list[(key, value) HookSource] | None


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
    """Per K/V layer the modules whose outputs are its pre-rotation key and its value, or None where some layer
    has none (latent attention, a norm applied after the rotation, ...). Found once per model by a probe forward
    that compares every candidate with the keys and values taken from the cache."""
    if model in _PLANS:
        return _PLANS[model]
    attns = decoder_attention_modules(model)
    layers = [attns.get(layer) for layer in geometry.decoder_layers]
    if any(a is None or _is_latent(a) for a in layers):
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
    if _accepts(model.forward, "position_ids"):
        kwargs["position_ids"] = torch.arange(ids.shape[1], device=ids.device)[None]
    try:
        with probing(model), record_tables(model, geometry) as raw:
            _, cache = _run_with_cache(model, model, geometry, kwargs)
    finally:
        for h in handles:
            h.remove()
    tables = layer_tables(model, geometry, raw, 1)
    keys, values = _kv_from_cache(model, geometry, cache, tables)
    H_q = geometry.num_attention_heads
    plan = []
    for i, (key_cands, value_cands) in enumerate(candidates):
        H, D, D_v = geometry.kv_heads_of(i), geometry.head_dim_of(i), geometry.value_dim_of(i)
        key = next((c for c in key_cands if _close(c.read(seen.get(id(c.module)), H, D, H_q), keys[i])), None)
        value = next((c for c in value_cands if _close(c.read(seen.get(id(c.module)), H, D_v, H_q), values[i])), None)
        if key is None or value is None:
            _PLANS[model] = None
            return None
        plan.append((key, value))
    _PLANS[model] = plan
    return plan


def _hooked_decoder_kv(model, runner, geometry, kwargs, plan):
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
        handles.append(value_src.module.register_forward_hook(store(values, i, value_src, geometry.value_dim_of(i))))
    try:
        with record_tables(model, geometry) as raw:
            out = runner(**{**kwargs, "use_cache": False})
    finally:
        for h in handles:
            h.remove()
    tables = layer_tables(model, geometry, raw, kwargs["attention_mask"].shape[0])
    return list(keys), list(values), out, tables


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
    `inputs_embeds` (B, T, H) (decoders): fed instead of the embeddings of input_ids (a latent student's latent
    slots have no token); input_ids is then only recorded in the capture.
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
    if inputs_embeds is not None and (geometry.is_encoder or inputs_embeds.shape[:2] != input_ids.shape):
        raise KvdistillError(
            f"inputs_embeds {tuple(inputs_embeds.shape)} given for {geometry.name} with input_ids "
            f"{tuple(input_ids.shape)}" + (" (an encoder)" if geometry.is_encoder else ""),
            "pass (B, T, hidden) embeddings for the (B, T) batch of a decoder")
    if geometry.is_encoder:
        keys, values, out = _encoder_kv(model, geometry, input_ids, attention_mask, positions,
                                        hidden_states, attentions)
        return KVCapture(keys=keys, values=values, attention_mask=attention_mask, positions=positions,
                         input_ids=input_ids, geometry=geometry,
                         hidden_states=list(out.hidden_states) if hidden_states else None,
                         attentions=list(out.attentions) if attentions else None)
    # the LM head is only run when logits are wanted (it is the largest matmul for big vocabularies)
    runner = model if logits else model.base_model
    kwargs = dict(attention_mask=attention_mask, output_hidden_states=hidden_states, output_attentions=attentions)
    if inputs_embeds is None:
        kwargs["input_ids"] = input_ids
    else:
        kwargs["inputs_embeds"] = inputs_embeds
    if _accepts(runner.forward, "position_ids"):
        kwargs["position_ids"] = positions
    if router_logits:
        kwargs["output_router_logits"] = True
    checkpointing = model.training and torch.is_grad_enabled() and is_checkpointing(model)  # a walk: last
    plan = hook_plan(model, geometry) if (source != "cache" or checkpointing) else None
    if plan is None and (source == "hooks" or checkpointing):
        raise KvdistillError(
            f"{geometry.name} ({geometry.model_type}) has no module per layer whose output is the pre-rotation key "
            "and the value, so its K/V cannot be taken from hooks"
            + (" (needed with gradient checkpointing, which turns the cache off)" if checkpointing else ""),
            "turn student.gradient_checkpointing off" if checkpointing else "use source='cache' (or 'auto')",
        )
    if plan is not None:
        keys, values, out, tables = _hooked_decoder_kv(model, runner, geometry, kwargs, plan)
    else:
        keys, values, out, tables = _cached_decoder_kv(model, runner, geometry, kwargs)
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
        rotary=tables if geometry.rope is not None else None,
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
