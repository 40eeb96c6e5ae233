"""The student: built from a base config with overrides and a chosen tokenizer, or loaded; LoRA; saving."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from kvdistill.config import StudentConfig
from kvdistill.errors import KvdistillError
from kvdistill.models.hf_forward import is_checkpointing
from kvdistill.student import build_student, save_student, unwrap_student


def student_config(**changes) -> StudentConfig:
    base = {
        "from_config": {
            "base": "smollm2-135m",
            "num_hidden_layers": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 32,
        },
        "tokenizer": "gpt2-tokenizer",
    }
    return StudentConfig.model_validate({**base, **changes})


def test_from_config_applies_overrides_and_sizes_the_vocabulary_to_the_tokenizer():
    model, tok = build_student(student_config())
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads) == (
        "llama",
        2,
        64,
        1,
    )
    assert cfg.vocab_size == len(tok) == 50257  # GPT-2 tokenizer, not SmolLM2's 49152
    assert cfg.eos_token_id == cfg.pad_token_id == tok.eos_token_id == 50256
    assert model.get_input_embeddings().weight.shape == (50257, 64)
    assert model.training and model.dtype == torch.float32


def test_from_config_is_seeded():
    a, _ = build_student(student_config(), seed=0)
    b, _ = build_student(student_config(), seed=0)
    c, _ = build_student(student_config(), seed=1)
    wa, wb, wc = (m.model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_unknown_from_config_field_is_named():
    with pytest.raises(KvdistillError) as err:
        build_student(student_config(from_config={"base": "smollm2-135m", "num_layers": 2, "hiden_size": 64}))
    assert "['num_layers', 'hiden_size'] are not fields of LlamaConfig" in str(err.value)


def test_dtype_and_gradient_checkpointing():
    model, _ = build_student(student_config(dtype="bfloat16", gradient_checkpointing=True))
    assert model.dtype == torch.bfloat16
    assert is_checkpointing(model)
    plain, _ = build_student(student_config())
    assert not is_checkpointing(plain)


def test_lora_trains_only_adapters_and_saves_merged_plus_adapter(tmp_path):
    model, tok = build_student(student_config(lora={"r": 2, "alpha": 8}), seed=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    base = unwrap_student(model)
    assert type(base).__name__ == "LlamaForCausalLM"
    q = base.model.layers[1].self_attn.q_proj  # a peft LoRA layer around the original Linear
    with torch.no_grad():
        q.lora_B["default"].weight.normal_()  # B starts at 0; make the adapter do something
    expected = (
        q.base_layer.weight + (8 / 2) * q.lora_B["default"].weight @ q.lora_A["default"].weight
    )  # W + s·BA
    save_student(model, tok, str(tmp_path / "student"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert torch.allclose(merged.model.layers[1].self_attn.q_proj.weight, expected, atol=1e-6)
    assert (tmp_path / "student/adapter/adapter_model.safetensors").is_file()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    # saving merged a copy: the trained model still has its adapters
    assert hasattr(model, "merge_and_unload") and "lora_A" in dict(q.named_children())


def test_pretrained_student_directory(tmp_path):
    model, tok = build_student(student_config())
    save_student(model, tok, str(tmp_path / "s"))
    again, tok2 = build_student(StudentConfig(model=str(tmp_path / "s")))
    assert len(tok2) == len(tok)
    state = again.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert again.training


def test_lora_adapter_holds_only_adapter_weights(tmp_path):
    from safetensors.torch import load_file

    model, tok = build_student(student_config(lora={"r": 2}))
    save_student(model, tok, str(tmp_path / "student"))
    adapter = load_file(str(tmp_path / "student/adapter/adapter_model.safetensors"))
    assert adapter and all("lora_A" in k or "lora_B" in k for k in adapter)
    # 2 layers × 7 linear modules (q, k, v, o, gate, up, down) × (A, B)
    assert len(adapter) == 2 * 7 * 2


def test_a_family_student_saved_with_another_familys_tokenizer_reloads_the_same_ids(tmp_path):
    """A qwen2 student with the Llama-2 tokenizer: AutoTokenizer would reload a Qwen2Tokenizer (config.json's
    model_type) with its own pre-tokenizer; load_tokenizer follows tokenizer_config.json and gets the same
    ids."""
    from kvdistill.config.schema import StudentConfig
    from kvdistill.models.load import load_model, load_tokenizer

    cfg = StudentConfig(
        from_config={
            "family": "qwen2",
            "num_hidden_layers": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 64,
            "tie_word_embeddings": True,
        },
        tokenizer="llama2-tokenizer",
    )
    model, tok = build_student(cfg)
    save_student(model, tok, str(tmp_path))
    text = "Question: Compute 5 * (20 + 17) - 11.\nReasoning: 20 + 17 = 37."
    reloaded, tok2 = load_model(str(tmp_path))
    assert tok2(text).input_ids == tok(text).input_ids == load_tokenizer("llama2-tokenizer")(text).input_ids
    ids = torch.tensor([tok(text).input_ids])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model.eval()(ids).logits)
