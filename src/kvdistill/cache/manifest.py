"""The manifest of a teacher-KV cache: what was stored, by which teacher, how, and where.

`manifest.json` (or `manifest.part-{i}.json` for one part of a sharded extraction), schema_version 2:

    {
      "schema_version": 2,
      "teacher": {"id": str, "revision": str | null, "geometry": KVGeometry.to_dict()},
      "tokenizer": sha256 hex (fingerprint_tokenizer),
      "compression": Compression.to_dict(),
      "dataset": sha256 hex (fingerprint_records),
      "span_unit": "utf8_bytes" (stored token spans are UTF-8 byte offsets into the text, align/bytes.py),
      "logits": null | {"top_k": int, "dtype": str, "index_dtype": "uint16" | "int32", "temperatures": [float],
                        "vocab_size": int} (each sample also holds the teacher's top-k log-probabilities,
                        kvdistill.teachers.logits; absent in caches written before: null),
      "shards": [{"file": str, "sha256": str, "num_samples": int, "bytes": int}, ...],
      "samples": {sample_id: {"shard": int (position in "shards"), "index": int (position in the shard)}},
      "complete": bool (the writer was closed; false while extraction runs or after a kill),
      "part": str | null, "created": ISO-8601 UTC, "kvdistill_version": str
    }

Only complete shards are ever listed, and the file is replaced atomically, so a manifest is always
consistent with the shards on disk. The meta fields (teacher, tokenizer, compression, dataset, span_unit, logits)
decide whether a cache fits a run: `meta_mismatches` names every field that differs (a reader that needs no logits
takes a cache with them; one that needs them takes a cache whose temperatures include its own).

Schema 1 caches stored character spans, which cannot tell apart the tokens a byte-level tokenizer splits one
character into; `read_manifest` refuses them with a message to re-extract.

`read_manifest` is the one gate every reader of a manifest goes through (CacheReader, verify, info, merge, the
writer's resume): it refuses a manifest of the wrong structure (`structure_problems`, every problem at once)
and one whose shard files lead outside the cache directory (`shard_path`: `..`, absolute paths, symlinks that
resolve elsewhere), so nothing a manifest names is opened outside its own directory. `location_problems`
checks that the samples point at slots that exist (verify lists them, the reader refuses).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
from pathlib import Path, PurePath
from typing import Any

from kvdistill.errors import CacheError
from kvdistill.paths import open_new

SCHEMA_VERSION = 2  # 2: spans in UTF-8 bytes (schema 1 stored character spans)
SPAN_UNIT = "utf8_bytes"
META_FIELDS = ("teacher", "tokenizer", "compression", "dataset", "span_unit", "logits")
OPTIONAL_META = {"logits": None}  # meta fields newer than schema 2: absent means this value
MANIFEST = "manifest.json"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_GEOMETRY_INTS = (
    "num_layers",
    "num_attention_heads",
    "num_kv_heads",
    "head_dim",
    "hidden_size",
    "vocab_size",
)
_MAX_LISTED = 8  # problems of one kind quoted before "... and N more"
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
    """The meta dict a `CacheWriter` takes and a `CacheReader` is checked against (spans in `SPAN_UNIT`); `logits`:
    `LogitSpec.to_dict()` when the samples hold top-k log-probabilities."""
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
    problems += _logits_problems(meta.get("logits"), "meta.logits")
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


COMPRESSION_ADDED = {"span": "all", "scoring": "minmax", "window": 8}  # compression fields newer than schema 2


def meta_mismatches(stored: dict[str, Any], expected: dict[str, Any], *, reading: bool = False) -> list[str]:
    """One message per meta field of `expected` that differs from `stored` (teacher split into id / revision /
    geometry). Fields absent from `expected` are not checked. reading: `expected` is what a reader needs, so logits
    None takes any cache, needed temperatures may be a subset of the stored ones and a needed top_k at most the
    stored one (a writer resuming, or parts merged, must agree exactly)."""
    out = []
    for key in META_FIELDS:
        if key not in expected:
            continue
        want, have = _json_normal(expected[key]), _json_normal(stored.get(key, OPTIONAL_META.get(key)))
        if key == "logits" and reading:
            out += _logits_mismatch(have, want)
            continue
        if key == "compression" and isinstance(want, dict) and isinstance(have, dict):
            # fields added later (span, scoring, window) are absent from older caches: absent means the default
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
                            f"teacher.{sub} differs: cache has {_short(have.get(sub))}, "
                            f"expected {_short(want.get(sub))}"
                        )
        else:
            out.append(f"{key} differs: cache has {_short(have)}, expected {_short(want)}")
    return out


def _logits_mismatch(have: dict | None, want: dict | None) -> list[str]:
    """What a reader needing `want` (None: nothing) finds missing in a cache's logits entry `have`."""
    if want is None or have == want:
        return []
    if have is None:
        return [f"logits differs: the cache holds no logits, expected top-k log-probabilities {_short(want)}"]
    same = {k: v for k, v in want.items() if k not in ("temperatures", "top_k")}
    wrong = sorted(k for k in same if have.get(k) != same[k])
    if not (isinstance(have.get("top_k"), int) and have["top_k"] >= want.get("top_k", 0)):
        wrong.append("top_k")  # a cache of k serves any k' <= k: its first k' entries are the top-k'
        wrong.sort()
    missing = sorted(set(want.get("temperatures", [])) - set(have.get("temperatures", [])))
    out = [f"logits.{k} differs: cache has {_short(have.get(k))}, expected {'at least ' if k == 'top_k' else ''}"
           f"{_short(want[k])}" for k in wrong]
    if missing:
        out.append(f"logits.temperatures: the cache's log-probabilities are normalised at {have.get('temperatures')}, "
                   f"not at {missing}")
    return out


