"""Logit KD between a student and a teacher of one tokenizer whose embeddings are padded to different sizes:
the term compares the shared entries (and equals `losses.logit_kd` on them, or `topk_logit_kd` with top_k);
with another tokenizer the objective's term is `losses.cross_logit_kd` / `span_logit_kd` on the byte alignment
of the batch."""

from __future__ import annotations

import pytest
import torch

from kvdistill import losses
from kvdistill.align.tokens import common_chunks, prefix_positions
from kvdistill.align.vocab import shared_vocabulary
from kvdistill.config import load_config
from kvdistill.config.schema import StudentConfig
from kvdistill.data import load_records
from kvdistill.objectives import build_objective
from kvdistill.student import build_student, save_student

TINY = {
    "base": "smollm2-135m",
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "max_position_embeddings": 128,
}


def _raw(teacher_dir, tokenizer="gpt2-tokenizer", **logit_kd) -> dict:
    return {
        "student": {"from_config": TINY, "tokenizer": tokenizer},
        "teachers": [{"name": "padded", "model": str(teacher_dir)}],
        "data": {"source": "arithmetic", "size": 16, "eval_size": 0, "max_length": 48},
        "losses": {"kv": {"weight": 0.0}, "logit_kd": {"weight": 1.0, "temperature": 2.0, **logit_kd}},
        "train": {"steps": 1, "batch_size": 4, "tensorboard": False},
    }


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


def test_logit_kd_top_k_is_topk_logit_kd_on_the_shared_entries(padded_teacher):
    objective = build_objective(load_config(raw=_raw(padded_teacher, top_k=16, chunk=8)))
    records = load_records(objective.cfg.data)[:4]
    step = objective.step(records)
    s, t = step.student.logits, step.records[0].capture.logits
    V = s.shape[-1]
    ids, lp = losses.topk_log_probs(t[..., :V], 16, temperature=2.0)
    ref = losses.topk_logit_kd(s, ids, lp, step.batch.mask, temperature=2.0)
    got = objective.terms.logit_term(step, 0)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["project", "span"])
def test_logit_kd_across_tokenizers_is_the_cross_tokenizer_loss(padded_teacher, method):
    """A llama2-tokenizer student and a GPT-2-tokenizer teacher: the objective's term is the loss library's
    function on the batch's own alignment; training reaches a finite loss and a gradient into the student."""
    objective = build_objective(
        load_config(
            raw=_raw(padded_teacher, tokenizer="llama2-tokenizer", cross_tokenizer=method, divergence="jsd")
        )
    )
    records = load_records(objective.cfg.data)[:4]
    step = objective.step(records)
    s, b, cap = step.student.logits, step.batch, step.records[0].capture
    if method == "project":
        proj = shared_vocabulary(
            objective.tokenizer, objective.teachers[0].tokenizer, s.shape[-1], cap.logits.shape[-1]
        )
        pos = prefix_positions(b.spans_cpu, b.mask_cpu, cap.spans_cpu, cap.attention_mask_cpu)
        assert (pos >= 0).sum() > 0.5 * b.mask.sum()
        ref = losses.cross_logit_kd(
            s,
            cap.logits,
            pos,
            b.mask,
            proj.student,
            proj.teacher,
            shared=proj.shared,
            temperature=2.0,
            divergence="jsd",
        )
    else:
        s_chunks, t_chunks = common_chunks(b.spans_cpu, b.mask_cpu, cap.spans_cpu, cap.attention_mask_cpu)
        ref = losses.span_logit_kd(
            s,
            cap.logits,
            b.ids,
            cap.input_ids,
            b.mask,
            cap.attention_mask,
            s_chunks,
            t_chunks,
            temperature=2.0,
            divergence="jsd",
        )
    got = objective.terms.logit_term(step, 0)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert (got > 0).all()
    loss, metrics = objective(records)
    loss.backward()
    assert torch.isfinite(loss) and metrics["loss/logit_kd/padded"] > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in objective.student.parameters())


def test_logit_kd_with_an_encoder_teacher_is_refused():
    from kvdistill.config import check_config

    raw = {
        "student": {"model": "smollm2-135m"},
        "teachers": [{"model": "minilm-l6"}],
        "losses": {"logit_kd": {"weight": 1.0}},
    }
    _, problems = check_config(raw)
    assert any("teachers[0] (minilm-l6) is an encoder" in p for p in problems), problems
