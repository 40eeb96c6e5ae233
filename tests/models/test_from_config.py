"""from_config specs built through the family's config class: inconsistent shapes refused with the keys and a
consistent choice, sizes derived from hidden_size re-derived in the base's proportion (and said so)."""

from __future__ import annotations

import logging

import pytest
import torch

from kvdistill.errors import KvdistillError
from kvdistill.models.from_config import hf_config_from_spec


def refused(spec: dict, key: str = "student.from_config") -> KvdistillError:
    with pytest.raises(KvdistillError) as err:
        hf_config_from_spec(spec, key=key)
    return err.value


def test_hidden_size_not_a_multiple_of_the_base_heads_names_the_keys_and_the_choices():
    err = refused({"base": "smollm2-135m", "num_hidden_layers": 2, "hidden_size": 64})
    assert err.problem == (
        "student.from_config: hidden_size 64 with 9 heads (num_attention_heads, from the base "
        "smollm2-135m): hidden_size is not a multiple of num_attention_heads"
    )
    assert err.fix.startswith(
        "set num_attention_heads to 1, 2, 4 or 8 (head_dim 64, 32, 16 or 8) and "
        "num_key_value_heads dividing it (3, from the base smollm2-135m, does not divide "
        "1, 2, 4 or 8), e.g. num_attention_heads: 8, num_key_value_heads: 2"
    )


def test_the_readme_former_example_is_refused():
    err = refused({"base": "smollm2-135m", "num_hidden_layers": 4, "hidden_size": 256})
    assert "hidden_size 256 with 9 heads" in err.problem
    assert "num_attention_heads to 1, 2, 4, 8, 16 or 32 (head_dim 256, 128, 64, 32, 16 or 8)" in err.fix


def test_the_suggested_choice_builds_and_derived_sizes_follow_hidden_size(caplog):
    with caplog.at_level(logging.WARNING, logger="kvdistill.models.from_config"):
        config, notes = hf_config_from_spec(
            {
                "base": "smollm2-135m",
                "num_hidden_layers": 2,
                "hidden_size": 64,
                "num_attention_heads": 8,
                "num_key_value_heads": 2,
            },
            log_notes=True,
        )
    # head_dim 64 = 576 / 9 in SmolLM2, so it follows: 64 / 8; intermediate 1536 = 8/3 x 576 -> 8/3 x 64 =
    # 170.7 -> 168
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (64, 8, 2)
    assert (config.head_dim, config.intermediate_size) == (8, 168)
    assert [n.split(" (")[0] for n in notes] == ["head_dim 64 -> 8", "intermediate_size 1536 -> 168"]
    assert sum("intermediate_size 1536 -> 168" in r.getMessage() for r in caplog.records) == 1


def test_sizes_the_user_sets_are_kept_and_nothing_is_noted():
    config, notes = hf_config_from_spec(
        {
            "base": "smollm2-135m",
            "num_hidden_layers": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 32,
        }
    )
    assert (config.head_dim, config.intermediate_size, config.num_hidden_layers) == (32, 128, 2)
    assert notes == []


def test_an_independent_head_dim_is_kept_and_layer_types_follow_the_layer_count():
    # Gemma-3-270M: 4 heads x head_dim 256 != hidden 640, so head_dim is the family's own choice
    config, notes = hf_config_from_spec({"base": "gemma3-270m", "num_hidden_layers": 2, "hidden_size": 64})
    assert config.head_dim == 256 and config.intermediate_size == 208  # 2048 / 640 x 64 = 204.8 -> 208
    assert len(config.layer_types) == 2
    assert [n.split(" (")[0] for n in notes] == ["intermediate_size 2048 -> 208"]


def test_kv_heads_must_divide_the_heads():
    err = refused({"base": "smollm2-135m", "hidden_size": 256, "num_attention_heads": 8})
    assert err.problem == (
        "student.from_config: num_key_value_heads 3 (from the base smollm2-135m) does not divide "
        "num_attention_heads 8 (each KV head serves a whole group of query heads)"
    )
    assert err.fix == "set num_key_value_heads to 1, 2, 4 or 8"


def test_an_odd_rotary_head_dim_and_aliased_fields_are_refused():
    assert (
        "head_dim 33 is odd"
        in refused({"base": "smollm2-135m", "head_dim": 33}, key="teachers[0].from_config").problem
    )
    err = refused(
        {"family": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 3}
    )  # GPT-2 spells them n_embd, n_head
    assert "hidden_size 64 with 3 heads" in err.problem and "1, 2, 4 or 8" in err.fix


def test_the_family_config_class_check_is_reported_with_the_key():
    # llama requires hidden_size % heads == 0 even with an explicit head_dim
    # (LlamaConfig.validate_architecture)
    err = refused(
        {
            "family": "llama",
            "hidden_size": 100,
            "num_attention_heads": 8,
            "num_key_value_heads": 8,
            "head_dim": 16,
            "intermediate_size": 64,
        }
    )
    assert err.problem.startswith("student.from_config: LlamaConfig refuses these fields: ")
    assert "hidden size (100) is not a multiple of the number of attention heads (8)" in err.problem


def test_the_built_config_saves_and_builds():
    config, _ = hf_config_from_spec(
        {
            "family": "qwen2",
            "num_hidden_layers": 2,
            "hidden_size": 96,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        }
    )
    assert config.intermediate_size == 512  # qwen2's default 22016 / 4096 x 96 = 516 -> 512
    config.validate()  # what save_pretrained runs
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert model.model.layers[0].mlp.up_proj.weight.shape == (512, 96)


def test_the_readme_example_builds():
    import re
    from pathlib import Path

    import yaml

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    (line,) = re.findall(r"# from_config: (\{.*\})", readme)
    config, notes = hf_config_from_spec(yaml.safe_load(line))
    assert (config.hidden_size, config.num_attention_heads, config.head_dim) == (256, 4, 64)
    assert [n.split(" (")[0] for n in notes] == ["intermediate_size 1536 -> 680"]
