"""A config as commented YAML, generated from the schema (`kvdistill config show`): every field with its
value, its choices and the docstring the schema gives it, so the printed defaults cannot drift from the code.

The output parses back to the same config (`load_config`): fields whose being set means something
(`Section.presence_fields`) are printed commented out where they were not set.
"""

from __future__ import annotations

import json
import textwrap
import typing
from typing import Any

from pydantic import BaseModel

from kvdistill.config.schema import RunConfig

WIDTH = 100  # comment lines are wrapped to this width
EXAMPLE = {"student": {"model": "smollm2-135m"}, "teachers": [{"model": "gemma3-270m"}]}
"""What `default_config` fills in where the schema has no default: a student (required) and one teacher."""


def default_config() -> RunConfig:
    """Every default of the schema, with the smallest student and teacher of the offline zoo filled in."""
    return RunConfig.model_validate(EXAMPLE)


def commented_yaml(config: RunConfig, header: str = "") -> str:
    """`config` as YAML with a comment per field (its docstring and choices); see the module docstring."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()] if header else []
    _section(config, 0, lines)
    return "\n".join(lines) + "\n"


def _section(section: BaseModel, indent: int, lines: list[str], *, first_prefix: str | None = None) -> None:
    pad = " " * indent
    for n, (name, field) in enumerate(type(section).model_fields.items()):
        value = getattr(section, name)
        key_pad = first_prefix if (first_prefix is not None and n == 0) else pad
        comment = _comment(field, value)
        unset = name in type(section).presence_fields and name not in section.model_fields_set
        if unset:
            text, value_text = f"{key_pad}# {name}: ", f"{_scalar(value)}   (set it only to choose this mode)"
        elif isinstance(value, BaseModel) or (
            isinstance(value, list) and value and all(isinstance(v, BaseModel) for v in value)
        ):
            text, value_text = f"{key_pad}{name}:", ""
        else:
            text, value_text = f"{key_pad}{name}: ", _scalar(value)
        line = text + value_text
        if len(comment) == 1 and len(line) + 4 + len(comment[0]) <= WIDTH:
            lines.append(f"{line}  # {comment[0]}")
        else:
            lines += [f"{pad}# {c}".rstrip() for c in comment]
            lines.append(line.rstrip())
        if unset:
            continue
        if isinstance(value, BaseModel):
            _section(value, indent + 2, lines)
        elif isinstance(value, list) and value and all(isinstance(v, BaseModel) for v in value):
            for item in value:
                _section(item, indent + 4, lines, first_prefix=" " * (indent + 2) + "- ")


def _comment(field, value) -> list[str]:
    """The field's docstring and its choices (or, for an optional section left out, its defaults), wrapped."""
    parts = [" ".join(field.description.split())] if field.description else []
    choices = _choices(field.annotation)
    if choices:
        parts.append("(one of: " + " | ".join(map(str, choices)) + ")")
    elif isinstance(value, BaseModel) and type(value).__doc__ and not field.description:
        parts.append(" ".join(type(value).__doc__.split("\n\n")[0].split()))
    elif value is None and (section := _section_class(field.annotation)) is not None:
        try:
            parts.append(f"a section, e.g. {_scalar(section())}")
        except ValueError:  # a section without defaults for every field
            parts.append(f"a section: {{{', '.join(section.model_fields)}}}")
    text = " ".join(parts)
    return textwrap.wrap(text, WIDTH - 2) if text else []


def _section_class(annotation) -> type[BaseModel] | None:
    """The config section class inside an Optional annotation, else None."""
    for arg in (annotation, *typing.get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _choices(annotation) -> list | None:
    """The values of a Literal annotation (also inside Optional / list), else None."""
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    for arg in typing.get_args(annotation):
        found = _choices(arg)
        if found:
            return found
    return None


def _scalar(value: Any) -> str:
    """A value as YAML flow text: JSON (a subset of YAML), with floats that YAML 1.1 readers read as
    floats."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, float):
        return _float(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {_scalar(v)}" for k, v in value.items()) + "}"
    return json.dumps(value, ensure_ascii=False)


def _float(value: float) -> str:
    text = repr(value)
    if "e" in text and "." not in text.split("e")[0]:  # PyYAML reads 1e-06 as a string, 1.0e-06 as a float
        mantissa, exponent = text.split("e")
        text = f"{mantissa}.0e{exponent}"
    return text
