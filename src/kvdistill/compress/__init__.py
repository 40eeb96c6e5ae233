"""kvdistill.compress: which teacher tokens to keep (full | right_crop | rkv), batched and vectorised in
torch.

`layer_selection` is the one selection of a layer that both the online teacher
(`kvdistill.teachers.compress_capture`) and the on-disk cache (`kvdistill.cache`) apply.
"""

from __future__ import annotations

import torch

from kvdistill.compress.select import (
    DTYPES,
    KINDS,
    Compression,
    gather_kv,
    gather_spans,
    importance_finite,
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
    "gather_kv",
    "gather_spans",
    "importance_from_attention",
    "importance_finite",
    "importance_from_queries",
    "key_redundancy",
    "layer_selection",
    "stacked_rkv_selection",
    "query_rows",
    "right_crop",
    "rkv_scores",
    "rkv_select",
    "select",
    "select_full",
]


def layer_selection(cap, compression: Compression, layer: int, query_mask: torch.Tensor | None):
    """(idx, kept) for one layer of a capture: (B, M) shared by heads for right_crop, (B, H_kv, M) for rkv.

    Returns None for kind 'full'. rkv takes the importance (B, H_kv, T) from `cap.importance[layer]`
    when the capture holds it (`kvdistill.teachers.capture_teacher`: hooked queries, any attention
    kernel), else from `cap.attentions` (eager) and the (B, T) query mask of the answer tokens.
    """
    mask = cap.attention_mask
    if compression.kind == "full":
        return None
    if compression.span == "cot" or compression.scoring != "minmax":
        return _latent_selection(cap, compression, layer, query_mask)
    if compression.kind == "right_crop":
        return right_crop(mask, compression.budget)
    ready = (cap.importance or {}).get(layer)
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
            "pass kvdistill.teachers.answer_query_mask(records, spans, mask)",
        )
    imp = importance_from_attention(cap.attentions[layer], query_mask, mask, cap.geometry.num_kv_heads)
    return rkv_select(cap.keys[layer], imp, mask, compression.budget, compression.lam)


def _latent_selection(cap, compression: Compression, layer: int, query_mask: torch.Tensor | None):
    """`layer_selection` through `kvdistill.compress.latent` (span 'cot': only `cap.candidates`; scorings kava
    / rkv): (B, M) for right_crop, (B, H_kv, M) for rkv, kept tokens first in time order as everywhere
    else."""
    from kvdistill.compress.latent import latent_target

    candidates = cap.attention_mask if compression.span == "all" else getattr(cap, "candidates", None)
    if candidates is None:
        raise KvdistillError(
            "compression.span 'cot' needs the capture's chain-of-thought tokens (cap.candidates)",
            "capture through kvdistill.teachers.capture_teacher, which marks them",
        )
    importance = valid = None
    if (
        compression.kind == "rkv" and compression.scoring == "rkv"
    ):  # the window logits (B, H, Q, T), rows (B, Q)
        importance, valid = (cap.importance or {}).get(layer), getattr(cap, "window_valid", None)
        if importance is None or valid is None:
            raise KvdistillError(
                f"scoring rkv needs the window logits of layer {layer}",
                "capture through kvdistill.teachers.capture_teacher (hooked queries)",
            )
    elif compression.kind == "rkv":
        importance = (cap.importance or {}).get(layer)
        if importance is None:
            if cap.attentions is None or cap.attentions[layer] is None or query_mask is None:
                raise KvdistillError(
                    f"rkv compression needs the attention importance of layer {layer}",
                    "capture the teacher with its query rows (capture_teacher) or eager attention",
                )
            importance = importance_from_attention(
                cap.attentions[layer], query_mask, cap.attention_mask, cap.keys[layer].shape[1]
            )
    plan = latent_target(
        compression.kind,
        candidates,
        compression.budget,
        keys=cap.keys[layer],
        importance=importance,
        lam=compression.lam,
        scoring=compression.scoring,
        window=compression.window,
        valid=valid,
    )
    idx, kept = plan.index[..., 0], plan.kept  # (B, G, M)
    if compression.kind == "right_crop":
        return idx[:, 0], kept[:, 0]  # (B, M) shared by heads
    return idx, kept


def stacked_rkv_selection(
    cap, compression: Compression, layers: list[int], group: int = 8, *, check_finite: bool = True
) -> dict | None:
    """`layer_selection` of every layer in `layers` for plain rkv (span all, scoring minmax) when the capture
    holds each layer's importance and the layers share one K shape: `group` layers are scored and ranked in
    one call (`rkv_select` over group dims (L, H)), not one call per layer. {layer: (idx, kept) (B, H, M)},
    equal to the per-layer selections; None when it does not apply (the caller selects per layer).
    check_finite=False: the caller checks `importance_finite` itself (the check reads a flag back from the
    device)."""
    importance = cap.importance or {}
    plain = compression.kind == "rkv" and compression.span == "all" and compression.scoring == "minmax"
    if not plain or not layers or any(j not in importance for j in layers):
        return None
    if len({tuple(cap.keys[j].shape) for j in layers}) != 1:
        return None
    out = {}
    for lo in range(0, len(layers), group):
        chunk = layers[lo : lo + group]
        keys = torch.stack([cap.keys[j] for j in chunk], 1)  # (B, L, H, T, D)
        imp = torch.stack([importance[j] for j in chunk], 1)  # (B, L, H, T)
        idx, kept = rkv_select(
            keys, imp, cap.attention_mask, compression.budget, compression.lam, check_finite=check_finite
        )  # (B, L, H, M)
        out.update({j: (idx[:, n], kept[:, n]) for n, j in enumerate(chunk)})
    return out
