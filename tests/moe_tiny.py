"""Tiny random MoE models of the families transformers ships, for the MoE tests (no weights downloaded).

`moe_model(family, ...)` builds one with its weights drawn at std 0.2 (the families' 0.02 init gives
near-uniform routing, where every comparison would be trivially close), in eval mode, float32.
"""

from __future__ import annotations

import torch

FAMILIES = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=24
    ),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "deepseek_v3": dict(
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=0,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        num_key_value_heads=4,
    ),
}


def moe_config(
    family: str, *, vocab_size: int = 128, hidden_size: int = 32, experts: int | None = None, **fields
):
    from transformers import AutoConfig

    kw = {"num_key_value_heads": 2, **FAMILIES[family], **fields}
    if experts is not None:
        key = {"mixtral": "num_local_experts", "deepseek_v3": "n_routed_experts"}.get(family, "num_experts")
        kw[key] = experts
    return AutoConfig.for_model(
        family,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **kw,
    )


def moe_model(family: str, *, seed: int = 0, std: float = 0.2, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(moe_config(family, **kw), attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, std)
    return model.eval()
