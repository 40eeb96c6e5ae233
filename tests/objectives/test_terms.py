"""Logit KD between a student and a teacher of one tokenizer whose embeddings are padded to different sizes: the
term compares the shared entries (and equals `losses.logit_kd` on them); another tokenizer is refused."""

from __future__ import annotations

import pytest
import torch

from kvdistill import losses
from kvdistill.config import load_config
from kvdistill.config.schema import StudentConfig
from kvdistill.data import load_records
from kvdistill.errors import KvdistillError
from kvdistill.objectives import build_objective
from kvdistill.student import build_student, save_student

TINY = {"base": "smollm2-135m", "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "max_position_embeddings": 128}


def _raw(teacher_dir, tokenizer="gpt2-tokenizer") -> dict:
    return {"student": {"from_config": TINY, "tokenizer": tokenizer},
            "teachers": [{"name": "padded", "model": str(teacher_dir)}],
            "data": {"source": "arithmetic", "size": 16, "eval_size": 0, "max_length": 48},
            "losses": {"kv": {"weight": 0.0}, "logit_kd": {"weight": 1.0, "temperature": 2.0}},
            "train": {"steps": 1, "batch_size": 4, "tensorboard": False}}


@pytest.fixture(scope="module")
def padded_teacher(tmp_path_factory):
    """A tiny llama with the GPT-2 tokenizer whose embedding has 64 rows more than the tokenizer (padded)."""
    model, tok = build_student(StudentConfig(from_config=TINY, tokenizer="gpt2-tokenizer"), seed=3)
    model.resize_token_embeddings(len(tok) + 64)
    path = tmp_path_factory.mktemp("padded")
    save_student(model, tok, str(path))
    return path


def test_logit_kd_compares_the_shared_entries_of_padded_vocabularies(padded_teacher):
    objective = build_objective(load_config(raw=_raw(padded_teacher)))
    records = load_records(objective.cfg.data)[:4]
    loss, metrics = objective(records)
    step = objective.step(records)
    s, t = step.student.logits, step.records[0].capture.logits
    assert t.shape[-1] == s.shape[-1] + 64
    V = s.shape[-1]
    ref = losses.logit_kd(s, t[..., :V], step.batch.mask, temperature=2.0)
    assert metrics["loss/logit_kd/padded"] == pytest.approx(float(ref.mean()), rel=1e-5)
    assert torch.isfinite(loss)


def test_logit_kd_across_tokenizers_is_refused(padded_teacher):
    with pytest.raises(KvdistillError, match="share a tokenizer"):
        build_objective(load_config(raw=_raw(padded_teacher, tokenizer="llama2-tokenizer")))
