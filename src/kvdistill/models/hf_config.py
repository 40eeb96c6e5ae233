"""Reading a transformers config whatever its version and family: attributes that per-layer configs refuse to
give globally, the first of several names a value goes by, the text (decoder) sub-config, the rope parameters
of a layer type in one layout, and the cache layer types transformers builds per decoder layer.
"""

from __future__ import annotations

from typing import Any

from kvdistill.models.kv_geometry import SLIDING_LAYER_TYPES


def config_attr(obj, name: str, default=None):
    """getattr that reads a config attribute transformers refuses to give globally (per-layer configs) as
    default."""
    try:
        return getattr(obj, name, default)
    except Exception:  # AmbiguousGlobalPerLayerAttributeError: the value varies per layer
        return default


def first_attr(config, *names, default=None):
    for n in names:
        value = config_attr(config, n)
        if value is not None:
            return value
    return default


def as_int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def text_config(model_or_config):
    """The decoder (text) config of a model or config."""
    config = getattr(model_or_config, "config", model_or_config)
    if hasattr(config, "get_text_config"):
        try:
            return config.get_text_config(decoder=True)
        except TypeError:  # transformers 4.x without the decoder flag
            return config.get_text_config()
    return config


def rope_params(config, layer_type: str | None) -> dict[str, Any]:
    """The rope parameters of one layer type, in one layout whatever the transformers version."""
    params = config_attr(config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        if layer_type is not None and isinstance(params.get(layer_type), dict):
            return dict(params[layer_type])
        if "rope_theta" in params or "rope_type" in params:
            return dict(params)
        nested = [v for v in params.values() if isinstance(v, dict)]
        if nested:  # keyed by layer type, but not by this one (chunked_attention -> the first given)
            return dict(nested[0])
    # transformers 4.x layout
    theta = first_attr(config, "rope_theta", "rotary_emb_base", default=10000.0)
    if layer_type == "sliding_attention" and config_attr(config, "rope_local_base_freq", None) is not None:
        theta = config.rope_local_base_freq
    out = {"rope_theta": theta, "rope_type": "default"}
    scaling = config_attr(config, "rope_scaling", None)
    if isinstance(scaling, dict) and layer_type != "sliding_attention":
        out.update(scaling)
        out["rope_type"] = scaling.get("rope_type", scaling.get("type", "default"))
        out["rope_theta"] = theta
    for key in ("partial_rotary_factor", "rotary_pct"):
        if config_attr(config, key, None) is not None:
            out["partial_rotary_factor"] = config_attr(config, key)
    return out


def cache_layer_types(config, num_hidden_layers: int) -> tuple[list[str], list[dict]]:
    """Per decoder layer, the cache layer type transformers builds (and its kwargs, e.g. sliding_window)."""
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs

        types, kwargs = get_layer_types_and_kwargs(config)
        types, kwargs = list(types), list(kwargs)
        # the helper's return changed across 5.x (5.17 gives no per-layer kwargs dicts): only this shape is
        # read
        if (
            len(types) == len(kwargs)
            and all(isinstance(t, str) for t in types)
            and all(isinstance(k, dict) for k in kwargs)
        ):
            return types, kwargs
        raise TypeError("unexpected get_layer_types_and_kwargs result")
    except Exception:  # older transformers, or a config without per-layer sub-configs
        types = config_attr(config, "layer_types", None) or ["full_attention"] * num_hidden_layers
        window = config_attr(config, "sliding_window", None)
        kwargs = [{"sliding_window": window} if t in SLIDING_LAYER_TYPES else {} for t in types]
        return list(types), kwargs


def is_encoder_config(config) -> bool:
    """A masked-LM family (BERT & co) not built as a decoder (`is_decoder=True` gives it a causal cache)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return (
        config_attr(config, "model_type", None) in MODEL_FOR_MASKED_LM_MAPPING_NAMES
        and not config_attr(config, "is_decoder", False)
        and not config_attr(config, "is_encoder_decoder", False)
    )
