"""Reading a teacher-KV cache (layout in `kvdistill.cache.writer`, samples in `kvdistill.cache.batch`): lazy
per-sample loads and right-padded `kvdistill.teachers.TeacherKV` batches; `open_teacher_cache`, the reader of
a `source: cache` teacher checked against the run (training opens its cached teachers through it).

Notation: B batch, H KV heads, T tokens of the longest sample, M kept slots per head, D head dim.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open

from kvdistill.atomic import sha256_file
from kvdistill.cache.manifest import (
    MANIFEST,
    META_FIELDS,
    location_problems,
    meta_mismatches,
    read_manifest,
    shard_path,
)
from kvdistill.errors import CacheError
from kvdistill.teachers.logits import TeacherLogits
from kvdistill.teachers.record import TeacherKV

if TYPE_CHECKING:
    from kvdistill.config import DataConfig, LogitKDConfig, TeacherConfig


class CacheReader:
    """Read a cache directory: `.get(sample_id)` loads one sample's tensors lazily (one open handle per
    shard).

    A map-style dataset too: `len(reader)`, `reader[i]` is the i-th stored sample (order of `sample_ids`).

    Trust: the manifest is checked when the reader opens (`read_manifest`: structure, shard files inside the
    directory; `location_problems`: every sample on an existing slot), and each shard's size and sha256
    (streamed) the first time the reader opens it, once per shard per reader, unless the file's size, mtime
    or inode changes afterwards (checked by one stat per read): then it is opened and hashed again. Damaged
    values are refused with a CacheError, never returned.
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
        self._manifest_path = mpath
        self.manifest = read_manifest(mpath)
        bad = location_problems(self.manifest)
        if bad:
            raise CacheError(
                f"manifest {mpath} points samples at slots its shards do not hold: "
                + "; ".join(bad[:5])
                + (f"; ... and {len(bad) - 5} more" if len(bad) > 5 else ""),
                f"run `kvdistill cache verify {self.dir}` for the full list; restore the manifest from the "
                "extraction or re-extract the cache",
            )
        self.meta: dict[str, Any] = {k: self.manifest[k] for k in META_FIELDS}
        self.index: dict[str, tuple[int, int]] = {
            sid: (int(e["shard"]), int(e["index"])) for sid, e in self.manifest["samples"].items()
        }
        self.sample_ids: list[str] = list(self.index)
        self._handles: dict[int, Any] = {}
        self._names: dict[int, dict[int, list[str]]] = {}
        self._verified: set[int] = set()  # shards whose size and sha256 matched the manifest
        self._stamps: dict[int, tuple[int, int, int]] = {}  # shard -> (inode, size, mtime_ns) when it matched

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
        if shard in self._verified and self._changed(shard):
            # the file changed since it was hashed (size, mtime or inode): its mapped values are no longer the
            # checked ones; drop the handle and check the file again before any read
            self._handles.pop(shard, None)
            self._names.pop(shard, None)
            self._verified.discard(shard)
        if shard not in self._handles:
            entry = self.manifest["shards"][shard]
            path = shard_path(
                self.dir, entry["file"], f"manifest {self._manifest_path}: shards[{shard}].file"
            )
            try:
                handle = safe_open(str(path), framework="pt")
            except FileNotFoundError:
                raise CacheError(f"shard {path} is missing", "restore it, or re-extract the cache") from None
            except Exception as e:  # safetensors raises its own error types for damaged headers
                raise CacheError(
                    f"shard {path} cannot be read ({e})",
                    f"run `kvdistill cache verify {self.dir}` for the full list, then re-extract",
                ) from None
            if shard not in self._verified:
                self._verify(shard, path, entry)
            names: dict[int, list[str]] = {}
            for key in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                j, _, name = key.partition("/")
                if not j.isdigit() or not name:
                    raise CacheError(
                        f"shard {path} holds tensor {key!r}, not named '<index>/<name>' like a cache shard",
                        f"run `kvdistill cache verify {self.dir}`, then re-extract the cache",
                    )
                names.setdefault(int(j), []).append(name)
            self._handles[shard], self._names[shard] = handle, names
        return self._handles[shard]

    def _changed(self, shard: int) -> bool:
        """Whether shard `shard`'s file differs in size, mtime or inode from when it was checked."""
        path = self.dir / self.manifest["shards"][shard]["file"]
        try:
            st = path.stat()
        except OSError:
            return True
        return self._stamps.get(shard) != (st.st_ino, st.st_size, st.st_mtime_ns)

    def _verify(self, shard: int, path: Path, entry: dict[str, Any]) -> None:
        """Size, then the streamed sha256, of shard `shard` against its manifest entry; CacheError if either
        differs (the shard's values would be wrong)."""
        fix = (
            f"run `kvdistill cache verify {self.dir}` to list every damaged shard, then re-extract the cache "
            "(`kvdistill extract` into a new directory)"
        )
        try:
            st = path.stat()
            size = st.st_size
            digest = sha256_file(path) if size == entry["bytes"] else None
            after = path.stat()
            if (after.st_ino, after.st_size, after.st_mtime_ns) != (st.st_ino, st.st_size, st.st_mtime_ns):
                digest = "changed while it was hashed"
        except OSError as e:
            raise CacheError(f"shard {path} cannot be read ({type(e).__name__}: {e})", fix) from None
        if digest is None:
            raise CacheError(
                f"shard {entry['file']} of {self.dir} is {size} bytes, the manifest says {entry['bytes']} "
                f"({'truncated' if size < entry['bytes'] else 'grown'}): its stored K/V are damaged",
                fix,
            )
        if digest != entry["sha256"]:
            raise CacheError(
                f"shard {entry['file']} of {self.dir} fails its checksum (sha256 {digest[:12]}..., manifest "
                f"{entry['sha256'][:12]}...): its stored K/V are damaged and were not used",
                fix,
            )
        self._verified.add(shard)
        self._stamps[shard] = (st.st_ino, st.st_size, st.st_mtime_ns)

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
        """Messages for every meta field of `expected_meta` (teacher, tokenizer, compression, dataset) that
        differs."""
        return meta_mismatches(self.meta, expected_meta, reading=True)

    def require_compatible(self, expected_meta: dict[str, Any]) -> None:
        bad = self.check_compatible(expected_meta)
        if bad:
            raise CacheError(
                f"cache {self.dir} does not match this run: " + "; ".join(bad),
                "re-extract the cache for this teacher, tokenizer, compression and data "
                "(`kvdistill extract`), or point cache_dir at the matching cache",
            )

    def teacher_kv(
        self, sample_ids: list[str], device="cpu", dtype: torch.dtype | None = None, *, logits: bool = False
    ):
        """A right-padded `TeacherKV` batch. Kind full: keys (B, H, T, D) with shared spans (B, T, 2) and mask
        (B, T); otherwise keys (B, H, M, D), spans (B, H, M, 2), mask (B, H, M) per layer. logits: also the
        stored top-k log-probabilities as a `TeacherLogits` (B, T, k) (refused when the cache holds none)."""
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
            logits=self._logits(samples, tok_mask, tok_spans).map(lambda x: x.to(device)) if logits else None,
        )

    def _logits(
        self, samples: list[dict[str, torch.Tensor]], tok_mask: torch.Tensor, tok_spans: torch.Tensor
    ) -> TeacherLogits:
        """The stored top-k log-probabilities of `samples`, right-padded to the (B, T) token mask (spans (B,
        T, 2) beside): values (B, T, k)
        in their stored dtype, index (B, T, k) int64, shift (B, T, n) float32."""
        spec = self.meta["logits"]
        if spec is None:
            raise CacheError(
                f"cache {self.dir} holds no logits (K/V only)",
                "extract it with a logits section (`kvdistill extract ... --logits-top-k 64`)",
            )
        B, T = tok_mask.shape
        k, n = int(spec["top_k"]), len(spec["temperatures"])
        values = torch.zeros(B, T, k, dtype=getattr(torch, spec["dtype"]))
        index = torch.zeros(B, T, k, dtype=torch.long)
        shift = torch.zeros(B, T, n, dtype=torch.float32)
        for b, s in enumerate(samples):
            t = s["token_ids"].shape[0]
            if not {"logit_values", "logit_index", "logit_shift"} <= s.keys():
                raise CacheError(
                    f"a sample of cache {self.dir} lacks the logits its manifest promises",
                    f"run `kvdistill cache verify {self.dir}`, then re-extract the cache",
                )
            values[b, :t], index[b, :t], shift[b, :t] = (
                s["logit_values"],
                s["logit_index"].long(),
                s["logit_shift"],
            )
        temps = tuple(float(x) for x in spec["temperatures"])
        return TeacherLogits(values, index, shift, temps, tok_mask.clone(), tok_spans.clone())

    def close(self) -> None:
        self._handles.clear()
        self._names.clear()

    def __enter__(self) -> CacheReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_teacher_cache(
    teacher_cfg: TeacherConfig, data_cfg: DataConfig, logit_kd: LogitKDConfig | None = None
):
    """The `CacheReader` of a `source: cache` teacher, checked against the run: complete, and the same
    teacher, tokenizer, compression and dataset, and the logits the run reads (`teacher_cfg.logits` at the
    temperatures of `logit_kd`); a CacheError names each field that differs."""
    from kvdistill.cache.meta import expected_meta

    reader = CacheReader(teacher_cfg.cache_dir)
    name = teacher_cfg.name
    if not reader.complete:
        raise CacheError(
            f"teacher '{name}': cache {reader.dir} is incomplete (its extraction was interrupted, or its "
            "parts were merged before all finished)",
            "rerun the same `kvdistill extract` command (it resumes), then `kvdistill cache merge` for parts",
        )
    try:
        reader.require_compatible(expected_meta(teacher_cfg, data_cfg, logit_kd=logit_kd))
    except CacheError as err:
        raise CacheError(
            f"teacher '{name}': {err.problem}",
            f"re-extract it with `kvdistill extract CONFIG --teacher {name} --out NEW_DIR` for this run's "
            "teacher, compression and data, or point cache_dir at a cache that matches",
        ) from None
    return reader
