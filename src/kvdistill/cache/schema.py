"""The structure of a cache manifest (`kvdistill.cache.manifest`, schema_version 2) as pydantic models, and
`structure_problems`: every way a loaded manifest departs from it, each naming the key and the value.

Types only: whether samples point at existing slots is `manifest.location_problems`, whether shard files stay
inside the cache is `manifest.shard_path`. Strict types (a number is not a string, `true` is not an integer);
unknown keys are kept (a newer writer may add some). Each field says what it expects in words (`_Expect`),
which is what a problem quotes: `shards[0].sha256 is null, expected 64 lowercase hex digits`.
"""

from __future__ import annotations

import json
import types
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = ["LogitsEntry", "Manifest", "logits_problems", "short", "structure_problems"]

MAX_LISTED = 8  # problems of one kind quoted before "... and N more"


class _Expect:
    """What a field expects, in words (pydantic metadata read by `_walk`)."""

    def __init__(self, words: str):
        self.words = words


def _e(tp, words: str, **constraints):
    return Annotated[tp, Field(**constraints), _Expect(words)]


_Count = _e(int, "an integer >= 0", ge=0)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class Geometry(_Strict):
    num_layers: _Count = 0
    num_attention_heads: _Count = 0
    num_kv_heads: _Count = 0
    head_dim: _Count = 0
    hidden_size: _Count = 0
    vocab_size: _Count = 0


class Teacher(_Strict):
    id: _e(str, "a string")
    revision: _e(str | None, "a string or null") = None
    geometry: _e(Geometry | None, "an object or null") = None


class Compression(_Strict):
    kind: _e(str, "a string") = "full"
    dtype: _e(str, "a string") = "bfloat16"
    budget: _e(int | None, "a positive integer or null", ge=1) = None
    layers: _e(list[Annotated[int, Field(ge=0)]] | None, "a list of layer indices or null") = None


class LogitsEntry(_Strict):
    """`kvdistill.teachers.logits.LogitSpec.to_dict()`."""

    top_k: _e(int, "a positive integer", ge=1)
    vocab_size: _e(int, "a positive integer", ge=1)
    dtype: _e(Literal["float16", "bfloat16", "float32"], "float16, bfloat16 or float32")
    index_dtype: _e(Literal["uint16", "int32"], "uint16 or int32")
    temperatures: _e(list[Annotated[float, Field(gt=0)]], "a list of temperatures > 0", min_length=1)


class Shard(_Strict):
    file: _e(str, "a file name", min_length=1, pattern=r"^[^\x00]+$")
    sha256: _e(str, "64 lowercase hex digits", pattern=r"^[0-9a-f]{64}$")
    num_samples: _Count
    bytes: _Count


class Slot(_Strict):
    shard: _e(int, "an integer")
    index: _e(int, "an integer")


class Manifest(_Strict):
    """A manifest as `manifest.read_manifest` accepts it (the schema in that module's docstring)."""

    teacher: _e(Teacher, "an object")
    tokenizer: _e(str, "a fingerprint string")
    compression: _e(Compression, "an object")
    dataset: _e(str, "a fingerprint string")
    span_unit: _e(str, "'utf8_bytes'")
    logits: _e(LogitsEntry | None, "an object or null") = None
    shards: _e(list[_e(Shard, "an object")], "a list of shard entries")
    samples: _e(dict[str, _e(Slot, "an object")], "an object of sample ids")
    complete: _e(bool, "true or false") = False
    part: _e(str | None, "a string") = None
    created: _e(str | None, "a string") = None
    kvdistill_version: _e(str | None, "a string") = None
    merged: _e(str | None, "a string") = None
    merged_from: _e(list[str] | None, "a list of part names") = None


_JSON_TYPES = {
    bool: "a boolean",
    int: "a number",
    float: "a number",
    str: "a string",
    list: "an array",
    dict: "an object",
}


def short(x: Any, n: int = 80) -> str:
    """`x` as JSON (a string as its repr), cut to `n` characters."""
    s = json.dumps(x, sort_keys=True) if not isinstance(x, str) else repr(x)
    return s if len(s) <= n else s[: n - 3] + "..."


