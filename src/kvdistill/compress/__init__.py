"""kvdistill.compress: which teacher tokens to keep (full | right_crop | rkv), batched and vectorised in torch.

`compress_capture` applies a `Compression` to a `KVCapture` for training with an online teacher; the same
selection feeds the on-disk cache (`kvdistill.cache.samples_from_capture`).
"""

from __future__ import annotations

import torch

from kvdistill.compress.select import (
    DTYPES,
    KINDS,
    Compression,
    gather_kv,
    gather_spans,
    importance_from_attention,
    importance_from_queries,
    key_redundancy,
    query_rows,
    right_crop,
    rkv_scores,
    rkv_select,
    select,
    select_full,
)
from kvdistill.errors import KvdistillError

__all__ = [
    "DTYPES",
    "KINDS",
    "Compression",
    "compress_capture",
    "gather_kv",
    "gather_spans",
    "importance_from_attention",
    "importance_from_queries",
    "key_redundancy",
    "layer_selection",
    "query_rows",
    "right_crop",
    "rkv_scores",
    "rkv_select",
    "select",
    "select_full",
]


def layer_selection(cap, compression: Compression, layer: int, query_mask: torch.Tensor | None):
    """(idx, kept) for one layer of a capture: (B, M) shared by heads for right_crop, (B, H_kv, M) for rkv.

    Returns None for kind 'full'. rkv takes the importance (B, H_kv, T) from `cap.extra["importance"][layer]`
    when the capture holds it (`kvdistill.train.teachers.capture_teacher`: hooked queries, any attention
    kernel), else from `cap.attentions` (eager) and the (B, T) query mask of the answer tokens.
    """
    mask = cap.attention_mask
    if compression.kind == "full":
        return None
    if compression.kind == "right_crop":
        return right_crop(mask, compression.budget)
    ready = (getattr(cap, "extra", None) or {}).get("importance", {}).get(layer)
    if ready is not None:
        return rkv_select(cap.keys[layer], ready, mask, compression.budget, compression.lam)
    if cap.attentions is None or cap.attentions[layer] is None:
        raise KvdistillError(
            f"rkv compression needs attention probabilities of layer {layer}",
            "capture the teacher with attentions=True and eager attention",
        )
    if query_mask is None:
        raise KvdistillError(
            "rkv compression needs a query mask marking the answer tokens",
            "pass kvdistill.train.teachers.answer_query_mask(records, spans, mask)",
        )
    imp = importance_from_attention(cap.attentions[layer], query_mask, mask, cap.geometry.num_kv_heads)
    return rkv_select(cap.keys[layer], imp, mask, compression.budget, compression.lam)


def compress_capture(
    cap, compression: Compression, layers: list[int], query_mask: torch.Tensor | None = None
):
    """A `TeacherKV` holding only the selected tokens of `layers`: keys/values (B, H, M, D), spans
    (B, H, M, 2), mask (B, H, M) long. Kind 'full' keeps the capture's shared (B, T) layout. K/V keep the
    capture's dtype (`compression.dtype` is the storage dtype of the cache)."""
    from kvdistill.train.teachers import TeacherKV

    keys, values, spans, masks = {}, {}, {}, {}
    for layer in layers:
        sel = layer_selection(cap, compression, layer, query_mask)
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
        extra={"compression": compression.to_dict()},
    )
