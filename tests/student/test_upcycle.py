"""Sparse upcycling: the MoE computes the dense model's function at initialisation, its experts are the
MLP."""

from __future__ import annotations

import pytest
import torch

from kvdistill.config import StudentConfig
from kvdistill.errors import KvdistillError
from kvdistill.models.moe import moe_layers
from kvdistill.student import build_student

DENSE = {"llama": dict(head_dim=8), "qwen3": dict(head_dim=8), "mistral": dict(head_dim=8)}


@pytest.mark.parametrize("family", list(DENSE))
def test_upcycled_student_computes_the_dense_function(family):
    fields = dict(
        family=family,
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        **DENSE[family],
    )
    dense, _ = build_student(StudentConfig(from_config=fields, tokenizer="gpt2-tokenizer"), seed=0)
    moe, _ = build_student(
        StudentConfig(from_config=fields, tokenizer="gpt2-tokenizer", upcycle={"num_experts": 4, "top_k": 2}),
        seed=0,
    )
    layers = moe_layers(moe)
    assert len(layers) == 2 and all(x.num_experts == 4 and x.top_k == 2 for x in layers)
    assert moe.config.model_type == {"llama": "mixtral", "mistral": "mixtral", "qwen3": "qwen3_moe"}[family]
    for i, layer in enumerate(layers):
        mlp = dense.model.layers[i].mlp
        for e in range(4):
            torch.testing.assert_close(
                layer.experts.gate_up_proj[e], torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            )
            torch.testing.assert_close(layer.experts.down_proj[e], mlp.down_proj.weight)
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(moe.eval()(ids).logits, dense.eval()(ids).logits, rtol=1e-5, atol=1e-5)
    # the router is new: its choices are not all the same expert
    with torch.no_grad():
        chosen = layers[0].gate(moe.model.embed_tokens(ids).view(-1, 32))[2]
    assert len(set(chosen.flatten().tolist())) > 1


def test_upcycling_refuses_a_family_without_a_counterpart():
    fields = dict(
        family="qwen2",
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    with pytest.raises(KvdistillError, match="no MoE counterpart"):
        build_student(
            StudentConfig(from_config=fields, tokenizer="gpt2-tokenizer", upcycle={"num_experts": 4})
        )
    with pytest.raises(ValueError, match="top_k"):
        StudentConfig(from_config=fields, tokenizer="gpt2-tokenizer", upcycle={"num_experts": 2, "top_k": 3})