def _typed(x: Any) -> str:
    """`x` and its JSON type, for messages: `5 (a number)`."""
    return "null" if x is None else f"{short(x)} ({_JSON_TYPES.get(type(x), type(x).__name__)})"


def _parts(tp) -> tuple[Any, str | None]:
    """(the type without Optional and Annotated, its `_Expect` words or None)."""
    words = None
    while True:
        if typing.get_origin(tp) is Annotated:
            words = next((m.words for m in tp.__metadata__ if isinstance(m, _Expect)), words)
            tp = tp.__origin__
        elif isinstance(tp, types.UnionType) and type(None) in tp.__args__:
            (tp,) = [a for a in tp.__args__ if a is not type(None)]
        else:
            return tp, words


def _walk(model: type[BaseModel], loc: tuple, data: Any) -> tuple[str, Any, str, bool]:
    """(the key path as written in a problem, the value there, what it expects, whether that is a container)
    for an error at `loc` of `model`; a list of scalars (layers, temperatures) is reported as a whole."""
    path, node, tp, words = "", data, model, None
    for step in loc:
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(step) if isinstance(step, str) else None
            if field is None:
                break
            tp, words = _parts(field.rebuild_annotation())
            path += f".{step}" if path else step
        elif typing.get_origin(tp) in (list, dict):
            inner, inner_words = _parts(typing.get_args(tp)[-1])
            if not (isinstance(inner, type) and issubclass(inner, BaseModel)):
                break  # a list of scalars: the list is the value reported
            tp, words = inner, inner_words
            path += f"[{step!r}]" if isinstance(step, str) else f"[{step}]"
        else:
            break
        node = (
            node.get(step)
            if isinstance(node, dict)
            else (
                node[step] if isinstance(node, list) and isinstance(step, int) and step < len(node) else None
            )
        )
    container = (isinstance(tp, type) and issubclass(tp, BaseModel)) or typing.get_origin(tp) in (list, dict)
    return path, node, words or "another value", container


def _problems(
    model: type[BaseModel], data: Any, capped: tuple[str, ...] = (), *, list_missing: bool = True
) -> list[str]:
    """The problems of `data` against `model`: a missing top-level key listed together ("missing key(s)"), or
    with `list_missing` False reported as null like any other value; those under the keys in `capped` (entries
    of a list or mapping) quoted up to `MAX_LISTED` each."""
    try:
        model.model_validate(data)
        return []
    except ValidationError as err:
        errors = err.errors()
    missing, seen, out, grouped = [], set(), [], {k: [] for k in capped}
    for e in errors:
        if e["type"] == "missing" and len(e["loc"]) == 1 and list_missing:
            missing.append(e["loc"][0])
            continue
        path, value, words, container = _walk(model, e["loc"], data)
        if path in seen:
            continue  # one problem per key
        seen.add(path)
        problem = f"{path} is {_typed(value) if container else short(value)}, expected {words}"
        group = e["loc"][0] if len(e["loc"]) > 1 else None
        grouped.get(group, out).append(problem)
    if missing:
        out.insert(0, f"missing key(s) {missing}")
    for key, problems in grouped.items():
        out += (
            problems
            if len(problems) <= MAX_LISTED
            else [
                *problems[:MAX_LISTED],
                f"... and {len(problems) - MAX_LISTED} more {key[:-1]} entry problems",
            ]
        )
    return out


def structure_problems(data: Any) -> list[str]:
    """Every way `data` (a loaded manifest) departs from `Manifest`, each naming the key and the value (empty:
    well formed); the problems of shard and sample entries are quoted up to `MAX_LISTED` each."""
    if not isinstance(data, dict):
        return [f"the manifest is {_typed(data)}, expected an object"]
    return _problems(Manifest, data, capped=("shards", "samples"))


def logits_problems(logits: Any, where: str) -> list[str]:
    """The structure of a `logits` meta entry (None, or `LogitSpec.to_dict()`), its keys under `where`."""
    if logits is None:
        return []
    if not isinstance(logits, dict):
        return [f"{where} is {_typed(logits)}, expected an object or null"]
    return [f"{where}.{p}" for p in _problems(LogitsEntry, logits, list_missing=False)]
