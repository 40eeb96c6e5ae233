"""Teacher-KV cache on disk: sharded safetensors plus a manifest; resumable writer, lazy reader.

Directory layout:
    manifest.json                             see kvdistill.cache.manifest
    shard-00000.safetensors, ...              single writer
    part-{i}-shard-00000.safetensors, ...     writer of part i (a SLURM array task), listed in
    manifest.part-{i}.json                    its own manifest until `merge_parts` writes manifest.json

A shard holds `shard_size` samples; tensor `"{j}/{name}"` is tensor `name` of the shard's j-th sample, and
the shard's safetensors metadata `kvdistill_samples` lists the sample ids in order.

Stored sample (what `samples_from_capture` produces; the writer itself accepts any dict of tensors). T_b is the
sample's number of real tokens (padding removed), M_b the kept tokens per head (T_b for full,
min(budget, T_b) for right_crop / rkv), l a stored teacher layer:
    token_ids   (T_b,)          int64   the teacher's input ids
    positions   (T_b,)          int64   the positions the teacher used
    spans       (T_b, 2)        int64   character [start, end) of each token (specials: start == end)
    keys_l{l}   (H_kv, M_b, D)  dtype   pre-rotation keys of the kept tokens, in time order
    values_l{l} (H_kv, M_b, D)  dtype
    index_l{l}  (H_kv, M_b)     int32   rkv only: which of the T_b tokens each kept slot holds; absent means
                                        0..M_b-1 (full and right_crop keep the first M_b tokens)

Crash safety: a shard is written to `<name>.tmp`, fsynced and renamed into place; only then is the manifest,
which lists complete shards only, rewritten the same way. With `background=True` that work (serialisation,
sha256, fsync, rename, manifest) runs on one writer thread, a bounded queue of shards ahead, in shard order. A SIGKILL at any moment leaves a consistent cache.
Reopening the writer removes the leftovers (temp files, a shard that never reached the manifest) and resumes:
`done_ids()` says which samples to skip.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import queue
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from safetensors import safe_open
from safetensors.torch import save as st_save

from kvdistill.cache.manifest import (
    MANIFEST,
    META_FIELDS,
    check_meta,
    fsync_dir,
    meta_mismatches,
    new_manifest,
    part_manifest_name,
    read_manifest,
    shard_file_name,
    write_json_atomic,
)
from kvdistill.errors import CacheError
from kvdistill.teachers.record import TeacherKV

_PART_RE = re.compile(r"^[A-Za-z0-9_]+$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")
_PART_MANIFEST_RE = re.compile(r"^manifest\.part-([A-Za-z0-9_]+)\.json$")
_FIX_META = (
    "use a fresh --out directory, or the teacher / tokenizer / compression / data the cache was written with"
)


# ------------------------------------------------------------------------------------------------ capture


@dataclass
class HostBatch:
    """The selected K/V of one batch on its way to the host, before it is cut into samples (`host_samples`).

    n layers, M the kept slots (T for full): kv (n, 2, B, H_kv, M, D) keys then values in the storage dtype, or a
    list of n (keys, values) pairs (B, H_kv, M, D) when the layers differ in shape; index (n, B, H_kv, M) int32
    (rkv only); ids_pos (2, B, T) int64 token ids and positions; spans (B, T, 2) or None; mask (B, T) CPU.
    `ready` (a CUDA event, or None on CPU) marks the end of the device -> host copies.
    """

    layers: list[int]
    kind: str
    budget: int | None
    mask: torch.Tensor
    ids_pos: torch.Tensor
    spans: torch.Tensor | None
    kv: torch.Tensor | list[tuple[torch.Tensor, torch.Tensor]]
    index: torch.Tensor | None
    ready: Any = None


def capture_to_host(cap, compression, query_mask: torch.Tensor | None = None) -> HostBatch:
    """Select and gather the stored K/V of a `KVCapture` on its device and start one asynchronous copy of them to
    pinned host memory (plus one for ids/positions, one for the rkv index); returns without waiting for the
    device. The (B, T) mask comes from `cap.attention_mask_cpu` when the capture holds it (no sync)."""
    from kvdistill.compress import gather_kv, layer_selection

    dtype = compression.torch_dtype
    device = cap.attention_mask.device
    on_cuda = device.type == "cuda"
    mask_host = cap.attention_mask_cpu
    mask_host = (mask_host if mask_host is not None else cap.attention_mask).cpu()  # (B, T)
    spans = cap.spans_cpu if cap.spans_cpu is not None else cap.spans
    layers = compression.resolve_layers(cap.geometry.num_layers)

    sels: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # per layer: (keys, values) (B, H, M, D)
    index_dev = []
    shared = None  # right_crop: one (B, M) selection for every layer
    rank = None
    for layer in layers:
        K, V = cap.keys[layer], cap.values[layer]  # (B, H, T, D)
        if compression.kind == "full":
            sels.append((K, V))
            continue
        if compression.kind == "right_crop":
            shared = shared if shared is not None else layer_selection(cap, compression, layer, query_mask)
            idx = shared[0]  # (B, M)
        else:
            idx = layer_selection(cap, compression, layer, query_mask)[0]  # (B, H, M)
            if rank is None:  # (B, T) index of each real token among the sample's real tokens
                rank = cap.attention_mask.bool().long().cumsum(1) - 1
            B = idx.shape[0]
            index_dev.append(rank.gather(1, idx.reshape(B, -1)).view(idx.shape).int())  # (B, H, M)
        sels.append((gather_kv(K, idx), gather_kv(V, idx)))

    def host(x: torch.Tensor) -> torch.Tensor:  # async device -> pinned host copy, waited for in host_samples
        if not on_cuda:
            return x
        out = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        return out.copy_(x, non_blocking=True)

    shapes = {tuple(k.shape) for k, _ in sels}
    if len(shapes) == 1 and on_cuda:
        kv_dev = torch.empty(len(layers), 2, *shapes.pop(), dtype=dtype, device=device)  # (n, 2, B, H, M, D)
        for i, (k, v) in enumerate(sels):
            kv_dev[i, 0].copy_(k)
            kv_dev[i, 1].copy_(v)
        kv = host(kv_dev)
    else:
        kv = [(host(k.to(dtype)), host(v.to(dtype))) for k, v in sels]
    index = host(torch.stack(index_dev)) if index_dev else None  # (n, B, H, M)
    ids_pos = host(torch.stack([cap.input_ids.long(), cap.positions.long()]))  # (2, B, T)
    spans = host(spans.long()) if spans is not None and spans.device.type != "cpu" else spans
    ready = None
    if on_cuda:
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(device))
    return HostBatch(
        layers, compression.kind, compression.budget, mask_host, ids_pos, spans, kv, index, ready
    )


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
        M_b = lengths[b] if batch.budget is None else min(batch.budget, lengths[b])
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
    cap, compression, query_mask: torch.Tensor | None = None
) -> list[dict[str, torch.Tensor]]:
    """Per-sample CPU tensors (layout in the module docstring) of a `KVCapture` under a `Compression`.

    rkv needs the importance in `cap.importance` or `cap.attentions`, and a (B, T) `query_mask` of the
    answer tokens. The selected K/V of every layer are gathered and cast on the capture's device, copied to the
    host asynchronously (pinned memory on CUDA) and waited for once per batch: `capture_to_host`, then
    `host_samples` (which `kvdistill extract` runs on another thread). Each returned tensor owns its storage.
    """
    return host_samples(capture_to_host(cap, compression, query_mask))


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


# ------------------------------------------------------------------------------------------------- writer


def _own_files(directory: Path, part: str | None) -> tuple[list[Path], list[Path]]:
    """(temp files, shard files) that belong to this writer's part."""
    prefix = "shard-" if part is None else f"part-{part}-shard-"
    manifest_tmp = part_manifest_name(part) + ".tmp"
    temps, shards = [], []
    for p in directory.iterdir():
        if p.name == manifest_tmp or (p.name.startswith(prefix) and p.name.endswith(".tmp")):
            temps.append(p)
        elif p.name.startswith(prefix) and p.name.endswith(".safetensors"):
            shards.append(p)
    return temps, shards