def _logits_problems(logits: Any, where: str) -> list[str]:
    """The structure of a `logits` meta entry (None, or `LogitSpec.to_dict()`)."""
    if logits is None:
        return []
    if not isinstance(logits, dict):
        return [f"{where} is {_type(logits)}, expected an object or null"]
    out = []
    for key in ("top_k", "vocab_size"):
        if not _is_int(logits.get(key), 1):
            out.append(f"{where}.{key} is {_short(logits.get(key))}, expected a positive integer")
    if logits.get("dtype") not in ("float16", "bfloat16", "float32"):
        out.append(f"{where}.dtype is {_short(logits.get('dtype'))}, expected float16, bfloat16 or float32")
    if logits.get("index_dtype") not in ("uint16", "int32"):
        out.append(f"{where}.index_dtype is {_short(logits.get('index_dtype'))}, expected uint16 or int32")
    temps = logits.get("temperatures")
    if not (isinstance(temps, list) and temps and all(isinstance(t, int | float) and not isinstance(t, bool)
                                                      and t > 0 for t in temps)):
        out.append(f"{where}.temperatures is {_short(temps)}, expected a list of temperatures > 0")
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
            f"kvdistill aligns tokens on UTF-8 byte spans (schema_version {SCHEMA_VERSION}, span_unit {SPAN_UNIT!r})",
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


