"""Teacher sources, a tagged union: an online model run on each batch, or a cache written by `kvdistill extract`.

Both return a `TeacherKV` for a list of records. Notation: B batch, H heads (H_t), M kept tokens per layer
(M = T_t when uncompressed), D head dim.

Per stored layer l: keys[l], values[l] (B, H, M, D) pre-rotation; spans[l] (B, H, M, 2) character spans of the
kept tokens; mask[l] (B, H, M) 1 where a real token is kept. Uncompressed teachers share one (B, T_t, 2) span
tensor across layers and heads (`shared_spans`), so the token alignment is computed once per batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvdistill.errors import KvdistillError
from kvdistill.models.capture import KVCapture, capture_tokenized, tokenize_for
from kvdistill.models.geometry import KVGeometry, geometry_of


@dataclass
class TeacherKV:
    keys: dict[int, torch.Tensor]  # layer -> (B, H, M, D)
    values: dict[int, torch.Tensor]  # layer -> (B, H, M, D)
    spans: dict[int, torch.Tensor]  # layer -> (B, H, M, 2) or the shared (B, T_t, 2)
    mask: dict[int, torch.Tensor]  # layer -> (B, H, M) or the shared (B, T_t)
    shared_spans: bool = True
    capture: KVCapture | None = None  # online, uncompressed: hidden states, logits, attentions
    extra: dict = field(default_factory=dict)


def _from_capture(cap: KVCapture, layers: list[int]) -> TeacherKV:
    spans = cap.spans  # (B, T, 2)
    mask = cap.attention_mask  # (B, T)
    return TeacherKV(keys={i: cap.keys[i] for i in layers}, values={i: cap.values[i] for i in layers},
                     spans=dict.fromkeys(layers, spans), mask=dict.fromkeys(layers, mask), shared_spans=True,
                     capture=cap)


def answer_query_mask(records: list[dict], spans: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 1 on the tokens of the answer (the last observation): those starting at or after `answer_start`.

    Records without `answer_start` use their last real token.
    """
    query = torch.zeros_like(mask)
    for b, rec in enumerate(records):
        start = rec.get("answer_start")
        if start is not None:
            query[b] = ((spans[b, :, 0] >= start) & (spans[b, :, 1] > spans[b, :, 0])).long() * mask[b]
        if start is None or not query[b].any():
            last = int(mask[b].nonzero().max())
            query[b, last] = 1
    return query


@dataclass
class TeacherInputs:
    """The host half of a teacher batch, built without the model (so on another thread while the device runs the
    previous batch): the tokenizer's input_ids, attention_mask (B, T), spans (B, T, 2) with padding (0, 0), and
    the rkv answer-query mask (B, T) or None; all CPU (pinned when `prepare_teacher` was given pin=True)."""

    records: list[dict]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    spans: torch.Tensor
    query: torch.Tensor | None


def prepare_teacher(tokenizer, records: list[dict], *, geometry: KVGeometry, max_length: int | None,
                    compression=None, pin: bool = False) -> TeacherInputs:
    """Tokenize `records` as `capture_teacher` does (right padding, the model's position limit) and build the
    rkv query mask on the host; pin=True pins the tensors for an asynchronous copy to the GPU."""
    ids, mask, spans = tokenize_for(geometry, tokenizer, [r["text"] for r in records], max_length=max_length,
                                    padding_side="right")  # (B, T), (B, T), (B, T, 2)
    rkv = getattr(compression, "kind", "full") == "rkv"
    query = answer_query_mask(records, spans, mask) if rkv else None
    tensors = [ids, mask, spans, query]
    if pin:
        tensors = [None if t is None else t.pin_memory() for t in tensors]
    return TeacherInputs(records, *tensors)


