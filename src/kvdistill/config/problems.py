"""Pydantic validation errors as problems a person can act on, one line each, naming the key (and the flag
that sets it, where a command line does) and the value that is wrong; a typo of a key gets the nearest valid
one. The run config (`kvdistill.config.load`), experiment specs (`kvdistill.experiments.spec`) and the extract
command's flags (`kvdistill.cache.cli`) all report through `validation_problems`.
"""

from __future__ import annotations

import difflib
import typing
from collections.abc import Callable

from pydantic import BaseModel, ValidationError

__all__ = ["format_loc", "section_for", "validation_problems"]


def format_loc(loc: tuple) -> str:
    """('teachers', 0, 'weight') -> 'teachers[0].weight'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def untagged(root: type[BaseModel], loc: tuple) -> tuple[tuple, type[BaseModel] | None]:
    """`loc` without the tag pydantic puts after a tagged union field of `root` (losses.latent.cot_ce ->
    losses.cot_ce), and the member class the tag chose (None where there is no tag)."""
    field = root.model_fields.get(loc[0]) if loc and isinstance(loc[0], str) else None
    if field is not None and len(loc) > 1:
        for member in typing.get_args(field.annotation):
            if isinstance(member, type) and issubclass(member, BaseModel) and loc[1] in _tags(member):
                return (loc[0], *loc[2:]), member
    return loc, None


def _tags(cls: type[BaseModel]) -> set:
    """The values of `cls`'s one-value Literal fields (a tagged union's discriminator)."""
    return {
        typing.get_args(f.annotation)[0]
        for f in cls.model_fields.values()
        if typing.get_origin(f.annotation) is typing.Literal and len(typing.get_args(f.annotation)) == 1
    }


def section_for(
    root: type[BaseModel], loc: tuple, member: type[BaseModel] | None = None
) -> type[BaseModel] | None:
    """The pydantic model class under `root` that holds the field at `loc` (list indices and mapping keys
    skipped), None where `loc` leaves the models; `member`: the class a tag chose for the first field
    (`untagged`)."""
    cls: type[BaseModel] = root
    keyed = False  # the previous field is a mapping: this part is one of its keys
    for n, part in enumerate(loc[:-1]):
        if n == 0 and member is not None:
            cls = member
            continue
        if isinstance(part, int) or keyed:
            keyed = False
            continue
        field = cls.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        nested = None
        for candidate in (*getattr(ann, "__args__", ()), ann):
            inner = getattr(candidate, "__args__", None)
            for c in (*(inner or ()), candidate):
                if isinstance(c, type) and issubclass(c, BaseModel):
                    nested = c
                    keyed = typing.get_origin(candidate) is dict
        if nested is None:
            return None
        cls = nested
    return cls


def validation_problems(
    err: ValidationError,
    root: type[BaseModel],
    *,
    prefix: str = "",
    flags: dict[str, str] | None = None,
    name: str = "config",
    unknown: Callable[[str, str], str | None] | None = None,
) -> list[str]:
    """One problem per error of `err` (raised validating `root`): an unknown key with the nearest valid one
    and the valid keys there, a missing one, a check's own message, or the key, the value given and what is
    wrong. `prefix`: the dotted key `root` sits under (a section of a bigger whole); `flags`: key -> the
    command-line flag that sets it, named beside the key; `name`: what the whole is called where the error is
    on it; `unknown(tag, key)`: the caller's own problem for an unknown key of a tagged union's member (e.g. a
    term of another objective), None to report it as unknown. A tagged union's tag is left out of the keys
    shown."""
    out = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        tag = loc[1] if len(loc) > 1 else None
        loc, member = untagged(root, loc)
        key = ".".join(x for x in (prefix, format_loc(loc)) if x)
        flag = (flags or {}).get(key)
        shown = f"{key} ({flag})" if flag else key
        own = (
            unknown(tag, str(loc[-1]))
            if (unknown and member is not None and len(loc) == 2 and e["type"] == "extra_forbidden")
            else None
        )
        if own is not None:
            out.append(own)
        elif e["type"] == "union_tag_invalid":
            ctx = e.get("ctx", {})
            out.append(
                f"{key}.{str(ctx.get('discriminator', '')).strip(chr(39))} {ctx.get('tag')!r} is not one of "
                f"{ctx.get('expected_tags')}: use one of them"
            )
        elif e["type"] == "extra_forbidden":
            section = section_for(root, loc, member)
            valid = list(section.model_fields) if section else []
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            near = ".".join(x for x in (prefix, format_loc(loc[:-1] + (close[0],))) if x) if close else ""
            hint = f"; did you mean '{near}'?" if close else ""
            out.append(f"unknown key '{shown}'{hint} (valid here: {', '.join(valid)})")
        elif e["type"] == "missing":
            out.append(f"'{shown}' is required")
        elif e["type"] == "value_error":
            msg = e["msg"].removeprefix("Value error, ")
            out.append(f"{shown}: {msg}" if key else msg)
        else:
            given = e.get("input")
            out.append(
                f"'{shown or name}' = {repr(given) if not isinstance(given, dict) else 'a mapping'}: "
                f"{e['msg']}"
            )
    return out
