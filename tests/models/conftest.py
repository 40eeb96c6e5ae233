"""Tiny random models of every supported family (2 layers, width 64), built from real config classes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=256,
)

TINY = {
    "llama": dict(COMMON, num_key_value_heads=2, rope_theta=10000.0),
    "mistral": dict(COMMON, num_key_value_heads=1, sliding_window=8),
    "qwen2": dict(COMMON, num_key_value_heads=2),
    "qwen3": dict(COMMON, num_key_value_heads=2, head_dim=32),
    "gemma": dict(COMMON, num_key_value_heads=1, head_dim=16),
    "gemma2": dict(COMMON, num_key_value_heads=2, head_dim=16, sliding_window=8),
    "gemma3_text": dict(
        COMMON,
        num_key_value_heads=1,
        head_dim=32,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        rope_local_base_freq=10000.0,
        rope_theta=1000000.0,
    ),
    "phi": dict(COMMON, partial_rotary_factor=0.5),
    "phi3": dict(COMMON, num_key_value_heads=2, pad_token_id=0),
    "gpt_neox": dict(COMMON, rotary_pct=0.25),
    "gptj": dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=256),
    "gpt2": dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256),
    "opt": dict(
        vocab_size=128,
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        word_embed_proj_dim=64,
    ),
    "falcon": dict(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        alibi=False,
        new_decoder_architecture=False,
        multi_query=True,
        max_position_embeddings=256,
    ),
    "mixtral": dict(COMMON, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(
        COMMON,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
    ),
    "bert": dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
    ),
}
ROTARY = [f for f in TINY if f not in {"gpt2", "opt", "bert"}]


def build_tiny(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model(family, **TINY[family])
    config._attn_implementation = "eager"
    cls = AutoModel if family == "bert" else AutoModelForCausalLM
    model = cls.from_config(config, attn_implementation="eager").eval()
    return model


@pytest.fixture(scope="module")
def tiny_models():
    cache: dict[str, torch.nn.Module] = {}

    def get(family: str) -> torch.nn.Module:
        if family not in cache:
            cache[family] = build_tiny(family)
        return cache[family]

    return get
