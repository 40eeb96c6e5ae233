"""A tiny random model of any causal-LM family transformers ships: 2 layers, width 64, vocab 128, 4 heads.

`tiny_config(family)` starts from the family's default config and shrinks every size it has (widths, layer and
head counts, experts, latent ranks, state-space sizes, windows) to tiny values, so that layers which slide,
rotate partially, share experts or mix attention with state-space blocks keep doing so, only smaller. Where a
family's config needs more than that to validate or to keep an attention layer within 2 layers, `OVERRIDES`
says what and why. Nothing is downloaded.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

KV_TYPES = {
    "full_attention",
    "sliding_attention",
    "chunked_attention",
    "indexed_attention",
    "hybrid",
    "hybrid_sliding",
}
VOCAB = 128
WINDOW = 8  # sliding windows / attention chunks: shorter than the sweep's sequences
SIZES = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "n_embd": 64,
    "d_model": 64,
    "embed_dim": 64,
    "n_embed": 64,
    "intermediate_size": 128,
    "ffn_dim": 128,
    "n_inner": 128,
    "decoder_ffn_dim": 128,
    "encoder_ffn_dim": 128,
    "intermediate_size_mlp": 128,
    "ffn_hidden_size": 128,
    "d_ff": 128,
    "block_ffn_dim": 128,
    "num_hidden_layers": 2,
    "n_layer": 2,
    "n_layers": 2,
    "num_layers": 2,
    "decoder_layers": 2,
    "encoder_layers": 2,
    "num_attention_heads": 4,
    "n_head": 4,
    "n_heads": 4,
    "num_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_attention_heads": 4,
    "attention_heads": 4,
    "max_position_embeddings": 256,
    "n_positions": 256,
    "n_ctx": 256,
    "max_seq_len": 256,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "shared_intermediate_size": 32,
    "expert_intermediate_size": 32,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_topk": 2,
    "moe_num_experts": 4,
    "moe_k": 2,
    "top_k": 2,
    "kv_lora_rank": 16,
    "q_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "first_k_dense_replace": 1,
    "n_group": 1,
    "topk_group": 1,
    "num_nextn_predict_layers": 0,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "mamba_n_heads": 8,
    "mamba_d_head": 16,
    "mamba_d_state": 16,
    "mamba_dt_rank": 8,
    "mamba_n_groups": 1,
    "mamba_chunk_size": 16,
    "mamba_d_ssm": 128,
    "state_size": 16,
    "time_step_rank": 8,
    "expand": 2,
    "n_groups": 1,
    "chunk_size": 16,
    "attention_chunk_size": WINDOW,
    "sliding_window": WINDOW,
    "attention_window_size": WINDOW,
    "window_size": WINDOW,
    "rotary_dim": 8,
    "vocab_size_per_layer_input": VOCAB,
    "hidden_size_per_layer_input": 16,
    "num_kv_shared_layers": 0,
    "attn_layer_period": 2,
    "attn_layer_offset": 1,
    "expert_layer_period": 2,
    "expert_layer_offset": 1,
    "original_max_position_embeddings": 64,
    "lru_width": 64,
    "attention_hidden_size": 128,
    "attention_head_dim": 16,
    "moe_layer_start_index": 1,
    "moe_layer_end_index": 1,
    "max_window_layers": 1,
    "num_experts_per_token": 2,
    "num_expert_group": 1,
    "linear_head_dim": 16,
    "linear_num_heads": 4,
    "layer_group_size": 2,
    "num_dense_layers": 1,
    "embedding_dim": 64,
    "num_blocks": 2,
    "hidden_size_global": 64,
    "encoder_hash_byte_group_vocab": VOCAB,
}
# MoE routing sizes some defaults leave None (filled, since the modules need them)
ROUTING = {
    "num_experts_per_tok": 2,
    "n_group": 1,
    "topk_group": 1,
    "n_routed_experts": 4,
    "n_shared_experts": 1,
}

# family -> extra config values, each for a reason the generic shrink cannot know
OVERRIDES: dict[str, dict] = {
    "bamba": dict(attn_layer_indices=[1]),  # its default has no attention layer at all
    # rope parameters are keyed by layer type, and the default has no layer types
    "cohere_compass_text": dict(
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={
            t: {"rope_type": "default", "rope_theta": 10000.0}
            for t in ("sliding_attention", "full_attention")
        },
    ),
    "falcon_h1": dict(mamba_d_head=16),  # mamba_n_heads * mamba_d_head must be mamba_d_ssm
    "lfm2_moe": dict(layer_types=["conv", "full_attention"]),  # the default leaves them None
    "rwkv": dict(attention_hidden_size=64),  # must be hidden_size
    # its shared attention block is tied across hybrid layers: it needs two of them
    "zamba": dict(num_hidden_layers=3, layers_block_type=["mamba", "hybrid", "hybrid"], n_mamba_heads=2),
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]]),  # one (global, local) pair = 2 layers
    "mamba2": dict(num_heads=8, head_dim=16),  # num_heads * head_dim must be expand * hidden_size
    "recurrent_gemma": dict(block_types=["recurrent", "attention"], head_dim=16),
    "zamba2": dict(layers_block_type=["mamba", "hybrid"], n_mamba_heads=2, num_mem_blocks=1),
    "qwen4_exp": dict(
        text_config=dict(
            indexer_n_heads=2,
            indexer_kv_heads=1,
            indexer_head_dim=16,
            indexer_budget=8,
            indexer_compress_ratio=2,
        )
    ),
    "qwen4_exp_text": dict(
        indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=8, indexer_compress_ratio=2
    ),
}


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _layer_types(types: list[str]) -> list[str]:
    """Two layers of the kinds the default stacks: a non-attention kind first where there is one, then
    attention."""
    kinds = list(dict.fromkeys(types))
    attention = [k for k in kinds if k in KV_TYPES]
    other = [k for k in kinds if k not in KV_TYPES]
    if other:
        return [other[0], attention[0] if attention else "full_attention"]
    return (kinds * 2)[:2]


def shrunk(d: dict) -> dict:
    """Config values that make the config `d` (a `to_dict()`) tiny."""
    out = {k: (v if k == "vocab_size" else min(d[k], v)) for k, v in SIZES.items() if _int(d.get(k))}
    out.update({k: v for k, v in ROUTING.items() if k in d and d[k] is None})
    heads = out.get("num_attention_heads", d.get("num_attention_heads"))
    if "num_key_value_heads" in d:  # multi-head stays multi-head, GQA becomes 4 query heads over 2 KV heads
        out["num_key_value_heads"] = (
            heads if d["num_key_value_heads"] in (None, d.get("num_attention_heads")) else 2
        )
    if "head_dim" in d:
        out["head_dim"] = SIZES["qk_rope_head_dim"] if _int(d.get("qk_rope_head_dim")) else 16
    for key, small in (
        ("pad_token_id", 0),
        ("bos_token_id", 1),
        ("eos_token_id", 2),
        ("decoder_start_token_id", 0),
    ):
        if _int(d.get(key)) and d[key] >= VOCAB:
            out[key] = small
    if "full_attn_idxs" in d:  # lfm2: conv layers except the listed attention ones
        out["full_attn_idxs"], out["layer_types"] = [1], None
    elif isinstance(d.get("layer_types"), list) and d["layer_types"]:
        out["layer_types"] = _layer_types(d["layer_types"])
    for key, value in d.items():  # sub-configs (text_config, decoder, ...) shrink the same way
        if isinstance(value, dict) and ("hidden_size" in value or "num_hidden_layers" in value):
            sub = {k: v for k, v in value.items() if k != "per_layer_config"}  # rebuilt for the new depth
            out[key] = {**sub, **shrunk(value)}
    return out


def tiny_config(family: str):
    defaults = AutoConfig.for_model(family).to_dict()
    kwargs = shrunk(defaults)
    for key, value in OVERRIDES.get(family, {}).items():
        kwargs[key] = (
            {**kwargs.get(key, {}), **value}
            if isinstance(value, dict) and key != "rope_parameters" and isinstance(kwargs.get(key), dict)
            else value
        )
    if "is_decoder" in defaults:
        kwargs["is_decoder"] = True  # BERT-style families are causal LMs (with a cache) only as decoders
    return AutoConfig.for_model(family, **kwargs)


def build(family: str, attn_implementation: str = "eager") -> torch.nn.Module:
    """The tiny random model of `family`, seeded, in eval mode."""
    config = tiny_config(family)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).eval()
    with torch.no_grad():  # zero-initialised scales (zaya's key temperature) would make every key 0
        for param in model.parameters():
            if param.is_floating_point() and param.numel() and not param.any():
                param.normal_(0.0, 0.02)
    if hasattr(model, "set_default_language"):  # xmod: adapters per language, one must be chosen
        model.set_default_language(next(iter(config.languages)))
    return model