def _is_int(x: Any, minimum: int | None = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and (minimum is None or x >= minimum)


_JSON_TYPES = {
    bool: "a boolean",
    int: "a number",
    float: "a number",
    str: "a string",
    list: "an array",
    dict: "an object",
    type(None): "null",
}


def _type(x: Any) -> str:
    """`x` and its JSON type, for messages: `5 (a number)`."""
    if x is None:
        return "null"
    return f"{_short(x)} ({_JSON_TYPES.get(type(x), type(x).__name__)})"


def _capped(problems: list[str], what: str) -> list[str]:
    if len(problems) <= _MAX_LISTED:
        return problems
    return [*problems[:_MAX_LISTED], f"... and {len(problems) - _MAX_LISTED} more {what}"]


def structure_problems(data: Any) -> list[str]:
    """Every way `data` (a loaded manifest) departs from the schema in this module's docstring, each naming
    the key and the value (empty: well formed). Types only: whether samples point at existing slots is
    `location_problems`, whether shard files stay inside the cache is `shard_path`."""
    if not isinstance(data, dict):
        return [f"the manifest is {_type(data)}, expected an object"]
    out = []
    missing = [k for k in (*META_FIELDS, "shards", "samples") if k not in data and k not in OPTIONAL_META]
    if missing:
        out.append(f"missing key(s) {missing}")
    teacher = data.get("teacher")
    if "teacher" in data:
        if not isinstance(teacher, dict):
            out.append(f"teacher is {_type(teacher)}, expected an object")
        else:
            if not isinstance(teacher.get("id"), str):
                out.append(f"teacher.id is {_short(teacher.get('id'))}, expected a string")
            if teacher.get("revision") is not None and not isinstance(teacher["revision"], str):
                out.append(f"teacher.revision is {_short(teacher['revision'])}, expected a string or null")
            geometry = teacher.get("geometry")
            if geometry is not None and not isinstance(geometry, dict):
                out.append(f"teacher.geometry is {_type(geometry)}, expected an object or null")
            elif geometry:
                for key in _GEOMETRY_INTS:
                    if key in geometry and not _is_int(geometry[key]):
                        out.append(
                            f"teacher.geometry.{key} is {_short(geometry[key])}, expected an integer >= 0"
                        )
    for key in ("tokenizer", "dataset"):
        if key in data and not isinstance(data[key], str):
            out.append(f"{key} is {_short(data[key])}, expected a fingerprint string")
    comp = data.get("compression")
    if "compression" in data:
        if not isinstance(comp, dict):
            out.append(f"compression is {_type(comp)}, expected an object")
        else:
            for key in ("kind", "dtype"):
                if key in comp and not isinstance(comp[key], str):
                    out.append(f"compression.{key} is {_short(comp[key])}, expected a string")
            if comp.get("budget") is not None and not _is_int(comp["budget"], 1):
                out.append(
                    f"compression.budget is {_short(comp['budget'])}, expected a positive integer or null"
                )
            layers = comp.get("layers")
            if layers is not None and not (isinstance(layers, list) and all(_is_int(x) for x in layers)):
                out.append(
                    f"compression.layers is {_short(layers)}, expected a list of layer indices or null"
                )
    if "span_unit" in data and not isinstance(data["span_unit"], str):
        out.append(f"span_unit is {_short(data['span_unit'])}, expected {SPAN_UNIT!r}")
    out += _logits_problems(data.get("logits"), "logits")
    shards = data.get("shards")
    if "shards" in data:
        if not isinstance(shards, list):
            out.append(f"shards is {_type(shards)}, expected a list of shard entries")
        else:
            bad = []
            for k, entry in enumerate(shards):
                if not isinstance(entry, dict):
                    bad.append(f"shards[{k}] is {_type(entry)}, expected an object")
                    continue
                file = entry.get("file")
                if not isinstance(file, str) or not file or "\x00" in file:
                    bad.append(f"shards[{k}].file is {_short(file)}, expected a file name")
                sha = entry.get("sha256")
                if not isinstance(sha, str) or not _SHA256_RE.match(sha):
                    bad.append(f"shards[{k}].sha256 is {_short(sha)}, expected 64 lowercase hex digits")
                for key in ("num_samples", "bytes"):
                    if not _is_int(entry.get(key)):
                        bad.append(f"shards[{k}].{key} is {_short(entry.get(key))}, expected an integer >= 0")
            out += _capped(bad, "shard entry problems")
    samples = data.get("samples")
    if "samples" in data:
        if not isinstance(samples, dict):
            out.append(f"samples is {_type(samples)}, expected an object of sample ids")
        else:
            bad = []
            for sid, entry in samples.items():
                if not isinstance(entry, dict):
                    bad.append(f"samples[{sid!r}] is {_type(entry)}, expected an object")
                    continue
                for key in ("shard", "index"):
                    if not _is_int(entry.get(key), minimum=None):
                        bad.append(f"samples[{sid!r}].{key} is {_short(entry.get(key))}, expected an integer")
            out += _capped(bad, "sample entry problems")
    if "complete" in data and not isinstance(data["complete"], bool):
        out.append(f"complete is {_short(data['complete'])}, expected true or false")
    for key in ("part", "created", "kvdistill_version", "merged"):
        if data.get(key) is not None and not isinstance(data[key], str):
            out.append(f"{key} is {_short(data[key])}, expected a string")
    merged_from = data.get("merged_from")
    if merged_from is not None and not (
        isinstance(merged_from, list) and all(isinstance(p, str) for p in merged_from)
    ):
        out.append(f"merged_from is {_short(merged_from)}, expected a list of part names")
    return out


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


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON to a temp file, fsync, then os.replace: readers see the old or the new file, never half."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open_new(tmp) as f:  # never through a symlink planted at the temporary name
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
