"""The host side of one captured teacher batch: select its stored K/V on the device, copy them to the host
asynchronously, and cut the batch into the per-sample tensors a cache stores.

Notation: B batch, T padded teacher tokens, H_kv KV heads, M kept slots per head (T for full), D head dim,
n stored layers.

Stored sample (what `samples_from_capture` / `host_samples` produce; `CacheWriter` itself accepts any dict of
tensors). T_b is the sample's number of real tokens (padding removed), M_b the kept tokens per head (T_b for
full, min(budget, T_b) for right_crop / rkv; with compression.span 'cot' min(budget, the sample's CoT
tokens)), l a stored teacher layer:
    token_ids   (T_b,)          int64   the teacher's input ids
    positions   (T_b,)          int64   the positions the teacher used
    spans       (T_b, 2)        int64   character [start, end) of each token (specials: start == end)
    keys_l{l}   (H_kv, M_b, D)  dtype   pre-rotation keys of the kept tokens, in time order
    values_l{l} (H_kv, M_b, D)  dtype
    index_l{l}  (H_kv, M_b)     int32   rkv and span cot: which of the T_b tokens each kept slot holds; absent
                                        means 0..M_b-1 (full and right_crop keep the first M_b tokens)
    logit_values (T_b, k)       ldtype  with stored logits (`LogitSpec`): the top-k log-probabilities at τ = 1
                                        of the next token at every real token, descending
    logit_index  (T_b, k)       uint16 | int32  their token ids (int32 for vocabularies over 65,536)
    logit_shift  (T_b, n)       float32 logsumexp(z)/τ − logsumexp(z/τ) at each stored temperature τ
dtype is the compression's storage dtype (`compression.dtype`), ldtype the logits' (`LogitSpec.dtype`); the
logits are of every real token whatever the K/V compression keeps (kvdistill.teachers.logits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

KVPairs = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (keys, values), each (B, H_kv, M, D)


@dataclass
class HostBatch:
    """The selected K/V of one batch on its way to the host, before it is cut into samples (`host_samples`).

    kv (n, 2, B, H_kv, M, D) keys then values in the storage dtype, or a list of n (keys, values) pairs
    (B, H_kv, M, D) when the layers differ in shape; index (n, B, H_kv, M) int32 (rkv only); ids_pos (2, B, T)
    int64 token ids and positions; spans (B, T, 2) or None; mask (B, T) CPU.
    `ready` (a CUDA event, or None on CPU) marks the end of the device -> host copies. `finite` () bool: the
    rkv importance was finite on every real token, checked by `host_samples` (None: checked during the
    selection).
    """

    layers: list[int]
    kind: str
    budget: int | None
    mask: torch.Tensor
    ids_pos: torch.Tensor
    spans: torch.Tensor | None
    kv: torch.Tensor | KVPairs
    index: torch.Tensor | None
    ready: Any = None
    candidates: list[int] | None = None  # span cot: per sample its number of CoT tokens
    finite: torch.Tensor | None = None
    logits: tuple[torch.Tensor, ...] | None = None  # values, index (B, T, k), shift (B, T, n)
    index_dtype: torch.dtype | None = None  # the stored dtype of logits' token ids


def capture_to_host(
    cap, compression, layers: list[int], query_mask: torch.Tensor | None = None, logits=None
) -> HostBatch:
    """Select and gather the stored K/V of `layers` (`compression.resolve_layers`, resolved once by the
    caller) of a `KVCapture` on its device and start one asynchronous copy of them to pinned host memory (plus
    one for ids/positions, one for the rkv index); returns without waiting for the device: nothing here reads
    a value back (the (B, T) mask comes from `cap.attention_mask_cpu` when the capture holds it, the rkv
    importance's finiteness is checked by `host_samples`). On CUDA the K/V of every layer are gathered
    straight into one buffer in the storage dtype (one gather per layer and tensor when the capture's dtype is
    the storage dtype). logits: a `LogitSpec` to keep the capture's (B, T, V) logits as top-k
    log-probabilities (`topk_logprobs`, on the device in chunks of rows), copied with the K/V."""
    device = cap.attention_mask.device
    on_cuda = device.type == "cuda"
    mask_host = cap.attention_mask_cpu
    mask_host = (mask_host if mask_host is not None else cap.attention_mask).cpu()  # (B, T)
    spans = cap.spans_cpu if cap.spans_cpu is not None else cap.spans  # (B, T, 2)
    chosen, finite = _select(cap, compression, layers, query_mask)  # per layer (B, H, M) / (B, M) / None

    def host(x: torch.Tensor) -> torch.Tensor:  # async device -> pinned host copy, waited for in host_samples
        if not on_cuda:
            return x
        out = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        return out.copy_(x, non_blocking=True)

    dtype = compression.torch_dtype
    shapes = {_kept_shape(cap.keys[layer], idx) for layer, idx in zip(layers, chosen, strict=True)}
    shapes |= {_kept_shape(cap.values[layer], idx) for layer, idx in zip(layers, chosen, strict=True)}
    if len(shapes) == 1 and on_cuda:  # one buffer, one copy
        kv_dev = torch.empty(len(layers), 2, *shapes.pop(), dtype=dtype, device=device)  # (n, 2, B, H, M, D)
        for i, (layer, idx) in enumerate(zip(layers, chosen, strict=True)):
            for j, x in enumerate((cap.keys[layer], cap.values[layer])):
                _gather_into(kv_dev[i, j], x, idx)
        kv = host(kv_dev)
    else:
        kv = [
            (host(_kept(cap.keys[layer], idx).to(dtype)), host(_kept(cap.values[layer], idx).to(dtype)))
            for layer, idx in zip(layers, chosen, strict=True)
        ]
    index = _rank_index(cap, compression, chosen)  # (n, B, H, M) int32 or None
    index = None if index is None else host(index)
    ids_pos = host(torch.stack([cap.input_ids.long(), cap.positions.long()]))  # (2, B, T)
    spans = host(spans.long()) if spans is not None and spans.device.type != "cpu" else spans
    finite = None if finite is None else host(finite)
    sparse = None
    if logits is not None:
        from kvdistill.teachers.logits import topk_logprobs

        values, idx, shift = topk_logprobs(cap.logits, logits.k, logits.temperatures, cap.attention_mask)
        index_type = torch.int32 if on_cuda else logits.torch_index_dtype  # uint16 is cast on the host
        sparse = (host(values.to(logits.torch_dtype)), host(idx.to(index_type)), host(shift))
    ready = None
    if on_cuda:
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(device))
    # span cot: a sample keeps min(budget, its CoT tokens), not min(budget, its tokens)
    candidates = getattr(cap, "candidates", None)
    kept = None if candidates is None or compression.span != "cot" else candidates.sum(1).tolist()
    kind, budget = compression.kind, compression.budget
    return HostBatch(
        layers,
        kind,
        budget,
        mask_host,
        ids_pos,
        spans,
        kv,
        index,
        ready,
        kept,
        finite,
        sparse,
        None if logits is None else logits.torch_index_dtype,
    )


def _select(
    cap, compression, layers: list[int], query_mask: torch.Tensor | None
) -> tuple[list[torch.Tensor | None], torch.Tensor | None]:
    """(per layer the time indices of its kept tokens on the device: (B, H, M) for rkv and span cot, one (B,
    M) shared by every layer for right_crop, None for full; the rkv importance's () finiteness flag when it is
    left to `host_samples` to check, else None). Kept real tokens come first."""
    from kvdistill.compress import layer_selection, stacked_rkv_selection
    from kvdistill.compress.select import importance_finite

    if compression.kind == "full":
        return [None] * len(layers), None
    if compression.kind == "right_crop" and compression.span == "all":
        shared = layer_selection(cap, compression, layers[0], query_mask)[0]  # (B, M), for every layer
        return [shared] * len(layers), None
    # rkv: groups of layers in one call when possible, the finiteness check deferred (reading it back would
    # wait)
    stacked = stacked_rkv_selection(cap, compression, layers, check_finite=False)
    finite = None
    if stacked is not None:
        finite = importance_finite(torch.stack([cap.importance[j] for j in layers], 1), cap.attention_mask)
    chosen = []
    for (
        layer
    ) in layers:  # rkv, or the first M CoT tokens (span cot): which real tokens the slots hold is stored
        sel = stacked[layer] if stacked is not None else layer_selection(cap, compression, layer, query_mask)
        idx = sel[0]  # (B, H, M), span cot right_crop: (B, M)
        chosen.append(idx if idx.dim() == 3 else idx.unsqueeze(1).expand(-1, cap.keys[layer].shape[1], -1))
    return chosen, finite


def _kept_shape(x: torch.Tensor, idx: torch.Tensor | None) -> tuple[int, ...]:
    """The shape of `_kept(x, idx)`: (B, H, M, D), M = T for full."""
    return tuple(x.shape) if idx is None else (*x.shape[:2], idx.shape[-1], x.shape[-1])


def _kept(x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """x (B, H, T, D) at idx (B, H, M) or (B, M): (B, H, M, D); all of x for None (full)."""
    from kvdistill.compress import gather_kv

    return x if idx is None else gather_kv(x, idx)


def _gather_into(out: torch.Tensor, x: torch.Tensor, idx: torch.Tensor | None) -> None:
    """out (B, H, M, D) = `_kept(x, idx)` cast to out's dtype, without an intermediate where the dtypes
    agree."""
    if idx is None:
        out.copy_(x)
    elif out.dtype != x.dtype:
        out.copy_(_kept(x, idx))
    else:
        if idx.dim() == 2:  # (B, M) shared by heads
            idx = idx[:, None].expand(x.shape[0], x.shape[1], idx.shape[1])  # (B, H, M)
        torch.gather(x, 2, idx[..., None].expand(*idx.shape, x.shape[-1]), out=out)


def _rank_index(cap, compression, chosen: list[torch.Tensor | None]) -> torch.Tensor | None:
    """(n, B, H, M) int32: which of its sample's real tokens each kept slot holds, for rkv and span cot (None
    for full and right_crop, which keep the first M), in one gather over every layer."""
    if compression.kind == "full" or (compression.kind == "right_crop" and compression.span == "all"):
        return None
    rank = (
        cap.attention_mask.bool().long().cumsum(1) - 1
    )  # (B, T) each real token's index among the real ones
    idx = torch.stack(chosen, 1)  # (B, n, H, M)
    B, n, H, M = idx.shape
    index = rank.gather(1, idx.reshape(B, -1)).view(B, n, H, M)  # (B, n, H, M)
    return index.transpose(0, 1).int().contiguous()  # (n, B, H, M)


def host_samples(batch: HostBatch) -> list[dict[str, torch.Tensor]]:
    """Wait for the copies of a `HostBatch` and cut it into per-sample tensors (layout in the module
    docstring), each owning its storage (safe to hand to `CacheWriter.add(..., copy=False)`). Runs on any
    thread."""
    if batch.ready is not None:
        batch.ready.synchronize()
    if batch.finite is not None and not bool(batch.finite):
        from kvdistill.compress.select import not_finite_error

        raise not_finite_error()
    B = batch.mask.shape[0]
    lengths = batch.mask.sum(1).tolist()  # T_b
    token_ids, positions = batch.ids_pos[0], batch.ids_pos[1]  # (B, T)
    out: list[dict[str, torch.Tensor]] = []
    for b in range(B):
        w = _real_positions(batch.mask[b])  # slice or (T_b,) index
        sample = {"token_ids": _own(token_ids[b, w]), "positions": _own(positions[b, w])}
        if batch.spans is not None:
            sample["spans"] = _own(batch.spans[b, w])
        if batch.logits is not None:
            values, index, shift = batch.logits  # (B, T, k), (B, T, k), (B, T, n)
            sample["logit_values"] = _own(values[b, w])  # (T_b, k)
            sample["logit_index"] = _own(index[b, w].to(batch.index_dtype))
            sample["logit_shift"] = _own(shift[b, w])  # (T_b, n)
        n_b = lengths[b] if batch.candidates is None else batch.candidates[b]  # the tokens that could be kept
        M_b = lengths[b] if batch.budget is None else min(batch.budget, n_b)
        for i, layer in enumerate(batch.layers):
            k, v = batch.kv[i]  # (B, H, M, D) each
            if batch.kind == "full":
                sample[f"keys_l{layer}"] = _own(k[b][:, w])  # (H, T_b, D)
                sample[f"values_l{layer}"] = _own(v[b][:, w])
                continue
            sample[f"keys_l{layer}"] = _own(k[b, :, :M_b])  # (H, M_b, D): kept real tokens come first
            sample[f"values_l{layer}"] = _own(v[b, :, :M_b])
            if batch.index is not None:
                sample[f"index_l{layer}"] = _own(batch.index[i, b, :, :M_b])  # (H, M_b)
        out.append(sample)
    return out


def samples_from_capture(
    cap, compression, query_mask: torch.Tensor | None = None, *, layers: list[int] | None = None, logits=None
) -> list[dict[str, torch.Tensor]]:
    """Per-sample CPU tensors (layout in the module docstring) of a `KVCapture` under a `Compression`.

    rkv needs the importance in `cap.importance` or `cap.attentions`, and a (B, T) `query_mask` of the
    answer tokens. `layers`: the stored layers, default `compression.resolve_layers` of the capture's
    geometry. `logits`: a `LogitSpec` to store the capture's logits (it must hold them) as top-k
    log-probabilities. The selected K/V of every layer are gathered and cast on the capture's device, copied
    to the host asynchronously (pinned memory on CUDA) and waited for once per batch: `capture_to_host`, then
    `host_samples` (which `kvdistill extract` runs on another thread). Each returned tensor owns its storage.
    """
    if layers is None:
        layers = compression.resolve_layers(cap.geometry.num_layers)
    return host_samples(capture_to_host(cap, compression, layers, query_mask, logits))


def _real_positions(real: torch.Tensor):
    """The real positions of one sample's (T,) mask: a slice when they are one run (left or right padding),
    else a (T_b,) index."""
    nz = real.nonzero().squeeze(1)
    if len(nz) and int(nz[-1]) - int(nz[0]) + 1 == len(nz):
        return slice(int(nz[0]), int(nz[-1]) + 1)
    return nz


def _own(x: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor with its own storage (a view of a batch buffer would pin the whole buffer)."""
    x = x.cpu()
    return x.clone() if x.is_contiguous() else x.contiguous()
