"""Geometry from configs alone, and clear errors for what we cannot load or capture."""

from __future__ import annotations

import pytest
from transformers import AutoConfig

from kvdistill.errors import KvdistillError
from kvdistill.models.geometry import KVGeometry, geometry_of
from kvdistill.models.load import load_config, load_model

from .conftest import TINY, build_tiny


@pytest.mark.parametrize("family", list(TINY))
def test_geometry_of_config_equals_geometry_of_model(tiny_models, family):
    """extract() checks a loaded teacher against its config.json by geometry: both must derive the same."""
    model = tiny_models(family)
    assert geometry_of(model.config).to_dict() == geometry_of(model).to_dict()


def test_kv_heads_and_head_dim_come_from_the_modules():
    """A config without head_dim: D from the attention module, H_kv from k_proj.out_features / D."""
    geom = geometry_of(AutoConfig.for_model("qwen3", **{**TINY["qwen3"], "head_dim": 24}))
    assert (geom.num_kv_heads, geom.head_dim) == (2, 24)
    geom = geometry_of(AutoConfig.for_model("falcon", **TINY["falcon"]))  # multi-query: one KV head
    assert (geom.num_kv_heads, geom.head_dim) == (1, 16)


@pytest.mark.parametrize("family", list(TINY))
def test_geometry_dict_round_trip(family):
    geom = geometry_of(AutoConfig.for_model(family, **TINY[family]))
    data = geom.to_dict()
    for key in (
        "name",
        "model_type",
        "num_layers",
        "num_attention_heads",
        "num_kv_heads",
        "head_dim",
        "hidden_size",
        "vocab_size",
        "is_encoder",
        "sliding_window",
        "rope",
    ):
        assert key in data
    assert KVGeometry.from_dict(data) == geom


def test_partial_and_interleaved_rotary_dims():
    assert geometry_of(AutoConfig.for_model("gpt_neox", **TINY["gpt_neox"])).rope.rotary_dim == 4
    assert geometry_of(AutoConfig.for_model("phi", **TINY["phi"])).rope.rotary_dim == 8
    gptj = geometry_of(AutoConfig.for_model("gptj", **TINY["gptj"])).rope
    assert (gptj.style, gptj.rotary_dim) == ("interleaved", 8)


def test_falcon_alibi_and_mqa():
    geom = geometry_of(AutoConfig.for_model("falcon", **{**TINY["falcon"], "alibi": True}))
    assert geom.position_kind == "alibi" and geom.rope is None and geom.num_kv_heads == 1


def test_unsupported_family_lists_supported():
    config = AutoConfig.for_model("t5", d_model=32, num_layers=1, num_heads=2, vocab_size=64)
    with pytest.raises(KvdistillError) as info:
        geometry_of(config)
    assert "'t5' is not supported" in str(info.value) and "llama" in str(info.value)


def test_state_space_model_has_no_attention_layers():
    config = AutoConfig.for_model("mamba", hidden_size=64, num_hidden_layers=2, vocab_size=128, state_size=8)
    with pytest.raises(KvdistillError, match="no attention layers to capture"):
        geometry_of(config)


def test_hybrid_lists_its_attention_layers():
    """Jamba: attention every 2nd layer from 1, mamba elsewhere; K/V layers are the attention ones."""
    config = AutoConfig.for_model(
        "jamba",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        num_experts=2,
        attn_layer_period=2,
        attn_layer_offset=1,
        mamba_d_state=8,
        mamba_dt_rank=8,
    )
    geom = geometry_of(config)
    assert (geom.num_layers, geom.attention_layers, geom.num_hidden_layers) == (2, [1, 3], 4)
    assert geom.rope is None and geom.position_kind == "none"
    assert geom.kv_bytes_per_token(2) == 2 * 2 * 2 * 16 * 2


def test_latent_attention_geometry():
    """DeepSeek-V3 MLA: per-head keys (nope | rope) with the rotary dims at the end, narrower values."""
    config = AutoConfig.for_model(
        "deepseek_v3",
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=128,
        kv_lora_rank=16,
        q_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=24,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
    )
    geom = geometry_of(config)
    assert (geom.num_kv_heads, geom.head_dim, geom.value_head_dim) == (4, 16, 24)
    assert (geom.rope.rotary_dim, geom.rope.offset) == (8, 8)


def test_unknown_model_or_path():
    with pytest.raises(KvdistillError) as info:
        load_model("/no/such/dir-or-model")
    assert "/no/such/dir-or-model" in str(info.value)
    with pytest.raises(KvdistillError):
        load_config("smollm2-135mm")


# ------------------------------------------------------------------------------------------- derived once
@pytest.fixture
def derivations(monkeypatch):
    """The models and configs whose geometry is derived (not answered from memory) from here on."""
    import kvdistill.models.geometry as geometry

    derived: list = []
    derive = geometry._derive

    def counted(model_or_config):
        derived.append(model_or_config)
        return derive(model_or_config)

    monkeypatch.setattr(geometry, "_derive", counted)
    return derived


def test_a_config_is_derived_once_per_content(derivations):
    """An equal config (another object, same JSON) is answered from memory; a changed one is derived again."""
    make = lambda **kw: AutoConfig.for_model("llama", **{**TINY["llama"], "vocab_size": 131, **kw})  # noqa: E731
    first = geometry_of(make())
    assert geometry_of(make()) is first and len(derivations) == 1
    named = geometry_of(make(), name="teacher")
    assert named.name == "teacher" and named.to_dict() | {"name": first.name} == first.to_dict()
    assert len(derivations) == 1
    deeper = geometry_of(make(num_hidden_layers=3))
    assert (deeper.num_layers, first.num_layers, len(derivations)) == (3, 2, 2)


def test_a_model_is_derived_once_and_again_after_its_config_changes(derivations):
    model = build_tiny("qwen2")
    first = geometry_of(model)
    assert geometry_of(model) is first and geometry_of(model, name="s").name == "s"
    assert derivations == [model]
    geometry_of(build_tiny("qwen2"))  # another object of the same config: its own modules are read
    assert len(derivations) == 2
    model.config.max_position_embeddings = 512
    assert geometry_of(model).max_positions == 512 and first.max_positions == 256 and len(derivations) == 3


def test_validation_preflight_and_the_objective_derive_each_geometry_once(tiny_config, derivations):
    """A run asks for the geometry of one model many times (validation and preflight read config.json, an R-KV
    teacher's attention kernel is chosen from it, the objective and each teacher read their loaded model):
    each config content and each model object is derived at most once, and the student and both teachers once
    each."""
    import torch

    from kvdistill.objectives import build_objective
    from kvdistill.train.preflight import preflight

    cfg = tiny_config("teachers.1.compression.kind=rkv", "teachers.1.compression.budget=8")
    preflight(cfg)
    objective = build_objective(cfg)
    keys = [
        id(m) if isinstance(m, torch.nn.Module) else m.to_json_string(use_diff=False) for m in derivations
    ]
    assert len(keys) == len(set(keys))
    models = [m for m in derivations if isinstance(m, torch.nn.Module)]
    assert len(models) == 3 and {id(t.model) for t in objective.teachers} < {id(m) for m in models}
