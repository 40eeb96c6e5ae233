"""Capturing a teacher batch: tokenize on the host, run the frozen model, keep the selected tokens.

Notation: B batch, T teacher tokens, H KV heads, M kept tokens, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from kvdistill.compress import (
    Compression,
    gather_kv,
    gather_spans,
    layer_selection,
    query_rows,
    stacked_rkv_selection,
)
from kvdistill.compress.latent import window_rows
from kvdistill.errors import KvdistillError
from kvdistill.models.capture import capture_tokenized, tokenize_for
from kvdistill.models.geometry import geometry_of
from kvdistill.models.kv_geometry import KVGeometry
from kvdistill.teachers.record import TeacherKV


def answer_query_mask(records: list[dict], spans: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 1 on the tokens of the answer (the last observation): those starting at or after `answer_start`.

    spans (B, T, 2) are UTF-8 byte offsets (`tokenize`), `answer_start` a character offset into
    record["text"]: it is compared as the byte offset of that character. Records without `answer_start` use
    their last real token.
    """
    query = torch.zeros_like(mask)
    for b, rec in enumerate(records):
        start = rec.get("answer_start")
        if start is not None:
            start = len(rec["text"][:start].encode("utf-8", "surrogatepass"))  # character -> byte offset
            # tokens reaching into the answer (byte-level BPE: " 42" starts at the space before it)
            query[b] = ((spans[b, :, 1] > start) & (spans[b, :, 1] > spans[b, :, 0])).long() * mask[b]
        if start is None or not query[b].any():
            last = int(mask[b].nonzero().max())
            query[b, last] = 1
    return query


