"""The student: a pretrained causal LM, or one built from a base config with chosen overrides and tokenizer,
optionally wrapped with LoRA adapters (peft)."""

from __future__ import annotations

import torch

from kvdistill.config import StudentConfig
from kvdistill.models.hf_forward import enable_checkpointing
from kvdistill.models.load import (
    attn_implementation_for,
    from_pretrained_or_config,
    load_model,
    load_tokenizer,
    resolve_dtype,
)


def build_student(
    cfg: StudentConfig, *, seed: int = 0, attentions: bool = False, key: str = "student.from_config"
):
    """(model, tokenizer), model in train mode on CPU (the trainer moves it).

    A from_config model's config is built by `kvdistill.models.from_config` (the family's config class, heads
    and widths checked, derived sizes following hidden_size); `key` names it in errors (a teacher's
    from_config).

    attentions: the run reads the student's attention probabilities (eager attention), else sdpa where the
    family has it.
    """
    attn = attn_implementation_for(attentions)
    if cfg.model is not None:
        model, tokenizer = load_model(
            cfg.model, dtype=cfg.dtype, tokenizer=cfg.tokenizer, attn_implementation=attn
        )
    else:
        from transformers import AutoModelForCausalLM

        from kvdistill.models.from_config import hf_config_from_spec

        base, family = cfg.from_config.get("base"), cfg.from_config.get("family")
        config, _ = hf_config_from_spec(cfg.from_config, key=key, log_notes=True)
        tokenizer = load_tokenizer(cfg.tokenizer or base)
        # the embedding must cover the chosen tokenizer, special ids must point into it
        config.vocab_size = len(tokenizer)
        for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(config, attr, getattr(tokenizer, attr))
        torch.manual_seed(seed)
        model = from_pretrained_or_config(
            AutoModelForCausalLM, config=config, dtype=resolve_dtype(cfg.dtype), attn_implementation=attn
        )
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
