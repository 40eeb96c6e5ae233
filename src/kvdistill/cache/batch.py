"""The host side of one captured teacher batch: select its stored K/V on the device, copy them to the host
asynchronously, and cut the batch into the per-sample tensors a cache stores.

Notation: B batch, T padded teacher tokens, H_kv KV heads, M kept slots per head (T for full), D head dim,
n stored layers.

Stored sample (what `samples_from_capture` / `host_samples` produce; `CacheWriter` itself accepts any dict of
tensors). T_b is the sample's number of real tokens (padding removed), M_b the kept tokens per head (T_b for
full, min(budget, T_b) for right_crop / rkv; with compression.span 'cot' min(budget, the sample's CoT tokens)),
l a stored teacher layer:
    token_ids   (T_b,)          int64   the teacher's input ids
    positions   (T_b,)          int64   the positions the teacher used
    spans       (T_b, 2)        int64   character [start, end) of each token (specials: start == end)
    keys_l{l}   (H_kv, M_b, D)  dtype   pre-rotation keys of the kept tokens, in time order
    values_l{l} (H_kv, M_b, D)  dtype
    index_l{l}  (H_kv, M_b)     int32   rkv and span cot: which of the T_b tokens each kept slot holds; absent means
                                        0..M_b-1 (full and right_crop keep the first M_b tokens)
dtype is the compression's storage dtype (`compression.dtype`).
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
    `ready` (a CUDA event, or None on CPU) marks the end of the device -> host copies.
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


def capture_to_host(cap, compression, layers: list[int], query_mask: torch.Tensor | None = None) -> HostBatch:
    """Select and gather the stored K/V of `layers` (`compression.resolve_layers`, resolved once by the caller)
    of a `KVCapture` on its device and start one asynchronous copy of them to pinned host memory (plus one for
    ids/positions, one for the rkv index); returns without waiting for the device. The (B, T) mask comes from
    `cap.attention_mask_cpu` when the capture holds it (no sync)."""
    device = cap.attention_mask.device
    on_cuda = device.type == "cuda"
    mask_host = cap.attention_mask_cpu
    mask_host = (mask_host if mask_host is not None else cap.attention_mask).cpu()  # (B, T)
    spans = cap.spans_cpu if cap.spans_cpu is not None else cap.spans  # (B, T, 2)
    selected, index_dev = _select(cap, compression, layers, query_mask)

    def host(x: torch.Tensor) -> torch.Tensor:  # async device -> pinned host copy, waited for in host_samples
        if not on_cuda:
            return x
        out = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        return out.copy_(x, non_blocking=True)

    dtype = compression.torch_dtype
    shapes = {tuple(k.shape) for k, _ in selected}
    if len(shapes) == 1 and on_cuda:  # one buffer, one copy
        kv_dev = torch.empty(len(layers), 2, *shapes.pop(), dtype=dtype, device=device)  # (n, 2, B, H, M, D)
        for i, (k, v) in enumerate(selected):
            kv_dev[i, 0].copy_(k)
            kv_dev[i, 1].copy_(v)
        kv = host(kv_dev)
    else:
        kv = [(host(k.to(dtype)), host(v.to(dtype))) for k, v in selected]
    index = host(torch.stack(index_dev)) if index_dev else None  # (n, B, H, M)
    ids_pos = host(torch.stack([cap.input_ids.long(), cap.positions.long()]))  # (2, B, T)
    spans = host(spans.long()) if spans is not None and spans.device.type != "cpu" else spans
    ready = None
    if on_cuda:
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(device))
    # span cot: a sample keeps min(budget, its CoT tokens), not min(budget, its tokens)
    candidates = getattr(cap, "candidates", None)
    kept = None if candidates is None or compression.span != "cot" else candidates.sum(1).tolist()
    return HostBatch(
        layers, compression.kind, compression.budget, mask_host, ids_pos, spans, kv, index, ready, kept
    )


def _select(
    cap, compression, layers: list[int], query_mask: torch.Tensor | None
) -> tuple[KVPairs, list[torch.Tensor]]:
    """(per layer the kept (keys, values) (B, H, M, D) on the device, per layer the rkv index (B, H, M) int32
    of each kept token among its sample's real tokens; empty unless rkv). Kept real tokens come first."""
    from kvdistill.compress import gather_kv, layer_selection, stacked_rkv_selection

    selected: KVPairs = []
    index_dev = []
    shared = None  # right_crop: one (B, M) selection for every layer
    rank = None
    stacked = stacked_rkv_selection(cap, compression, layers)  # rkv: groups of layers in one call, when possible
    for layer in layers:
        K, V = cap.keys[layer], cap.values[layer]  # (B, H, T, D)
        if compression.kind == "full":
            selected.append((K, V))
            continue
        if compression.kind == "right_crop" and compression.span == "all":
            shared = shared if shared is not None else layer_selection(cap, compression, layer, query_mask)
            idx = shared[0]  # (B, M)
        else:  # rkv, or the first M CoT tokens (span cot): which real tokens the slots hold is stored
            chosen = stacked[layer] if stacked is not None else layer_selection(cap, compression, layer, query_mask)
            idx = chosen[0]  # (B, H, M), right_crop: (B, M)
            if idx.dim() == 2:
                idx = idx.unsqueeze(1).expand(-1, K.shape[1], -1)  # (B, H, M)
            if rank is None:  # (B, T) index of each real token among the sample's real tokens
                rank = cap.attention_mask.bool().long().cumsum(1) - 1
            B = idx.shape[0]
            index_dev.append(rank.gather(1, idx.reshape(B, -1)).view(idx.shape).int())  # (B, H, M)
        selected.append((gather_kv(K, idx), gather_kv(V, idx)))
    return selected, index_dev


def host_samples(batch: HostBatch) -> list[dict[str, torch.Tensor]]:
    """Wait for the copies of a `HostBatch` and cut it into per-sample tensors (layout in the module docstring),
    each owning its storage (safe to hand to `CacheWriter.add(..., copy=False)`). Runs on any thread."""
    if batch.ready is not None:
        batch.ready.synchronize()
    B = batch.mask.shape[0]
    lengths = batch.mask.sum(1).tolist()  # T_b
    token_ids, positions = batch.ids_pos[0], batch.ids_pos[1]  # (B, T)
    out: list[dict[str, torch.Tensor]] = []
    for b in range(B):
        w = _real_positions(batch.mask[b])  # slice or (T_b,) index
        sample = {"token_ids": _own(token_ids[b, w]), "positions": _own(positions[b, w])}
        if batch.spans is not None:
            sample["spans"] = _own(batch.spans[b, w])
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
    cap, compression, query_mask: torch.Tensor | None = None, *, layers: list[int] | None = None
) -> list[dict[str, torch.Tensor]]:
    """Per-sample CPU tensors (layout in the module docstring) of a `KVCapture` under a `Compression`.

    rkv needs the importance in `cap.importance` or `cap.attentions`, and a (B, T) `query_mask` of the
    answer tokens. `layers`: the stored layers, default `compression.resolve_layers` of the capture's geometry.
    The selected K/V of every layer are gathered and cast on the capture's device, copied to the host
    asynchronously (pinned memory on CUDA) and waited for once per batch: `capture_to_host`, then
    `host_samples` (which `kvdistill extract` runs on another thread). Each returned tensor owns its storage.
    """
    if layers is None:
        layers = compression.resolve_layers(cap.geometry.num_layers)
    return host_samples(capture_to_host(cap, compression, layers, query_mask))


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