def cot_candidates(records: list[dict], spans: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 1 on the tokens of each record's chain of thought (its `cot`, the last occurrence before the
    answer), by byte spans; refused, naming the record, when it has none or truncation cut it off."""
    out = torch.zeros_like(mask)
    for b, rec in enumerate(records):
        cot, text = rec.get("cot"), rec["text"]
        end = rec.get("answer_start") or len(text)
        at = text.rfind(cot, 0, end) if cot else -1
        if at >= 0:
            lo = len(text[:at].encode("utf-8", "surrogatepass"))
            hi = lo + len(cot.encode("utf-8", "surrogatepass"))
            s, e = spans[b, :, 0], spans[b, :, 1]
            out[b] = ((s < hi) & (e > lo) & (e > s)).long() * mask[b]
        if not out[b].any():
            raise KvdistillError(
                f"record '{rec.get('id')}' has no chain-of-thought tokens (after truncation) for "
                "compression.span "
                "'cot'",
                "use records with a `cot` field (template mode) and a data.max_length that keeps it, or "
                "compression.span: all",
            )
    return out


@dataclass
class TeacherInputs:
    """The host half of a teacher batch, built without the model (so on another thread while the device runs
    the previous batch): the tokenizer's input_ids, attention_mask (B, T), byte spans (B, T, 2) with padding
    (0, 0), and the rkv answer-query mask (B, T) or None; all CPU (pinned when `prepare_teacher` was given
    pin=True)."""

    records: list[dict]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    spans: torch.Tensor
    query: torch.Tensor | None
    candidates: torch.Tensor | None = None  # (B, T) span 'cot': the tokens that may be kept
    rows: tuple[torch.Tensor, torch.Tensor] | None = None  # rkv: query_rows(query, attention_mask), (B, Q)

    def pin_memory(self) -> TeacherInputs:
        """The same inputs in pinned memory (for asynchronous copies to the GPU)."""

        def pin(x):
            return None if x is None else x.pin_memory()

        return replace(
            self,
            input_ids=pin(self.input_ids),
            attention_mask=pin(self.attention_mask),
            spans=pin(self.spans),
            query=pin(self.query),
            candidates=pin(self.candidates),
            rows=None if self.rows is None else tuple(pin(t) for t in self.rows),
        )


def prepare_teacher(
    tokenizer,
    records: list[dict],
    *,
    geometry: KVGeometry,
    max_length: int | None,
    compression=None,
    pin: bool = False,
) -> TeacherInputs:
    """Tokenize `records` as `capture_teacher` does (right padding, the model's position limit) and build the
    rkv query mask and its query rows on the host (Q, the most rows of a sample, is then known without asking
    the device); pin=True pins the tensors for an asynchronous copy to the GPU."""
    ids, mask, spans = tokenize_for(
        geometry, tokenizer, [r["text"] for r in records], max_length=max_length, padding_side="right"
    )  # (B, T), (B, T), (B, T, 2)
    rkv = getattr(compression, "kind", "full") == "rkv"
    cot = getattr(compression, "span", "all") == "cot"
    candidates = cot_candidates(records, spans, mask) if cot else None
    query = None
    # the rows whose attention is the importance: the answer, or R-KV's window (the last `window` candidates)
    if rkv:
        windowed = getattr(compression, "scoring", "minmax") == "rkv"
        query = (
            window_rows(candidates if cot else mask, compression.window)
            if windowed
            else answer_query_mask(records, spans, mask)
        )
    tensors = [ids, mask, spans, query, candidates]
    rows = None if query is None else query_rows(query, mask)  # (B, Q) each
    inputs = TeacherInputs(records, *tensors, rows=rows)
    return inputs.pin_memory() if pin else inputs


def capture_teacher(
    model,
    tokenizer,
    records: list[dict],
    *,
    max_length: int | None,
    compression=None,
    layers: list[int] | None = None,
    hidden_states=False,
    logits=False,
    attentions=False,
    inputs: TeacherInputs | None = None,
    geometry: KVGeometry | None = None,
):
    """(cap, query_mask) of one batch as a teacher sees it (right padding); query_mask is None unless rkv.

    rkv: families with a separate query projection (`supports_queries`) get their answer-row importance from
    hooked queries, stored as `cap.importance` {layer: (B, H_kv, T)} for `layers` (default all), so
    any attention kernel (sdpa) works; the others capture the eager (B, H, T, T) attention probabilities.
    `inputs`: `prepare_teacher(tokenizer, records, ...)` made beforehand (e.g. on another thread).
    `geometry`: `geometry_of(model)` derived once by a caller that captures many batches.
    """
    from kvdistill.models.queries import capture_queries, query_importance, supports_queries, window_logits

    rkv = getattr(compression, "kind", "full") == "rkv"
    windowed = rkv and getattr(compression, "scoring", "minmax") == "rkv"
    geometry = geometry if geometry is not None else geometry_of(model)
    hooked = rkv and supports_queries(geometry)
    if windowed and not hooked:
        raise KvdistillError(
            f"compression.scoring rkv reads its window's attention logits from the queries, which are "
            f"not captured for family '{geometry.model_type}'",
            "use compression.scoring minmax or kava",
        )
    if inputs is None:
        inputs = prepare_teacher(
            tokenizer, records, geometry=geometry, max_length=max_length, compression=compression
        )
    flags = dict(hidden_states=hidden_states, logits=logits, attentions=attentions or (rkv and not hooked))
    if not hooked:
        cap = capture_tokenized(
            model, geometry, inputs.input_ids, inputs.attention_mask, inputs.spans, **flags
        )
    else:
        with capture_queries(model, geometry) as qc:
            cap = capture_tokenized(
                model, geometry, inputs.input_ids, inputs.attention_mask, inputs.spans, **flags
            )
    query = None if inputs.query is None else inputs.query.to(cap.attention_mask.device, non_blocking=True)
    if inputs.candidates is not None:
        cap.candidates = inputs.candidates.to(cap.attention_mask.device, non_blocking=True)
    if hooked:
        layers = layers if layers is not None else list(range(geometry.num_layers))
        device = cap.attention_mask.device
        rows = None if inputs.rows is None else tuple(t.to(device, non_blocking=True) for t in inputs.rows)
        if windowed:  # R-KV: the window rows' logits (B, H, Q, T) and which rows are real (B, Q)
            if rows is None:
                rows = query_rows(query, cap.attention_mask)
            cap.importance = window_logits(model, cap, qc.queries, rows[0], layers)
            cap.window_valid = rows[1]
        else:
            cap.importance = query_importance(model, cap, qc.queries, query, layers, rows=rows)
    return cap, query


def compress_capture(
    cap, compression: Compression, layers: list[int], query_mask: torch.Tensor | None = None
):
    """A `TeacherKV` holding only the selected tokens of `layers`: keys/values (B, H, M, D), spans
    (B, H, M, 2), mask (B, H, M) long. Kind 'full' keeps the capture's shared (B, T) layout. K/V keep the
    capture's dtype (`compression.dtype` is the storage dtype of the cache)."""
    keys, values, spans, masks = {}, {}, {}, {}
    stacked = stacked_rkv_selection(
        cap, compression, layers
    )  # rkv: groups of layers in one call, when possible
    for layer in layers:
        sel = stacked[layer] if stacked is not None else layer_selection(cap, compression, layer, query_mask)
        if sel is None:
            keys[layer], values[layer] = cap.keys[layer], cap.values[layer]
            spans[layer], masks[layer] = cap.spans, cap.attention_mask
            continue
        idx, kept = sel
        H = cap.keys[layer].shape[1]
        if idx.dim() == 2:  # shared by heads: (B, M) -> (B, H, M)
            idx = idx.unsqueeze(1).expand(-1, H, -1)
            kept = kept.unsqueeze(1).expand(-1, H, -1)
        keys[layer] = gather_kv(cap.keys[layer], idx)  # (B, H, M, D)
        values[layer] = gather_kv(cap.values[layer], idx)  # (B, H, M, D)
        spans[layer] = gather_spans(cap.spans, idx)  # (B, H, M, 2)
        masks[layer] = kept.long()  # (B, H, M)
    return TeacherKV(
        keys=keys,
        values=values,
        spans=spans,
        mask=masks,
        shared_spans=compression.kind == "full",
        capture=cap if compression.kind == "full" else None,
        compression=compression.to_dict(),
    )
