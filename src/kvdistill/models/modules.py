"""The modules a geometry is read from: the model a config describes, built on the meta device, and the
self-attention module of each decoder layer (found once per model).
"""

from __future__ import annotations

import importlib
import weakref

import torch

from kvdistill.errors import KvdistillError
from kvdistill.models.hf_config import as_int, config_attr, is_encoder_config, text_config

# Words in the class names of attention-looking modules that are not softmax attention over cached K/V.
NOT_KV_ATTENTION = ("linear", "lightning", "delta", "mamba", "cross", "vision", "audio")
# Child names under which attention modules keep their key / value projections (one per family style).
KEY_MODULES = (
    "k_proj",
    "key",
    "k",
    "wk",
    "c_attn",
    "qkv_proj",
    "query_key_value",
    "Wqkv",
    "W_pack",
    "qkv",
    "kv_proj",
    "kv_a_proj_with_mqa",
)


def skeleton(config) -> torch.nn.Module:
    """The model a config describes, built on the meta device: modules and shapes, no memory, no weights."""
    from transformers import AutoModel, AutoModelForCausalLM

    if is_encoder_config(text_config(config)):
        classes = (AutoModel,)
    elif config_attr(
        config, "is_encoder_decoder", False
    ):  # t5 & co: only their decoder-only causal-LM classes
        classes = (AutoModelForCausalLM,)
    else:  # a text sub-config (emu3_text_model) may have a base model class only
        classes = (AutoModelForCausalLM, AutoModel)
    errors = []
    for cls in classes:
        try:
            with torch.device("meta"):
                return cls.from_config(config)
        except (ValueError, KeyError) as err:
            errors.append(str(err).splitlines()[0][:160])
    own = _own_causal_lm_class(config)
    if own is not None:
        with torch.device("meta"):
            return own(config)
    model_type = config_attr(config, "model_type", None)
    raise KvdistillError(
        f"model family '{model_type}' is not supported for KV capture: transformers builds no "
        f"{'encoder' if len(classes) == 1 else 'causal-LM'} model from its config ({errors[0]})",
        "use a decoder family with a causal-LM class in transformers (llama, qwen2, gemma3, mistral, phi3, "
        "gpt_neox, ...) or a BERT-style encoder",
    )


def _own_causal_lm_class(config):
    """The *ForCausalLM class of the config's own modeling module that takes this config class (emu3, mllama:
    their causal LM takes the text sub-config, which the auto mapping does not list)."""
    module = type(config).__module__.replace(".configuration_", ".modeling_")
    try:
        modeling = importlib.import_module(module)
    except ImportError:
        return None
    for name, cls in vars(modeling).items():
        if name.endswith("ForCausalLM") and getattr(cls, "config_class", None) is type(config):
            return cls
    return None


def _family_prefix(model: torch.nn.Module) -> str:
    """KimiLinear of KimiLinearConfig: the class names of the family's modules start with it (a wrapper such
    as PEFT keeps the config of the model it wraps)."""
    return type(getattr(model, "config", None)).__name__.removesuffix("Config")


_ATTENTIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {layer: attention module}


def decoder_attention_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Decoder-layer index -> the self-attention module of that layer (the one that writes the layer's cache).
    Found once per model (a walk over every module; every capture asks), like `hook_plan`.

    Attention modules are the ones transformers hands a `layer_idx` and a key projection; cross attention and
    the vision/audio towers of multimodal models are left out. Where a layer holds several (a hybrid layer's
    linear-attention or state-space mixer next to its softmax attention), the softmax one is kept.
    """
    cached = _ATTENTIONS.get(model)
    if cached is not None:
        return dict(cached)
    prefix = _family_prefix(model)
    found: dict[int, list[tuple[int, str, torch.nn.Module]]] = {}
    for name, module in model.named_modules():
        idx = as_int(getattr(module, "layer_idx", None))
        if idx is None:
            continue
        cls = type(module).__name__.removeprefix(prefix).lower()
        if not any(word in cls for word in ("attention", "attn", "mla")):
            continue
        path = name.lower().split(".")
        if any(
            word in part for part in path for word in ("vision", "visual", "audio", "encoder_attn", "cross")
        ):
            continue
        if not any(isinstance(getattr(module, k, None), torch.nn.Module) for k in KEY_MODULES):
            continue
        linear = any(word in cls for word in NOT_KV_ATTENTION)
        found.setdefault(idx, []).append((int(linear), name, module))
    # softmax attention before linear attention, then the shallowest (a wrapper before what it wraps)
    out = {idx: min(c, key=lambda x: (x[0], x[1].count(".")))[2] for idx, c in found.items()}
    _ATTENTIONS[model] = out
    return dict(out)


def has_rotary(model: torch.nn.Module) -> bool:
    for module in model.modules():
        cls = type(module).__name__
        if "Rotary" in cls or "RoPE" in cls or "inv_freq" in dict(module.named_buffers(recurse=False)):
            return True
    return False


def has_kv_blocks(model: torch.nn.Module) -> bool:
    """Older modeling code without `layer_idx` on its attention (ctrl, cpmant): any attention-named module."""
    return any(
        "attention" in type(m).__name__.lower() and "linear" not in type(m).__name__.lower()
        for m in model.modules()
    )
