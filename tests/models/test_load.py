"""`from_pretrained_or_config` falls back to eager attention for a model without an SDPA kernel, whichever way
transformers words that (Gemma 2 under transformers 5.25 names
`torch.nn.functional.scaled_dot_product_attention`)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, Gemma2Config

from kvdistill.models.load import from_pretrained_or_config


def test_gemma2_builds_with_sdpa_asked():
    config = Gemma2Config(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
    )
    model = from_pretrained_or_config(
        AutoModelForCausalLM, attn_implementation="sdpa", config=config, dtype=torch.float32
    )
    assert model.config._attn_implementation in ("sdpa", "eager")
    out = model(torch.tensor([[1, 2, 3]]))
    assert out.logits.shape == (1, 3, 64)
