"""Geometry from configs alone, and clear errors for what we cannot load or capture."""

from __future__ import annotations

import pytest
from transformers import AutoConfig

from kvdistill.errors import KvdistillError
from kvdistill.models.geometry import SUPPORTED_FAMILIES, KVGeometry, geometry_of
from kvdistill.models.load import load_config, load_model

from .conftest import TINY


def test_every_listed_family_has_a_tiny_config():
    assert set(SUPPORTED_FAMILIES) - {"gemma3"} == set(TINY)


@pytest.mark.parametrize("family", list(TINY))
def test_geometry_dict_round_trip(family):
    geom = geometry_of(AutoConfig.for_model(family, **TINY[family]))
    data = geom.to_dict()
    for key in ("name", "model_type", "num_layers", "num_attention_heads", "num_kv_heads", "head_dim",
                "hidden_size", "vocab_size", "is_encoder", "sliding_window", "rope"):
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


def test_unknown_model_or_path():
    with pytest.raises(KvdistillError) as info:
        load_model("/no/such/dir-or-model")
    assert "/no/such/dir-or-model" in str(info.value)
    with pytest.raises(KvdistillError):
        load_config("smollm2-135mm")
