"""Calling a transformers forward across versions: which keywords it takes (`position_ids`, its cache as
`cache` or `past_key_values`), the cache it returned and the keys and values each layer of that cache holds,
and activation checkpointing (renamed in transformers 5).
"""

from __future__ import annotations

import inspect
import weakref

import torch

_ACCEPTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # function -> {name: accepted}


def accepts(fn, name: str) -> bool:
    """`fn` takes a keyword `name` (by name or through **kwargs); read once per function (a signature is slow
    next to a forward)."""
    func = getattr(fn, "__func__", fn)
    try:
        known = _ACCEPTS.setdefault(func, {})
    except TypeError:  # not weak-referenceable
        known = {}
    if name not in known:
        try:
            params = inspect.signature(fn).parameters
            var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
            known[name] = name in params or var_kw
        except (TypeError, ValueError):
            known[name] = True
    return known[name]


def names_parameter(fn, name: str) -> bool:
    """`fn` names the parameter `name` itself (not only through **kwargs)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def returned_cache(out):
    """The cache a forward returned (transformers 5: `cache`; 4.x: `past_key_values`), None if it returned
    none."""
    keys = out.keys() if hasattr(out, "keys") else ()
    for name in ("cache", "past_key_values"):
        if name in keys and out[name] is not None:
            return out[name]
    return None


def cache_argument(module: torch.nn.Module) -> str:
    """The keyword a model's forward takes its K/V cache by (transformers 5.2x: `cache`; before:
    `past_key_values`)."""
    return "cache" if names_parameter(module.forward, "cache") else "past_key_values"


def cache_layers(cache) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
    """(keys, values) per decoder layer of a cache; (None, None) for layers that keep no K/V."""
    cache = getattr(cache, "self_attention_cache", cache)  # encoder-decoder families: the decoder's own cache
    if hasattr(cache, "layers"):
        return [(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in cache.layers]
    if hasattr(cache, "key_cache"):  # older transformers
        return list(zip(cache.key_cache, cache.value_cache, strict=True))
    return [(k, v) for k, v in cache]  # legacy tuple of tuples


def is_checkpointing(model) -> bool:
    """Activation (gradient) checkpointing is on; the name changed in transformers 5."""
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), attr) or hasattr(model, attr):
            return bool(getattr(model, attr))
    return False


def enable_checkpointing(model) -> None:
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