class CacheWriter:
    """Append samples to a cache directory, a shard at a time; reopen the same directory to resume.

    meta: `make_meta(...)` (teacher, tokenizer, compression, dataset). shard_size: samples per shard.
    part: name of this writer's part of a sharded extraction (e.g. the SLURM array index), or None.
    Only one writer per (directory, part) at a time: a second one gets a CacheError.
    background: write shards on one writer thread while the caller computes the next batch; at most
    `max_pending` full shards wait in its queue (`add` blocks beyond that). A shard enters the manifest only once
    it is durably on disk; an error on the writer thread is raised by the next `add`, `flush` or `close`.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        meta: dict[str, Any],
        shard_size: int = 256,
        part: str | int | None = None,
        *,
        background: bool = False,
        max_pending: int = 2,
    ):
        if not isinstance(shard_size, int) or isinstance(shard_size, bool) or shard_size < 1:
            raise CacheError(f"shard_size {shard_size!r} must be a positive integer", "e.g. shard_size=256")
        part = None if part is None else str(part)
        if part is not None and not _PART_RE.match(part):
            raise CacheError(
                f"part {part!r} must be letters, digits or '_'", "use the array index, e.g. part=3"
            )
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.part, self.shard_size = part, shard_size
        self.meta = check_meta(meta)
        self._manifest_path = self.dir / part_manifest_name(part)
        self._lock = FileLock(str(self.dir / f".{part_manifest_name(part)}.lock"))
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            raise CacheError(
                f"another writer holds {self._manifest_path}",
                "wait for it to finish, or give this writer a different part",
            ) from None
        try:
            self.manifest = self._open()
        except BaseException:
            self._lock.release()
            raise
        self._buffer: list[tuple[str, dict[str, torch.Tensor]]] = []
        self._buffered: set[str] = set()  # ids buffered or queued, not yet in the manifest
        self._next_shard = len(self.manifest["shards"])
        self._manifest_lock = threading.Lock()
        self._error: BaseException | None = None
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        if background:
            if not isinstance(max_pending, int) or max_pending < 1:
                self._lock.release()
                raise CacheError(
                    f"max_pending {max_pending!r} must be a positive integer", "e.g. max_pending=2"
                )
            self._queue = queue.Queue(maxsize=max_pending)
            self._thread = threading.Thread(target=self._worker, name="kvdistill-cache-writer", daemon=True)
            self._thread.start()
        self.closed = False

    def _open(self) -> dict[str, Any]:
        others = sorted(p.name for p in self.dir.glob("manifest.part-*.json"))
        if self.part is None and others:
            raise CacheError(
                f"{self.dir} holds part manifests {others[:3]}: it is a sharded extraction",
                "write with part=<index>, or run merge_parts on it",
            )
        if self.part is not None and (self.dir / MANIFEST).exists():
            merged = read_manifest(self.dir / MANIFEST).get("merged_from")
            if merged is None:
                raise CacheError(
                    f"{self.dir} holds a single-writer cache", "write parts into a fresh directory"
                )
        if self._manifest_path.exists():
            manifest = read_manifest(self._manifest_path)
            bad = meta_mismatches(manifest, self.meta)
            if bad:
                raise CacheError(
                    f"cannot resume into {self.dir}: its manifest differs from this run: " + "; ".join(bad),
                    _FIX_META,
                )
            manifest["complete"] = False
        else:
            manifest = new_manifest(self.meta, self.part)
        temps, shards = _own_files(self.dir, self.part)
        listed = {s["file"] for s in manifest["shards"]}
        missing = sorted(listed - {p.name for p in shards})
        if missing:
            raise CacheError(
                f"cache {self.dir} lists shard files that are gone: {missing[:3]}",
                "restore them, or delete the directory and re-extract",
            )
        for p in temps + [p for p in shards if p.name not in listed]:  # leftovers of a killed run
            p.unlink()
        write_json_atomic(self._manifest_path, manifest)
        return manifest

    # ---------------------------------------------------------------------------------------------- api

    def done_ids(self) -> set[str]:
        """Sample ids stored in complete shards or buffered by this writer: `add` refuses them."""
        with self._manifest_lock:
            return set(self.manifest["samples"]) | self._buffered

    def __len__(self) -> int:
        return len(self.done_ids())

    def add(self, sample_id: str, tensors: dict[str, torch.Tensor], *, copy: bool = True) -> None:
        """Buffer one sample; a full buffer is written as a shard. copy=False: the caller hands over tensors it
        will not modify (e.g. `samples_from_capture`'s), CPU ones are then stored without a copy."""
        self._raise_worker_error()
        if self.closed:
            raise CacheError("add() on a closed CacheWriter", "open a new CacheWriter on the directory")
        if not isinstance(sample_id, str) or not sample_id:
            raise CacheError(f"sample id {sample_id!r} must be a non-empty string", "use the record's 'id'")
        if sample_id in self._buffered or sample_id in self.manifest["samples"]:
            raise CacheError(
                f"sample {sample_id!r} is already in the cache {self.dir}",
                "skip the ids in writer.done_ids() when resuming",
            )
        if not isinstance(tensors, dict) or not tensors:
            raise CacheError(
                f"sample {sample_id!r}: tensors must be a non-empty dict of name -> Tensor",
                "see samples_from_capture for the layout",
            )
        stored = {}
        for name, t in tensors.items():
            if not isinstance(name, str) or not _NAME_RE.match(name):
                raise CacheError(
                    f"sample {sample_id!r}: tensor name {name!r} must match [A-Za-z0-9_.-]+",
                    "rename the tensor, e.g. keys_l3",
                )
            if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
                raise CacheError(
                    f"sample {sample_id!r}: {name} is a {type(t).__name__}, not a dense Tensor",
                    "pass dense torch tensors",
                )
            c = t.detach().to("cpu")
            if copy:
                c = c.contiguous()
                c = c.clone() if c.data_ptr() == t.data_ptr() else c  # own storage, never a view
            stored[name] = c
        self._buffer.append((sample_id, stored))
        self._buffered.add(sample_id)
        if len(self._buffer) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write the buffered samples as one shard (even if fewer than shard_size), then the manifest; in the
        background mode, queue them for the writer thread (blocking while `max_pending` shards wait)."""
        self._raise_worker_error()
        if not self._buffer:
            return
        job = (self._next_shard, self._buffer)
        self._next_shard += 1
        self._buffer = []
        if self._queue is None:
            self._write_shard(*job)
            return
        while True:  # wait for room, but notice a writer thread that died meanwhile
            try:
                self._queue.put(job, timeout=0.1)
                return
            except queue.Full:
                self._raise_worker_error()

    def _write_shard(self, k: int, samples: list[tuple[str, dict[str, torch.Tensor]]]) -> None:
        """Shard k: serialise, fsync, rename into place; only then list it (and its samples) in the manifest."""
        name = shard_file_name(self.part, k)
        ids = [sid for sid, _ in samples]
        flat = {f"{j}/{key}": t.contiguous() for j, (_, d) in enumerate(samples) for key, t in d.items()}
        data = st_save(flat, metadata={"kvdistill_samples": json.dumps(ids)})
        path, tmp = self.dir / name, self.dir / (name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(self.dir)
        entry = {
            "file": name,
            "sha256": hashlib.sha256(data).hexdigest(),
            "num_samples": len(ids),
            "bytes": len(data),
        }
        with self._manifest_lock:
            self.manifest["shards"].append(entry)
            for j, sid in enumerate(ids):
                self.manifest["samples"][sid] = {"shard": k, "index": j}
            self._buffered.difference_update(ids)
            write_json_atomic(self._manifest_path, self.manifest)

    def _worker(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                if self._error is None:  # after a failure, later shards are dropped (never listed)
                    self._write_shard(*job)
            except BaseException as err:  # surfaced in the caller's thread
                self._error = err
            finally:
                self._queue.task_done()

    def _raise_worker_error(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            self._stop_worker()
            self.closed = True
            if self._lock.is_locked:
                self._lock.release()
            raise CacheError(
                f"writing a shard of {self.dir} failed: {type(err).__name__}: {err}",
                "check the disk (space, permissions), then rerun the same command: it resumes",
            ) from err

    def _stop_worker(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._thread = None

    def close(self, complete: bool = True) -> None:
        """Flush the last partial shard and wait for the writer thread; `complete` marks the extraction finished
        in the manifest."""
        if self.closed:
            return
        try:
            self.flush()
            self._stop_worker()
            self._raise_worker_error()
            if complete:
                self.manifest["complete"] = True
                write_json_atomic(self._manifest_path, self.manifest)
        finally:
            self._stop_worker()
            if not self.closed:
                self.closed = True
                self._lock.release()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(complete=exc_type is None)


def merge_parts(
    out_dir: str | os.PathLike, expected_parts: int | None = None, require_complete: bool = True
) -> dict[str, Any]:
    """Combine `manifest.part-*.json` into `manifest.json` (part manifests are kept, so it can be rerun).

    Errors name the parts whose meta differs, that are incomplete or missing (`expected_parts`: 0..n-1), and
    sample ids stored twice.
    """
    directory = Path(out_dir)
    found = {}
    for p in directory.glob("manifest.part-*.json"):
        m = _PART_MANIFEST_RE.match(p.name)
        if m:
            found[m.group(1)] = read_manifest(p)
    if not found:
        raise CacheError(
            f"no part manifests (manifest.part-*.json) in {directory}",
            "run the extraction with part=<index> first",
        )
    if (directory / MANIFEST).exists() and "merged_from" not in read_manifest(directory / MANIFEST):
        raise CacheError(
            f"{directory} also holds a single-writer manifest.json", "merge parts in their own dir"
        )
    order = sorted(found, key=lambda s: (0, int(s), s) if s.isdigit() else (1, 0, s))
    problems = []
    if expected_parts is not None:
        missing = [str(i) for i in range(expected_parts) if str(i) not in found]
        if missing:
            problems.append(f"missing parts {missing} of {expected_parts}")
    first = order[0]
    for part in order:
        m = found[part]
        bad = meta_mismatches(found[first], m)
        if bad:
            problems.append(f"part {part} differs from part {first}: " + "; ".join(bad))
        if require_complete and not m.get("complete"):
            problems.append(f"part {part} is incomplete (its writer was not closed)")
    owner: dict[str, str] = {}
    dups = []
    for part in order:
        for sid in found[part]["samples"]:
            if sid in owner:
                dups.append(f"{sid!r} (parts {owner[sid]} and {part})")
            owner[sid] = part
    if dups:
        problems.append(f"{len(dups)} sample id(s) stored twice: {', '.join(dups[:5])}")
    if problems:
        raise CacheError(
            f"cannot merge parts in {directory}: " + "; ".join(problems),
            "rerun the failed / missing array tasks (they resume), or pass require_complete=False",
        )
    merged = {k: found[first][k] for k in ("schema_version", *META_FIELDS)}
    merged.update(
        shards=[],
        samples={},
        complete=all(found[p].get("complete") for p in order),
        part=None,
        merged_from=order,
        created=min(found[p]["created"] for p in order),
        kvdistill_version=found[first]["kvdistill_version"],
    )
    for part in order:
        offset = len(merged["shards"])
        merged["shards"].extend(found[part]["shards"])
        for sid, entry in found[part]["samples"].items():
            merged["samples"][sid] = {"shard": entry["shard"] + offset, "index": entry["index"]}
    merged["merged"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    write_json_atomic(directory / MANIFEST, merged)
    return merged


# ------------------------------------------------------------------------------------------------- reader


class CacheReader:
    """Read a cache directory: `.get(sample_id)` loads one sample's tensors lazily (one open handle per shard).

    A map-style dataset too: `len(reader)`, `reader[i]` is the i-th stored sample (order of `sample_ids`).
    """

    def __init__(self, path: str | os.PathLike):
        self.dir = Path(path)
        if not self.dir.is_dir():
            raise CacheError(
                f"cache directory {self.dir} does not exist", "run `kvdistill extract` to write it"
            )
        mpath = self.dir / MANIFEST
        if not mpath.exists() and any(self.dir.glob("manifest.part-*.json")):
            raise CacheError(
                f"{self.dir} holds part manifests but no manifest.json",
                "run kvdistill.cache.merge_parts on it once every part has finished",
            )
        self.manifest = read_manifest(mpath)
        self.meta: dict[str, Any] = {k: self.manifest[k] for k in META_FIELDS}
        self.index: dict[str, tuple[int, int]] = {
            sid: (int(e["shard"]), int(e["index"])) for sid, e in self.manifest["samples"].items()
        }
        self.sample_ids: list[str] = list(self.index)
        self._handles: dict[int, Any] = {}
        self._names: dict[int, dict[int, list[str]]] = {}

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    @property
    def compression(self):
        from kvdistill.compress import Compression

        return Compression.from_dict(self.meta["compression"])

    @property
    def layers(self) -> list[int]:
        """Stored teacher layers."""
        layers = self.meta["compression"].get("layers")
        if layers is not None:
            return list(layers)
        geometry = self.meta["teacher"].get("geometry") or {}
        if "num_layers" in geometry:
            return list(range(int(geometry["num_layers"])))
        if not self.sample_ids:
            return []
        names = self.get(self.sample_ids[0])
        return sorted(int(n[len("keys_l") :]) for n in names if n.startswith("keys_l"))

    def __len__(self) -> int:
        return len(self.sample_ids)

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self.index

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.get(self.sample_ids[i])

    def _handle(self, shard: int):
        if shard not in self._handles:
            entry = self.manifest["shards"][shard]
            path = self.dir / entry["file"]
            try:
                handle = safe_open(str(path), framework="pt")
            except FileNotFoundError:
                raise CacheError(f"shard {path} is missing", "restore it, or re-extract the cache") from None
            except Exception as e:  # safetensors raises its own error types for damaged headers
                raise CacheError(
                    f"shard {path} cannot be read ({e})",
                    "run kvdistill.cache.verify_cache on the directory, then re-extract",
                ) from None
            names: dict[int, list[str]] = {}
            for key in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                j, _, name = key.partition("/")
                names.setdefault(int(j), []).append(name)
            self._handles[shard], self._names[shard] = handle, names
        return self._handles[shard]

    def get(self, sample_id: str) -> dict[str, torch.Tensor]:
        if sample_id not in self.index:
            raise CacheError(
                f"sample {sample_id!r} is not in the cache {self.dir}",
                "extract the cache over the same records as this run",
            )
        shard, j = self.index[sample_id]
        handle = self._handle(shard)
        names = self._names[shard].get(j)
        if not names:
            raise CacheError(
                f"shard {self.manifest['shards'][shard]['file']} has no sample {j} ({sample_id!r})",
                "the cache is damaged: run verify_cache, then re-extract",
            )
        return {name: handle.get_tensor(f"{j}/{name}") for name in sorted(names)}

    def get_batch(self, sample_ids: list[str]) -> list[dict[str, torch.Tensor]]:
        return [self.get(sid) for sid in sample_ids]

    def check_compatible(self, expected_meta: dict[str, Any]) -> list[str]:
        """Messages for every meta field of `expected_meta` (teacher, tokenizer, compression, dataset) that differs."""
        return meta_mismatches(self.meta, expected_meta)

    def require_compatible(self, expected_meta: dict[str, Any]) -> None:
        bad = self.check_compatible(expected_meta)
        if bad:
            raise CacheError(
                f"cache {self.dir} does not match this run: " + "; ".join(bad),
                "re-extract the cache for this teacher, tokenizer, compression and data "
                "(`kvdistill extract`), or point cache_dir at the matching cache",
            )

    def teacher_kv(self, sample_ids: list[str], device="cpu", dtype: torch.dtype | None = None):
        """A right-padded `TeacherKV` batch. Kind full: keys (B, H, T, D) with shared spans (B, T, 2) and mask
        (B, T); otherwise keys (B, H, M, D), spans (B, H, M, 2), mask (B, H, M) per layer."""
        samples = self.get_batch(sample_ids)
        B = len(samples)
        layers = self.layers
        shared = self.meta["compression"].get("kind", "full") == "full"
        T = max(s["token_ids"].shape[0] for s in samples)
        tok_mask = torch.zeros(B, T, dtype=torch.long)
        tok_spans = torch.zeros(B, T, 2, dtype=torch.long)
        for b, s in enumerate(samples):
            n = s["token_ids"].shape[0]
            tok_mask[b, :n] = 1
            if "spans" in s:
                tok_spans[b, :n] = s["spans"]
        keys, values, spans, mask = {}, {}, {}, {}
        for layer in layers:
            ks = [s[f"keys_l{layer}"] for s in samples]  # B × (H, M_b, D)
            H, _, D = ks[0].shape
            M = max(k.shape[1] for k in ks)
            kd = dtype or ks[0].dtype
            K = torch.zeros(B, H, M, D, dtype=kd)
            V = torch.zeros(B, H, M, D, dtype=kd)
            idx = torch.zeros(B, H, M, dtype=torch.long)
            kept = torch.zeros(B, H, M, dtype=torch.long)
            for b, s in enumerate(samples):
                m = ks[b].shape[1]
                K[b, :, :m] = ks[b]
                V[b, :, :m] = s[f"values_l{layer}"]
                ix = s.get(f"index_l{layer}")
                idx[b, :, :m] = ix.long() if ix is not None else torch.arange(m)
                kept[b, :, :m] = 1
            keys[layer], values[layer] = K.to(device), V.to(device)
            if shared:
                spans[layer], mask[layer] = tok_spans.to(device), tok_mask.to(device)
            else:
                sp = tok_spans.unsqueeze(1).expand(B, H, T, 2).gather(2, idx.unsqueeze(-1).expand(B, H, M, 2))
                spans[layer], mask[layer] = (sp * kept.unsqueeze(-1)).to(device), kept.to(device)
        return TeacherKV(
            keys=keys,
            values=values,
            spans=spans,
            mask=mask,
            shared_spans=shared,
            compression=dict(self.meta["compression"]),
            sample_ids=list(sample_ids),
        )

    def close(self) -> None:
        self._handles.clear()
        self._names.clear()

    def __enter__(self) -> CacheReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
