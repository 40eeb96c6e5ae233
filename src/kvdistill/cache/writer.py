"""The crash-safe, resumable writer of a teacher-KV cache: sharded safetensors plus a manifest.

Directory layout:
    manifest.json                             see kvdistill.cache.manifest
    shard-00000.safetensors, ...              single writer
    part-{i}-shard-00000.safetensors, ...     writer of part i (a SLURM array task), listed in
    manifest.part-{i}.json                    its own manifest until `merge_parts` writes manifest.json

A shard holds `shard_size` samples; tensor `"{j}/{name}"` is tensor `name` of the shard's j-th sample, and
the shard's safetensors metadata `kvdistill_samples` lists the sample ids in order. What a sample holds is the
writer's caller's choice; `kvdistill extract` stores the layout in `kvdistill.cache.batch`.

Crash safety: a shard is written to `<name>.tmp`, fsynced and renamed into place; only then is the manifest,
which lists complete shards only, rewritten the same way. With `background=True` that work (serialisation,
sha256, fsync, rename, manifest) runs on one writer thread, a bounded queue of shards ahead, in shard order.
A SIGKILL at any moment leaves a consistent cache. Reopening the writer removes the leftovers (temp files, a
shard that never reached the manifest) and resumes: `done_ids()` says which samples to skip.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import threading
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from safetensors.torch import save as st_save

from kvdistill.atomic import fsync_dir, write_json_atomic
from kvdistill.cache.manifest import (
    MANIFEST,
    check_meta,
    meta_mismatches,
    new_manifest,
    part_manifest_name,
    read_manifest,
    shard_file_name,
)
from kvdistill.errors import CacheError
from kvdistill.paths import not_a_dir_problem

_PART_RE = re.compile(r"^[A-Za-z0-9_]+$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")
_FIX_META = (
    "use a fresh --out directory, or the teacher / tokenizer / compression / data the cache was written with"
)


# safetensors dtype names, in the order of its Dtype enum (a file lists its tensors by descending dtype, then
# name)
_ST_DTYPES = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.int16: "I16",
    torch.uint16: "U16",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int32: "I32",
    torch.uint32: "U32",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.uint64: "U64",
}
_ST_RANK = {dtype: rank for rank, dtype in enumerate(_ST_DTYPES)}


def safetensors_parts(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> list:
    """The bytes of `safetensors.torch.save(tensors, metadata)` as a list of buffers: the header, then each
    tensor's memory as it is (no copy of the whole file in memory, and nothing that holds the GIL while large
    buffers are copied: the caller writes and hashes the parts). CPU contiguous tensors; a dtype safetensors
    names differently falls back to `save`."""
    if any(t.dtype not in _ST_DTYPES for t in tensors.values()):
        return [st_save(tensors, metadata=metadata)]
    order = sorted(tensors, key=lambda n: (-_ST_RANK[tensors[n].dtype], n))
    header: dict[str, Any] = {"__metadata__": metadata}
    data, offset = [], 0
    for name in order:
        t = tensors[name]
        raw = t.reshape(-1).view(torch.uint8).numpy()  # (bytes,), the tensor's own memory
        end = offset + raw.size
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, end]}
        offset = end
        data.append(memoryview(raw))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-aligned
    return [len(text).to_bytes(8, "little") + text, *data]


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
    `max_pending` full shards wait in its queue (`add` blocks beyond that). A shard enters the manifest only
    once it is durably on disk; an error on the writer thread is raised by the next `add`, `flush` or `close`.
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
        if background and (
            not isinstance(max_pending, int) or isinstance(max_pending, bool) or max_pending < 1
        ):
            raise CacheError(f"max_pending {max_pending!r} must be a positive integer", "e.g. max_pending=2")
        part = None if part is None else str(part)
        if part is not None and not _PART_RE.match(part):
            raise CacheError(
                f"part {part!r} must be letters, digits or '_'", "use the array index, e.g. part=3"
            )
        self.dir = Path(out_dir)
        problem = not_a_dir_problem(self.dir, "the cache directory")
        if problem:
            raise CacheError(problem.problem, problem.fix)
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
        """Buffer one sample; a full buffer is written as a shard. copy=False: the caller hands over tensors
        it will not modify (e.g. `samples_from_capture`'s), CPU ones are then stored without a copy."""
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
        """Shard k: serialise, fsync, rename into place; only then list it (and its samples) in the
        manifest."""
        name = shard_file_name(self.part, k)
        ids = [sid for sid, _ in samples]
        flat = {f"{j}/{key}": t.contiguous() for j, (_, d) in enumerate(samples) for key, t in d.items()}
        parts = safetensors_parts(flat, {"kvdistill_samples": json.dumps(ids)})
        path, tmp = self.dir / name, self.dir / (name + ".tmp")
        digest, size = hashlib.sha256(), 0
        with open(tmp, "wb") as f:
            for part in parts:  # file writes and hashing of large buffers run without the GIL
                f.write(part)
                digest.update(part)
                size += len(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(self.dir)
        entry = {"file": name, "sha256": digest.hexdigest(), "num_samples": len(ids), "bytes": size}
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
        """Flush the last partial shard and wait for the writer thread; `complete` marks the extraction
        finished in the manifest."""
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
