"""A model config built from a base model's config (or a family's defaults) with overrides, through the
family's own config class, refused with the keys and a consistent choice when the shapes do not fit together.

`{base: smollm2-135m, num_hidden_layers: 2, hidden_size: 64}` starts from SmolLM2's config.json; the overrides
go through `LlamaConfig` (transformers' validation of the family) and these checks, done before any weight
exists:

- heads and widths: a head_dim the family derives (hidden_size / num_attention_heads) needs hidden_size to be
a
  multiple of num_attention_heads; num_key_value_heads divides num_attention_heads; a rotary head_dim is even;
- the model is built on the meta device (no weights), so the modules' own shape checks run before training;
- derived sizes follow hidden_size: when the overrides change hidden_size (or the head count) and leave out a
size
  the base derives from it, that size is re-derived in the base's own proportion instead of silently keeping
  the base's value: head_dim = hidden_size / num_attention_heads where the base's head_dim is hidden / heads
  (a family whose head_dim is independent, Gemma's 256, keeps it), and every `*intermediate_size` keeps the
  base's ratio to hidden_size (rounded to a multiple of 8). Each re-derived size is logged (warning) and
  returned as a note; a size the user sets is never changed.

Shared by students and from_config teachers (`kvdistill.student.build`, `kvdistill.config.load`).
"""

from __future__ import annotations

import logging
from typing import Any

from kvdistill.errors import KvdistillError

log = logging.getLogger(__name__)

