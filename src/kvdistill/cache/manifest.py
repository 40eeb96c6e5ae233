"""The manifest of a teacher-KV cache: what was stored, by which teacher, how, and where.

`manifest.json` (or `manifest.part-{i}.json` for one part of a sharded extraction), schema_version 2:

    {
      "schema_version": 2,
      "teacher": {"id": str, "revision": str | null, "geometry": KVGeometry.to_dict()},
      "tokenizer": sha256 hex (fingerprint_tokenizer),
      "compression": Compression.to_dict(),
      "dataset": sha256 hex (fingerprint_records),
      "span_unit": "utf8_bytes" (stored token spans are UTF-8 byte offsets into the text, align/bytes.py),
      "logits": null | {"top_k": int, "dtype": str, "index_dtype": "uint16" | "int32",
                        "temperatures": [float], "vocab_size": int} (each sample also holds the
                        teacher's top-k log-probabilities, kvdistill.teachers.logits; absent in caches
                        written before: null),
      "shards": [{"file": str, "sha256": str, "num_samples": int, "bytes": int}, ...],
      "samples": {sample_id: {"shard": int (position in "shards"), "index": int (position in the shard)}},
      "complete": bool (the writer was closed; false while extraction runs or after a kill),
      "part": str | null, "created": ISO-8601 UTC, "kvdistill_version": str
    }

Only complete shards are ever listed, and the file is replaced atomically, so a manifest is always
consistent with the shards on disk. The meta fields (teacher, tokenizer, compression, dataset, span_unit,
logits) decide whether a cache fits a run: `meta_mismatches` names every field that differs (a reader that
needs no logits takes a cache with them; one that needs them takes a cache whose temperatures include its
own).

Schema 1 caches stored character spans, which cannot tell apart the tokens a byte-level tokenizer splits one
character into; `read_manifest` refuses them with a message to re-extract.

`read_manifest` is the one gate every reader of a manifest goes through (CacheReader, verify, info, merge, the
writer's resume): it refuses a manifest of the wrong structure (`kvdistill.cache.schema`'s pydantic models,
every problem at once) and one whose shard files lead outside the cache directory (`shard_path`: `..`,
absolute paths, symlinks that resolve elsewhere), so nothing a manifest names is opened outside its own
directory. `location_problems` checks that the samples point at slots that exist (verify lists them, the
reader refuses).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from pathlib import Path, PurePath
from typing import Any

from kvdistill.cache.schema import MAX_LISTED, logits_problems, short, structure_problems
from kvdistill.errors import CacheError

SCHEMA_VERSION = 2  # 2: spans in UTF-8 bytes (schema 1 stored character spans)
SPAN_UNIT = "utf8_bytes"
META_FIELDS = ("teacher", "tokenizer", "compression", "dataset", "span_unit", "logits")
OPTIONAL_META = {"logits": None}  # meta fields newer than schema 2: absent means this value
MANIFEST = "manifest.json"
_RESTORE = (
    "the manifest was edited or damaged: restore it from the extraction's output, or re-extract the cache "
    "with `kvdistill extract`"
)


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
    logits: dict | None = None,
) -> dict[str, Any]:
    """The meta dict a `CacheWriter` takes and a `CacheReader` is checked against (spans in `SPAN_UNIT`);
    `logits`: `LogitSpec.to_dict()` when the samples hold top-k log-probabilities."""
    return {
        "teacher": {"id": teacher_id, "revision": revision, "geometry": dict(geometry)},
        "tokenizer": tokenizer_fp,
        "compression": dict(compression),
        "dataset": dataset_fp,
        "span_unit": SPAN_UNIT,
        "logits": None if logits is None else dict(logits),
    }


def check_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """Validate a meta dict (every problem at once) and return it JSON-normalised."""
    problems = []
    if not isinstance(meta, dict):
        raise CacheError(
            f"cache meta must be a dict, got {type(meta).__name__}", "build it with make_meta(...)"
        )
    if isinstance(meta, dict):
        meta = {**OPTIONAL_META, **meta}
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
    problems += logits_problems(meta.get("logits"), "meta.logits")
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


COMPRESSION_ADDED = {
    "span": "all",
    "scoring": "minmax",
    "window": 8,
}  # compression fields newer than schema 2


def meta_mismatches(stored: dict[str, Any], expected: dict[str, Any], *, reading: bool = False) -> list[str]:
    """One message per meta field of `expected` that differs from `stored` (teacher split into id / revision /
    geometry). Fields absent from `expected` are not checked. reading: `expected` is what a reader needs, so
    logits None takes any cache, needed temperatures may be a subset of the stored ones and a needed top_k at
    most the stored one (a writer resuming, or parts merged, must agree exactly)."""
    out = []
    for key in META_FIELDS:
        if key not in expected:
            continue
        want, have = _json_normal(expected[key]), _json_normal(stored.get(key, OPTIONAL_META.get(key)))
        if key == "logits" and reading:
            out += _logits_mismatch(have, want)
            continue
        if key == "compression" and isinstance(want, dict) and isinstance(have, dict):
            # fields added later (span, scoring, window) are absent from older caches: absent means the
            # default
            want, have = {**COMPRESSION_ADDED, **want}, {**COMPRESSION_ADDED, **have}
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
                            f"teacher.{sub} differs: cache has {short(have.get(sub))}, "
                            f"expected {short(want.get(sub))}"
                        )
        else:
            out.append(f"{key} differs: cache has {short(have)}, expected {short(want)}")
    return out


def _logits_mismatch(have: dict | None, want: dict | None) -> list[str]:
    """What a reader needing `want` (None: nothing) finds missing in a cache's logits entry `have`."""
    if want is None or have == want:
        return []
    if have is None:
        return [f"logits differs: the cache holds no logits, expected top-k log-probabilities {short(want)}"]
    same = {k: v for k, v in want.items() if k not in ("temperatures", "top_k")}
    wrong = sorted(k for k in same if have.get(k) != same[k])
    if not (isinstance(have.get("top_k"), int) and have["top_k"] >= want.get("top_k", 0)):
        wrong.append("top_k")  # a cache of k serves any k' <= k: its first k' entries are the top-k'
        wrong.sort()
    missing = sorted(set(want.get("temperatures", [])) - set(have.get("temperatures", [])))
    out = [
        f"logits.{k} differs: cache has {short(have.get(k))}, expected {'at least ' if k == 'top_k' else ''}"
        f"{short(want[k])}"
        for k in wrong
    ]
    if missing:
        out.append(
            "logits.temperatures: the cache's log-probabilities are normalised at "
            f"{have.get('temperatures')}, "
            f"not at {missing}"
        )
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
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CacheError(
            f"no manifest at {path}", "point at a directory written by `kvdistill extract`"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise CacheError(f"manifest {path} cannot be read ({type(e).__name__}: {e})", _RESTORE) from None
    try:
        data = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except (json.JSONDecodeError, RecursionError) as e:
        raise CacheError(f"manifest {path} is not valid JSON ({e})", "re-extract the cache") from None
    if not isinstance(data, dict):
        raise CacheError(f"manifest {path}: {structure_problems(data)[0]}", _RESTORE)
    version = data.get("schema_version")
    if version == 1:
        raise CacheError(
            f"manifest {path} is a schema_version 1 cache: its token spans are character offsets, and this "
            f"kvdistill aligns tokens on UTF-8 byte spans (schema_version {SCHEMA_VERSION}, span_unit "
            f"{SPAN_UNIT!r})",
            "re-extract the cache with this version of kvdistill (`kvdistill extract`); old spans cannot be "
            "converted without the texts and the tokenizer",
        )
    if version != SCHEMA_VERSION:
        raise CacheError(
            f"manifest {path} has schema_version {version!r}, this kvdistill reads {SCHEMA_VERSION}",
            "re-extract the cache with this version of kvdistill",
        )
    problems = structure_problems(data)
    if problems:
        raise CacheError(
            f"manifest {path} has the wrong structure ({len(problems)} problem(s)): " + "; ".join(problems),
            _RESTORE,
        )
    for key, default in OPTIONAL_META.items():
        data.setdefault(key, default)
    if data["span_unit"] != SPAN_UNIT:
        raise CacheError(
            f"manifest {path} stores spans in {data['span_unit']!r}, this kvdistill reads {SPAN_UNIT!r}",
            "re-extract the cache with this version of kvdistill",
        )
    outside = []
    for k, entry in enumerate(data["shards"]):
        try:
            shard_path(path.parent, entry["file"], f"shards[{k}].file")
        except CacheError as e:
            outside.append(e.problem)
    if outside:
        raise CacheError(
            f"manifest {path} names shard files not inside its cache directory: "
            + "; ".join(_capped(outside, "entries")),
            _RESTORE + "; a shard that is a symlink must point inside the cache directory",
        )
    return data


def _capped(problems: list[str], what: str) -> list[str]:
    if len(problems) <= MAX_LISTED:
        return problems
    return [*problems[:MAX_LISTED], f"... and {len(problems) - MAX_LISTED} more {what}"]


def location_problems(manifest: dict[str, Any]) -> list[str]:
    """Samples of a well-formed manifest that point at a shard or an index that does not exist, two ids on one
    slot, shard sample counts that differ from the ids mapped to them, a shard file listed twice."""
    shards = manifest["shards"]
    out: list[str] = []
    counts: dict[int, int] = {}
    slots: dict[tuple[int, int], str] = {}
    for sid, e in manifest["samples"].items():
        k, j = e["shard"], e["index"]
        if not 0 <= k < len(shards):
            out.append(f"sample {sid!r} points at shard {k!r}, the manifest lists {len(shards)} shards")
            continue
        if not 0 <= j < shards[k]["num_samples"]:
            out.append(
                f"sample {sid!r} points at index {j!r} of shard {shards[k]['file']}, "
                f"which holds {shards[k]['num_samples']} samples"
            )
            continue
        if (k, j) in slots:
            out.append(
                f"samples {slots[(k, j)]!r} and {sid!r} point at the same slot {j} of {shards[k]['file']}"
            )
        slots[(k, j)] = sid
        counts[k] = counts.get(k, 0) + 1
    for k, entry in enumerate(shards):
        if counts.get(k, 0) != entry["num_samples"]:
            out.append(
                f"shard {entry['file']} records {entry['num_samples']} samples, "
                f"the manifest maps {counts.get(k, 0)} ids to it"
            )
    files = [s["file"] for s in shards]
    if len(set(files)) != len(files):
        out.append("the manifest lists a shard file twice")
    return out


def shard_path(directory: str | os.PathLike, file: str, where: str) -> Path:
    """`directory / file` once it is certain to be inside `directory`: `file` is relative and, with `..` and
    every symlink resolved, lands strictly inside the resolved directory. Else a CacheError naming `where`
    (the manifest entry, e.g. "manifest DIR/manifest.json: shards[3].file"); nothing is opened."""
    directory = Path(directory)
    if PurePath(file).is_absolute():
        raise CacheError(
            f"{where} is the absolute path {file!r}: a cache lists its shards relative to its own directory "
            f"{directory}, and this one points elsewhere (nothing was opened)",
            _RESTORE,
        )
    try:
        root = directory.resolve()
        target = (root / file).resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise CacheError(f"{where} {file!r} cannot be resolved ({e})", _RESTORE) from None
    if target == root:
        raise CacheError(f"{where} {file!r} names the cache directory itself, not a shard file", _RESTORE)
    if root not in target.parents:
        lexical = Path(os.path.normpath(root / file))
        via = " through a symlink" if root in lexical.parents else ""
        raise CacheError(
            f"{where} {file!r} resolves{via} to {target}, outside the cache directory {root} "
            "(nothing was opened)",
            _RESTORE + "; a shard that is a symlink must point inside the cache directory",
        )
    return directory / file


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
