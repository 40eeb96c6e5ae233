"""The manifest of a teacher-KV cache: what was stored, by which teacher, how, and where.

`manifest.json` (or `manifest.part-{i}.json` for one part of a sharded extraction), schema_version 2:

    {
      "schema_version": 2,
      "teacher": {"id": str, "revision": str | null, "geometry": KVGeometry.to_dict()},
      "tokenizer": sha256 hex (fingerprint_tokenizer),
      "compression": Compression.to_dict(),
      "dataset": sha256 hex (fingerprint_records),
      "span_unit": "utf8_bytes" (stored token spans are UTF-8 byte offsets into the text, align/bytes.py),
      "shards": [{"file": str, "sha256": str, "num_samples": int, "bytes": int}, ...],
      "samples": {sample_id: {"shard": int (position in "shards"), "index": int (position in the shard)}},
      "complete": bool (the writer was closed; false while extraction runs or after a kill),
      "part": str | null, "created": ISO-8601 UTC, "kvdistill_version": str
    }

Only complete shards are ever listed, and the file is replaced atomically, so a manifest is always
consistent with the shards on disk. The meta fields (teacher, tokenizer, compression, dataset, span_unit)
decide whether a cache fits a run: `meta_mismatches` names every field that differs.

Schema 1 caches stored character spans, which cannot tell apart the tokens a byte-level tokenizer splits one
character into; `read_manifest` refuses them with a message to re-extract.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from kvdistill.errors import CacheError

SCHEMA_VERSION = 2  # 2: spans in UTF-8 bytes (schema 1 stored character spans)
SPAN_UNIT = "utf8_bytes"
META_FIELDS = ("teacher", "tokenizer", "compression", "dataset", "span_unit")
MANIFEST = "manifest.json"


def part_manifest_name(part: str | None) -> str:
    return MANIFEST if part is None else f"manifest.part-{part}.json"


def shard_file_name(part: str | None, k: int) -> str:
    return f"shard-{k:05d}.safetensors" if part is None else f"part-{part}-shard-{k:05d}.safetensors"


def _json_normal(x: Any) -> Any:
    """What x looks like after a JSON round trip (tuples -> lists, int keys -> str), for comparisons."""
    return json.loads(json.dumps(x, sort_keys=True))


def make_meta(
    teacher_id: str,
    geometry: dict,
    tokenizer_fp: str,
    compression: dict,
    dataset_fp: str,
    revision: str | None = None,
) -> dict[str, Any]:
    """The meta dict a `CacheWriter` takes and a `CacheReader` is checked against (spans in `SPAN_UNIT`)."""
    return {
        "teacher": {"id": teacher_id, "revision": revision, "geometry": dict(geometry)},
        "tokenizer": tokenizer_fp,
        "compression": dict(compression),
        "dataset": dataset_fp,
        "span_unit": SPAN_UNIT,
    }


def check_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """Validate a meta dict (every problem at once) and return it JSON-normalised."""
    problems = []
    if not isinstance(meta, dict):
        raise CacheError(
            f"cache meta must be a dict, got {type(meta).__name__}", "build it with make_meta(...)"
        )
    for key in META_FIELDS:
        if key not in meta:
            problems.append(f"missing meta field '{key}'")
    teacher = meta.get("teacher")
    if "teacher" in meta and (not isinstance(teacher, dict) or not isinstance(teacher.get("id"), str)):
        problems.append(f"meta.teacher must be a dict with a string 'id', got {teacher!r}")
    for key in ("tokenizer", "dataset"):
        if key in meta and not isinstance(meta[key], str):
            problems.append(f"meta.{key} must be a fingerprint string, got {meta[key]!r}")
    if "compression" in meta and not isinstance(meta["compression"], dict):
        problems.append(
            f"meta.compression must be a dict (Compression.to_dict()), got {meta['compression']!r}"
        )
    if "span_unit" in meta and meta["span_unit"] != SPAN_UNIT:
        problems.append(f"meta.span_unit is {meta['span_unit']!r}, this kvdistill stores {SPAN_UNIT!r} spans")
    unknown = sorted(set(meta) - set(META_FIELDS)) if isinstance(meta, dict) else []
    if unknown:
        problems.append(f"unknown meta field(s) {unknown}")
    if problems:
        raise CacheError(
            "invalid cache meta: " + "; ".join(problems),
            "build it with kvdistill.cache.make_meta(teacher_id, geometry, tokenizer_fp, "
            "compression, dataset_fp), which also sets span_unit",
        )
    out = {k: _json_normal(meta[k]) for k in META_FIELDS}
    out["teacher"].setdefault("revision", None)
    out["teacher"].setdefault("geometry", None)
    return out


def _short(x: Any, n: int = 80) -> str:
    s = json.dumps(x, sort_keys=True) if not isinstance(x, str) else repr(x)
    return s if len(s) <= n else s[: n - 3] + "..."


def meta_mismatches(stored: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """One message per meta field of `expected` that differs from `stored` (teacher split into id / revision /
    geometry). Fields absent from `expected` are not checked."""
    out = []
    for key in META_FIELDS:
        if key not in expected:
            continue
        want, have = _json_normal(expected[key]), _json_normal(stored.get(key))
        if want == have:
            continue
        if key == "teacher" and isinstance(want, dict) and isinstance(have, dict):
            for sub in ("id", "revision", "geometry"):
                if sub in want and want.get(sub) != have.get(sub):
                    if sub == "geometry" and isinstance(want[sub], dict) and isinstance(have.get(sub), dict):
                        diff = sorted(
                            k for k in set(want[sub]) | set(have[sub]) if want[sub].get(k) != have[sub].get(k)
                        )
                        out.append(f"teacher.geometry differs in {diff}")
                    else:
                        out.append(
                            f"teacher.{sub} differs: cache has {_short(have.get(sub))}, "
                            f"expected {_short(want.get(sub))}"
                        )
        else:
            out.append(f"{key} differs: cache has {_short(have)}, expected {_short(want)}")
    return out


def new_manifest(meta: dict[str, Any], part: str | None) -> dict[str, Any]:
    from kvdistill import __version__

    return {
        "schema_version": SCHEMA_VERSION,
        **check_meta(meta),
        "shards": [],
        "samples": {},
        "complete": False,
        "part": part,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "kvdistill_version": __version__,
    }


def _reject_duplicate_keys(pairs):
    seen = {}
    for k, v in pairs:
        if k in seen:
            raise CacheError(
                f"manifest lists key {k!r} twice",
                "the manifest was edited or merged badly; re-extract or rerun merge_parts",
            )
        seen[k] = v
    return seen


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Load and check a manifest file; CacheError says what is wrong with it."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise CacheError(
            f"no manifest at {path}", "point at a directory written by `kvdistill extract`"
        ) from None
    try:
        data = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except json.JSONDecodeError as e:
        raise CacheError(f"manifest {path} is not valid JSON ({e})", "re-extract the cache") from None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version == 1:
        raise CacheError(
            f"manifest {path} is a schema_version 1 cache: its token spans are character offsets, and this "
            f"kvdistill aligns tokens on UTF-8 byte spans (schema_version {SCHEMA_VERSION}, span_unit {SPAN_UNIT!r})",
            "re-extract the cache with this version of kvdistill (`kvdistill extract`); old spans cannot be "
            "converted without the texts and the tokenizer",
        )
    if version != SCHEMA_VERSION:
        raise CacheError(
            f"manifest {path} has schema_version {version!r}, this kvdistill reads {SCHEMA_VERSION}",
            "re-extract the cache with this version of kvdistill",
        )
    missing = [k for k in (*META_FIELDS, "shards", "samples") if k not in data]
    if missing:
        raise CacheError(f"manifest {path} lacks {missing}", "re-extract the cache")
    if data["span_unit"] != SPAN_UNIT:
        raise CacheError(
            f"manifest {path} stores spans in {data['span_unit']!r}, this kvdistill reads {SPAN_UNIT!r}",
            "re-extract the cache with this version of kvdistill",
        )
    return data


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON to a temp file, fsync, then os.replace: readers see the old or the new file, never half."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: str | os.PathLike) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _backend_definition(backend) -> str:
    """`backend.to_str()` without the padding and truncation state, which every padded or truncated call of
    the tokenizer rewrites (so using a tokenizer would otherwise change its fingerprint)."""
    padding, truncation = getattr(backend, "padding", None), getattr(backend, "truncation", None)
    if padding is None and truncation is None:
        return backend.to_str()
    backend.no_padding()
    backend.no_truncation()
    try:
        return backend.to_str()
    finally:
        if padding is not None:
            backend.enable_padding(**padding)
        if truncation is not None:
            backend.enable_truncation(**truncation)


def fingerprint_tokenizer(tokenizer) -> str:
    """sha256 of the tokenizer's full definition: `backend_tokenizer.to_str()` for fast tokenizers (vocab,
    merges, normalizer, pre-tokenizer, special tokens; not the padding / truncation state of its last call),
    else its sorted vocab plus special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        payload = _backend_definition(backend)
    else:
        vocab = tokenizer.get_vocab()
        specials = getattr(tokenizer, "all_special_tokens", [])
        payload = json.dumps({"vocab": sorted(vocab.items()), "special": list(specials)}, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def fingerprint_records(records: list[dict]) -> str:
    """sha256 over the records' ids and texts, in order (other fields do not change the stored K/V)."""
    h = hashlib.sha256()
    for r in records:
        for part in (str(r["id"]), r["text"]):
            b = part.encode("utf-8")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
    return h.hexdigest()
