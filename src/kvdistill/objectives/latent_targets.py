"""A latent student's K/V targets (`kvdistill.objectives.kava`): a teacher's chain-of-thought K/V compressed
to M entries per (layer, head) (`kvdistill.compress.latent`), from an online capture or as a cache stores
them.

Notation: B batch, H/D a teacher's KV heads/head dim, T its CoT-mode tokens, M latent slots, Q R-KV's window
rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvdistill.compress.latent import latent_target, window_rows
from kvdistill.compress.select import importance_from_attention, query_rows
from kvdistill.errors import KvdistillError
from kvdistill.models.queries import query_importance, window_logits
from kvdistill.objectives.latent_batch import CotView


@dataclass
class LatentTargets:
    """One teacher's targets: per teacher layer j keys / values (B, H_n, M, D_n) and kept (B, H_n, M) bool."""

    keys: dict[int, torch.Tensor]
    values: dict[int, torch.Tensor]
    kept: dict[int, torch.Tensor]


def compress_cot(
    cap,
    view: CotView,
    layers: list[int],
    cfg,
    tokens: int,
    importance: dict | None,
    valid: torch.Tensor | None = None,
) -> LatentTargets:
    """The CoT K/V of `cap` (a CoT-mode capture) compressed to `tokens` entries per (layer, head), detached.
    importance: layer -> (B, H, T) (scoring kava / minmax) or the window logits (B, H, Q, T) with valid (B, Q)
    (scoring rkv), from `cot_importance`."""
    device = cap.attention_mask.device
    cand = view.candidates.to(device)
    keys, values, kept = {}, {}, {}
    for j in layers:
        k, v = cap.keys[j].detach(), cap.values[j].detach()  # (B, H, T, D)
        plan = latent_target(
            cfg.kind,
            cand,
            tokens,
            keys=k,
            importance=None if importance is None else importance[j],
            lam=cfg.lam,
            scoring=cfg.scoring,
            window=cfg.window,
            valid=valid,
        ).heads(k.shape[1])
        keys[j], values[j], kept[j] = plan.gather(k), plan.gather(v), plan.kept
    return LatentTargets(keys, values, kept)


def cached_targets(tkv, layers: list[int], tokens: int, device) -> LatentTargets:
    """A cached teacher's stored latent target (`kvdistill extract` with compression.span cot): keys / values
    (B, H, M_batch, D) and mask (B, H, M_batch), padded with entries that are not kept to `tokens`."""
    keys, values, kept = {}, {}, {}
    for j in layers:
        k, v, m = tkv.keys[j].to(device), tkv.values[j].to(device), tkv.mask[j].to(device).bool()
        short = tokens - k.shape[2]
        if short > 0:
            k = torch.nn.functional.pad(k, (0, 0, 0, short))
            v = torch.nn.functional.pad(v, (0, 0, 0, short))
            m = torch.nn.functional.pad(m, (0, short))
        keys[j], values[j], kept[j] = k.float(), v.float(), m
    return LatentTargets(keys, values, kept)


def cot_importance(
    model, cap, queries, view: CotView, layers: list[int], cfg
) -> tuple[dict, torch.Tensor | None]:
    """(layer -> importance, valid): scorings kava / minmax: (B, H, T) the attention the answer rows pay every
    token, from hooked queries (`queries`) or the capture's eager attention, valid None; scoring rkv: the
    logits (B, H, Q, T) of R-KV's window (the last `window` CoT tokens) from hooked queries, valid (B, Q) its
    real rows."""
    mask = cap.attention_mask
    with torch.no_grad():
        if cfg.scoring == "rkv":
            if queries is None:
                raise KvdistillError(
                    f"scoring rkv reads the window's attention logits from the queries, which are not "
                    f"captured for family '{cap.geometry.model_type}'",
                    "use scoring kava or minmax for this teacher",
                )
            rows, valid = query_rows(window_rows(view.candidates.to(mask.device), cfg.window), mask)
            return window_logits(model, cap, queries, rows, layers), valid
        rows = view.answer_rows.to(mask.device)
        if queries is not None:
            return query_importance(model, cap, queries, rows, layers), None
        return {
            j: importance_from_attention(cap.attentions[j].detach(), rows, mask, cap.keys[j].shape[1])
            for j in layers
        }, None