INTERMEDIATE_KEYS = ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _or_list(items: list) -> str:
    items = [str(x) for x in items]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def _head_choices(hidden: int, heads: int) -> list[int]:
    """Head counts that divide `hidden`, with head_dim >= 8, the ones nearest `heads` first kept in order."""
    options = [d for d in _divisors(hidden) if hidden // d >= 8] or _divisors(hidden)
    near = sorted(options, key=lambda d: (abs(d - heads), d))[:6]
    return sorted(near)


def _family_class(family: str, key: str):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if family not in CONFIG_MAPPING:
        close = [k for k in CONFIG_MAPPING if k.startswith(str(family)[:3])][:8]
        raise KvdistillError(
            f"{key}.family '{family}' is not a transformers model_type",
            "use one such as llama, qwen2, gemma2, mistral"
            + (f" (close: {', '.join(close)})" if close else ""),
        )
    return CONFIG_MAPPING[family]


def _uses_rope(config) -> bool:
    return (
        getattr(config, "rope_parameters", None) is not None
        or getattr(config, "rope_theta", None) is not None
    )


def hf_config_from_spec(spec: dict[str, Any], *, key: str = "student.from_config", log_notes: bool = False):
    """(config, notes): the transformers config of a from_config spec ({base: ..., fields} or {family: ...,
    fields}), built through the family's config class, consistent, with `notes` naming every size re-derived
    from the overrides (logged as warnings with `log_notes`: where the model is built). Raises KvdistillError
    naming the keys and a consistent choice."""
    from kvdistill.models.load import load_config

    fields = dict(spec)
    base, family = fields.pop("base", None), fields.pop("family", None)
    if base is not None:
        start = load_config(base)
        cls, origin = type(start), f"the base {base}"
    else:
        cls = _family_class(family, key)
        start, origin = cls(), f"{family}'s defaults"
    unknown = [k for k in fields if not hasattr(start, k)]
    if unknown:
        raise KvdistillError(
            f"{key}: {unknown} are not fields of {cls.__name__}",
            "use fields of "
            f"{'the base model' + chr(39) + 's config.json (' + base + ')' if base else family}",
        )
    notes = _derive_sizes(start, fields, key, origin, from_base=base is not None)
    from huggingface_hub.errors import StrictDataclassError

    values = {**(start.to_dict() if base is not None else {}), **fields}
    values.pop("transformers_version", None)
    if "num_hidden_layers" in fields and "layer_types" not in fields and "layer_types" in values:
        values.pop("layer_types")  # the family derives one type per layer again from its own pattern
    try:
        config = cls.from_dict(values) if base is not None else cls(**fields)
        if hasattr(config, "validate"):
            config.validate()  # what save_pretrained runs: refused now, not at the first checkpoint
    except (ValueError, TypeError, StrictDataclassError) as err:
        detail = " ".join(str(err).split())
        raise KvdistillError(
            f"{key}: {cls.__name__} refuses these fields: {detail[:400]}",
            f"change the fields it names in {key} (the family's own config check)",
        ) from None
    _builds_on_meta(config, key)
    for note in notes if log_notes else []:
        log.warning("%s: %s", key, note)
    return config, notes


def _builds_on_meta(config, key: str) -> None:
    """Build the model on the meta device (no memory, no weights): the modules' own shape checks run now."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    from kvdistill.models.load import is_encoder_config

    model_cls = AutoModel if is_encoder_config(config) else AutoModelForCausalLM
    try:
        with torch.device("meta"):
            model_cls.from_config(config)
    except (ValueError, TypeError, RuntimeError, AssertionError) as err:
        detail = " ".join(str(err).split())
        raise KvdistillError(
            f"{key}: {type(config).__name__} does not build a model: {detail[:400]}",
            f"change the fields it names in {key}",
        ) from None


def _derive_sizes(start, fields: dict, key: str, origin: str, from_base: bool) -> list[str]:
    """Check heads against widths and fill in the sizes the base derives from hidden_size (see the module
    docstring), in `fields`; returns the notes."""
    aliases = getattr(start, "attribute_map", {}) or {}  # e.g. GPT-2: hidden_size -> n_embd

    def set_by_user(name):
        return name in fields or aliases.get(name, name) in fields

    def given(name):
        for spelled in (name, aliases.get(name, name)):
            if spelled in fields:
                return fields[spelled]
        return getattr(start, name, None)

    def where(name, paren: bool = False):
        if set_by_user(name):
            return ""
        return f" (from {origin})" if paren else f", from {origin}"

    hidden0, heads0 = getattr(start, "hidden_size", None), getattr(start, "num_attention_heads", None)
    hidden, heads = given("hidden_size"), given("num_attention_heads")
    if not all(isinstance(x, int) and x > 0 for x in (hidden0, heads0, hidden, heads)):
        return []  # a family without these fields: its own config class checks it
    notes = []
    kv = given("num_key_value_heads")
    head_dim0 = getattr(start, "head_dim", None)
    head_dim_derived = not set_by_user("head_dim") and (head_dim0 is None or head_dim0 * heads0 == hidden0)
    if head_dim_derived and hidden % heads:
        choices = _head_choices(hidden, heads)
        fix = (
            f"set num_attention_heads to {_or_list(choices)} (head_dim "
            f"{_or_list([hidden // c for c in choices])})"
        )
        if isinstance(kv, int) and not set_by_user("num_key_value_heads") and any(c % kv for c in choices):
            pick = max(choices, key=lambda c: (c <= heads, c))
            fix += (
                f" and num_key_value_heads dividing it ({kv}, from {origin}, does not divide "
                f"{_or_list([c for c in choices if c % kv])}), e.g. num_attention_heads: {pick}, "
                f"num_key_value_heads: {max(d for d in _divisors(pick) if d <= kv)}"
            )
        raise KvdistillError(
            f"{key}: hidden_size {hidden}{where('hidden_size')} with {heads} heads (num_attention_heads"
            f"{where('num_attention_heads')}): hidden_size is not a multiple of num_attention_heads",
            fix + "; or set hidden_size to a multiple of the head count",
        )
    # a family's own class derives head_dim from the fields it is given; a base's config.json spells it out
    if head_dim_derived and from_base and head_dim0 is not None and hidden // heads != head_dim0:
        fields["head_dim"] = hidden // heads
        notes.append(
            f"head_dim {head_dim0} -> {hidden // heads} (hidden_size {hidden} / num_attention_heads "
            f"{heads}, as {origin} derives it; set head_dim to choose another)"
        )
    kv = given("num_key_value_heads")
    if isinstance(kv, int) and kv > 0 and heads % kv:
        raise KvdistillError(
            f"{key}: num_key_value_heads {kv}{where('num_key_value_heads', True)} does not divide "
            f"num_attention_heads {heads}{where('num_attention_heads', True)} (each KV head serves a whole "
            "group of query heads)",
            f"set num_key_value_heads to {_or_list(_divisors(heads))}",
        )
    head_dim = given("head_dim")
    if isinstance(head_dim, int) and head_dim % 2 and _uses_rope(start):
        raise KvdistillError(
            f"{key}: head_dim {head_dim}{where('head_dim', True)} is odd, but rotary embeddings turn "
            "pairs of dimensions",
            f"set head_dim to an even number, e.g. {head_dim + 1}",
        )
    if hidden != hidden0:
        for name in INTERMEDIATE_KEYS:
            size0 = getattr(start, name, None)
            if set_by_user(name) or not isinstance(size0, int) or size0 <= 0:
                continue
            size = max(8, round(size0 * hidden / hidden0 / 8) * 8)
            fields[name] = size
            notes.append(
                f"{name} {size0} -> {size} (the {size0 / hidden0:.3g} x hidden_size of {origin}, "
                f"hidden_size {hidden0} -> {hidden}; set {name} to choose another)"
            )
    return notes
