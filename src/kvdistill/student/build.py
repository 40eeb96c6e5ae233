"""The student: a pretrained causal LM, or one built from a base config with chosen overrides and tokenizer,
optionally wrapped with LoRA adapters (peft)."""

from __future__ import annotations

import torch

from kvdistill.config import StudentConfig
from kvdistill.errors import KvdistillError
from kvdistill.models.capture import enable_checkpointing
from kvdistill.models.load import (
    attn_implementation_for,
    from_pretrained_or_config,
    load_config,
    load_model,
    load_tokenizer,
    resolve_dtype,
)


def build_student(cfg: StudentConfig, *, seed: int = 0, attentions: bool = False):
    """(model, tokenizer), model in train mode on CPU (the trainer moves it).

    attentions: the run reads the student's attention probabilities (eager attention), else sdpa where the
    family has it.
    """
    attn = attn_implementation_for(attentions)
    if cfg.model is not None:
        model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, tokenizer=cfg.tokenizer, attn_implementation=attn)
    else:
        from transformers import AutoModelForCausalLM

        overrides = dict(cfg.from_config)
        base = overrides.pop("base", None)
        family = overrides.pop("family", None)
        config = load_config(base) if base is not None else _family_config(family, overrides)
        unknown = [k for k in overrides if not hasattr(config, k)]
        if unknown:
            raise KvdistillError(
                f"student.from_config: {unknown} are not fields of {type(config).__name__}",
                f"use fields of {'the base model' + chr(39) + 's config.json (' + base + ')' if base else family}",
            )
        for key, value in overrides.items():
            setattr(config, key, value)
        tokenizer = load_tokenizer(cfg.tokenizer or base)
        # the embedding must cover the chosen tokenizer, special ids must point into it
        config.vocab_size = len(tokenizer)
        for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(config, attr, getattr(tokenizer, attr))
        torch.manual_seed(seed)
        model = from_pretrained_or_config(AutoModelForCausalLM, config=config, dtype=resolve_dtype(cfg.dtype),
                                          attn_implementation=attn)
        model.config.name_or_path = f"{base or family}+from_config"
    if cfg.upcycle is not None:
        from kvdistill.student.upcycle import upcycle

        model = upcycle(model, num_experts=cfg.upcycle.num_experts, top_k=cfg.upcycle.top_k, seed=seed)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    if cfg.lora is not None:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=cfg.lora.target_modules,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    model.train()
    return model, tokenizer


def unwrap_student(model: torch.nn.Module) -> torch.nn.Module:
    """The plain transformers model under a peft wrapper (for geometry and K/V capture)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def save_student(model: torch.nn.Module, tokenizer, out_dir: str, *, merge_lora: bool = True) -> None:
    """Hugging Face format that loads with plain transformers; LoRA merged (adapter kept as well if asked)."""
    if hasattr(model, "merge_and_unload"):
        # LoRA leaves the embeddings frozen: the adapter holds only the adapter weights (peft's "auto" would
        # copy the embeddings into every checkpoint when it cannot look the base model up offline)
        model.save_pretrained(f"{out_dir}/adapter", save_embedding_layers=False)
        if merge_lora:
            import copy

            model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _family_config(family: str, fields: dict):
    """The config of a transformers model_type (e.g. "qwen2", "gemma2") built with `fields` (so that derived fields
    such as per-layer types follow the layer count), refused with the known types."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if family not in CONFIG_MAPPING:
        close = [k for k in CONFIG_MAPPING if k.startswith(str(family)[:3])][:8]
        raise KvdistillError(f"student.from_config.family '{family}' is not a transformers model_type",
                             f"use one such as llama, qwen2, gemma2, mistral{' (close: ' + ', '.join(close) + ')' if close else ''}")
    return AutoConfig.for_model(family, **fields)
