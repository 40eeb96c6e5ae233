"""train.early_stopping (best-of-curve on the validation split, early stop after `patience` evaluations), the
validation split in training's held-out figures, and train.grad_norms_every."""

from __future__ import annotations

import json

import pytest

from kvdistill.errors import ConfigError
from kvdistill.train.trainer import Selection, train

DATA = ["data.source=arithmetic", "data.size=60", "data.eval_size=4", "data.val_size=6", "data.max_length=48"]


def rows(path, split):
    return [json.loads(x) for x in path.read_text().splitlines() if json.loads(x).get("split") == split]


def test_selection_keeps_the_best_and_counts_patience():
    sel = Selection(metric="eval/ce", higher=False, min_delta=0.05, patience=2)
    assert sel.update(2, {"eval/ce": 3.0}) and sel.best_step == 2
    assert not sel.update(4, {"eval/ce": 2.97})  # better by less than min_delta
    assert sel.update(6, {"eval/ce": 2.5}) and (sel.best, sel.best_step, sel.bad) == (2.5, 6, 0)
    assert not sel.update(8, {"eval/ce": 2.6}) and not sel.exhausted
    assert not sel.update(10, {"eval/ce": float("nan")}) and sel.exhausted
    em = Selection(metric="eval/exact_match", higher=True, min_delta=0.0, patience=0)
    em.update(1, {"eval/exact_match": 0.2})
    em.update(2, {"eval/exact_match": 0.1})
    assert em.best_step == 1 and not em.exhausted  # patience 0 never stops


def test_early_stopping_stops_and_keeps_the_best_on_the_validation_split(tiny_config, tmp_path):
    # min_delta so large that only the first evaluation is ever a best: stop after `patience` more
    cfg = tiny_config(
        *DATA,
        "train.steps=20",
        "train.eval_every=2",
        "train.early_stopping.patience=2",
        "train.early_stopping.min_delta=100",
        "train.eval_exact_match=true",
        "train.eval_max_new_tokens=4",
    )
    summary = train(cfg, tmp_path, progress=False)
    assert summary["steps"] == 6 and summary["stopped_early"] and summary["best_step"] == 2
    assert json.loads((tmp_path / "best.json").read_text())["step"] == 2
    assert (tmp_path / "best" / "student" / "config.json").is_file()
    assert (tmp_path / "final" / "config.json").is_file()
    evals = rows(tmp_path / "metrics.jsonl", "eval")
    assert [r["step"] for r in evals] == [2, 4, 6]
    assert all(0.0 <= r["eval/exact_match"] <= 1.0 and r["train_s"] <= r["elapsed_s"] for r in evals)
    assert summary["eval/ce"] == evals[-1]["eval/ce"]
    assert summary["train_s"] == pytest.approx(summary["elapsed_s"] - summary["eval_s"])
    # the best student is the one of step 2: its held-out CE is the one logged there
    from kvdistill.data import load_records
    from kvdistill.eval.heldout import perplexity
    from kvdistill.models.load import load_model

    model, tok = load_model(str(tmp_path / "best" / "student"), device="cpu")
    val = load_records(cfg.data, split="val")
    assert perplexity(model, tok, val, max_length=48, batch_size=8)["ce"] == pytest.approx(
        evals[0]["eval/ce"], rel=1e-3
    )


def test_held_out_figures_come_from_the_validation_split(tiny_config, tmp_path):
    from kvdistill.data import load_records
    from kvdistill.eval.heldout import perplexity
    from kvdistill.models.load import load_model

    cfg = tiny_config(*DATA, "train.steps=2", "teachers=[]")
    summary = train(cfg, tmp_path, progress=False)
    model, tok = load_model(str(tmp_path / "final"), device="cpu")
    val = perplexity(model, tok, load_records(cfg.data, split="val"), max_length=48, batch_size=8)["ce"]
    test = perplexity(model, tok, load_records(cfg.data, split="eval"), max_length=48, batch_size=8)["ce"]
    assert summary["eval/ce"] == pytest.approx(val, rel=1e-4) and val != pytest.approx(test, rel=1e-4)


def test_term_grad_norms(tiny_config, tmp_path):
    """CE only: the CE term's gradient norm is the step's whole (pre-clipping) gradient norm; with teachers
    both terms are logged every N steps and differ."""
    ce = tiny_config(*DATA, "train.steps=4", "train.grad_norms_every=2", "teachers=[]", "train.log_every=1")
    train(ce, tmp_path / "ce", progress=False)
    logged = rows(tmp_path / "ce" / "metrics.jsonl", None)
    with_norms = [r for r in logged if "grad_norm/ce" in r]
    assert [r["step"] for r in with_norms] == [2, 4]
    for r in with_norms:
        assert r["grad_norm/ce"] == pytest.approx(r["grad_norm"], rel=1e-4)
        assert "grad_norm/kd" not in r
    kd = tiny_config(*DATA, "train.steps=2", "train.grad_norms_every=1")
    train(kd, tmp_path / "kd", progress=False)
    for r in rows(tmp_path / "kd" / "metrics.jsonl", None):
        assert r["grad_norm/ce"] > 0 and r["grad_norm/kd"] > 0 and r["grad_norm/kd"] != r["grad_norm/ce"]


def test_selection_settings_are_checked(tiny_config):
    with pytest.raises(ConfigError) as info:
        tiny_config("train.early_stopping.metric=exact_match", "train.eval_cot=true")
    text = str(info.value)
    for expected in (
        "train.eval_every is 0",
        "data.val_size is 0",
        "metric exact_match needs train.eval_exact_match",
        "train.eval_cot is how train.eval_exact_match decodes",
    ):
        assert expected in text, expected