def capture_teacher(model, tokenizer, records: list[dict], *, max_length: int | None, compression=None,
                    layers: list[int] | None = None, hidden_states=False, logits=False, attentions=False,
                    inputs: TeacherInputs | None = None):
    """(cap, query_mask) of one batch as a teacher sees it (right padding); query_mask is None unless rkv.

    rkv: families with a separate query projection (`supports_queries`) get their answer-row importance from
    hooked queries, stored as `cap.extra["importance"]` {layer: (B, H_kv, T)} for `layers` (default all), so
    any attention kernel (sdpa) works; the others capture the eager (B, H, T, T) attention probabilities.
    `inputs`: `prepare_teacher(tokenizer, records, ...)` made beforehand (e.g. on another thread).
    """
    from kvdistill.models.queries import capture_queries, query_importance, supports_queries

    rkv = getattr(compression, "kind", "full") == "rkv"
    geometry = geometry_of(model)
    hooked = rkv and supports_queries(geometry)
    if inputs is None:
        inputs = prepare_teacher(tokenizer, records, geometry=geometry, max_length=max_length,
                                 compression=compression)
    flags = dict(hidden_states=hidden_states, logits=logits, attentions=attentions or (rkv and not hooked))
    if not hooked:
        cap = capture_tokenized(model, geometry, inputs.input_ids, inputs.attention_mask, inputs.spans, **flags)
    else:
        with capture_queries(model, geometry) as qc:
            cap = capture_tokenized(model, geometry, inputs.input_ids, inputs.attention_mask, inputs.spans, **flags)
    query = None if inputs.query is None else inputs.query.to(cap.attention_mask.device, non_blocking=True)
    if hooked:
        layers = layers if layers is not None else list(range(geometry.num_layers))
        cap.extra["importance"] = query_importance(model, cap, qc.queries, query, layers)
    return cap, query


class OnlineTeacher:
    """A frozen model run under no_grad on every batch."""

    kind = "online"

    def __init__(self, name: str, model, tokenizer, *, compression=None, layers: list[int] | None = None):
        self.name = name
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.geometry: KVGeometry = geometry_of(model, name=name)
        self.compression = compression  # kvdistill.compress.Compression or None (= full)
        self.layers = layers if layers is not None else list(range(self.geometry.num_layers))

    def to(self, device) -> OnlineTeacher:
        self.model.to(device)
        return self

    @torch.no_grad()
    def kv(self, records: list[dict], *, max_length: int, hidden_states=False, logits=False,
           attentions=False) -> TeacherKV:
        cap, query = capture_teacher(self.model, self.tokenizer, records, max_length=max_length,
                                     compression=self.compression, layers=self.layers,
                                     hidden_states=hidden_states, logits=logits, attentions=attentions)
        if getattr(self.compression, "kind", "full") == "full":
            return _from_capture(cap, self.layers)
        from kvdistill.compress import compress_capture

        return compress_capture(cap, self.compression, self.layers, query)


class CachedTeacher:
    """K/V read from a cache directory written by `kvdistill extract`."""

    kind = "cache"

    def __init__(self, name: str, reader):
        self.name = name
        self.reader = reader
        self.geometry = KVGeometry.from_dict(reader.meta["teacher"]["geometry"])
        self.layers = reader.layers

    def to(self, device) -> CachedTeacher:
        self.device = device
        return self

    def kv(self, records: list[dict], *, max_length: int, hidden_states=False, logits=False,
           attentions=False) -> TeacherKV:
        if hidden_states or logits or attentions:
            raise KvdistillError(f"teacher '{self.name}' comes from a cache, which holds only K/V",
                                 "use only the kv / cosine losses with cached teachers, or run it online")
        missing = [r["id"] for r in records if r["id"] not in self.reader.index]
        if missing:
            raise KvdistillError(f"cache of teacher '{self.name}' has no entry for samples {missing[:5]}",
                                 "extract the cache over the same data config as training")
        return self.reader.teacher_kv([r["id"] for r in records], device=getattr(self, "device", "cpu"))
