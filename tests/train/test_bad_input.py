"""`kvdistill train` on bad input: a message naming the problem and its fix, exit code 2, and no half-written
run directory; a run that goes non-finite stops and keeps its last good checkpoint."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from kvdistill.data import load_records
from kvdistill.objectives import Objective
from kvdistill.train.trainer import micro_batch


def test_typo_in_an_override_suggests_the_key(tiny_yaml, tmp_path, cli):
    code, err = cli("train", tiny_yaml, "--out", tmp_path / "run", "train.stpes=3")
    assert code == 2
    assert "unknown key 'train.stpes'; did you mean 'train.steps'?" in err
    assert not (tmp_path / "run").exists()


def test_every_config_problem_is_listed_at_once(tiny_yaml, tmp_path, cli):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        tiny_yaml.read_text().replace("tokenizer:", "tokeniser:").replace("max_length:", "max_lenght:")
    )
    code, err = cli("train", bad, "--out", tmp_path / "run")
    assert code == 2
    assert "2 problem(s)" in err
    assert "did you mean 'student.tokenizer'?" in err and "did you mean 'data.max_length'?" in err


def test_missing_teacher_models_are_named(tiny_yaml, tmp_path, cli):
    code, err = cli(
        "train",
        tiny_yaml,
        "--out",
        tmp_path / "run",
        f"teachers.0.model={tmp_path / 'nope'}",
        f"teachers.1.model={tmp_path}",
    )
    assert code == 2
    assert f"teachers[0] (qwen2).model: model path '{tmp_path / 'nope'}' does not exist" in err
    assert f"teachers[1] (gemma3).model: '{tmp_path}' has no config.json" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("name", "content", "source", "message"),
    [
        ("empty.jsonl", "", "jsonl", "holds no records"),
        ("blank.jsonl", '{"text": "a fine text"}\n{"text": "   "}\n', "jsonl", "text is empty"),
        ("blank.txt", "\n   \n\n", "text", "holds no records"),
    ],
)
def test_empty_data_is_refused_before_training(tiny_yaml, tmp_path, cli, name, content, source, message):
    path = tmp_path / name
    path.write_text(content)
    code, err = cli(
        "train",
        tiny_yaml,
        "--out",
        tmp_path / "run",
        f"data.source={source}",
        f"data.path={path}",
        "data.eval_size=0",
    )
    assert code == 2
    assert message in err and "fix:" in err
    assert not (tmp_path / "run").exists()


def test_max_length_beyond_a_models_positions_is_refused(tiny_yaml, tmp_path, cli, teacher_dirs):
    code, err = cli(
        "train", tiny_yaml, "--out", tmp_path / "run", "student.from_config.max_position_embeddings=16"
    )
    assert code == 2
    assert "data.max_length = 32 is longer than the maximum positions of student (16)" in err
    assert "set data.max_length to at most 16" in err
    code, err = cli("train", tiny_yaml, "--out", tmp_path / "run", "data.max_length=300")
    assert code == 2
    assert "teacher 'qwen2' (256), teacher 'gemma3' (256)" in err and "at most 256" in err
    assert not (tmp_path / "run").exists()


def test_texts_longer_than_max_length_are_truncated(tiny_config, tmp_path, files):
    from kvdistill.train.trainer import train

    path = tmp_path / "long.jsonl"
    words = " ".join(f"word{i} plus {i} is {2 * i}." for i in range(400))  # ~5000 tokens in every tokenizer
    path.write_text("".join(json.dumps({"text": f"{i}: {words}"}) + "\n" for i in range(8)))
    train(
        tiny_config("data.source=jsonl", f"data.path={path}", "train.steps=1"),
        tmp_path / "run",
        progress=False,
    )
    (row,) = files.metrics(tmp_path / "run")
    assert row["tokens"] == 4 * 32  # every sample cut to data.max_length student tokens
    assert math.isfinite(row["loss"]) and row["loss/kv/qwen2"] > 0 and row["loss/kv/gemma3"] > 0


def test_out_holding_a_run_needs_resume(tiny_yaml, tmp_path, cli):
    out = tmp_path / "run"
    assert cli("train", tiny_yaml, "--out", out)[0] == 0
    before = {p: p.read_bytes() for p in (out / "metrics.jsonl", out / "final/student/model.safetensors")}
    code, err = cli("train", tiny_yaml, "--out", out)
    assert code == 2
    assert f"--out {out} already holds a run (metrics.jsonl, checkpoints, final)" in err
    assert "pass --resume to continue it, or choose another --out" in err
    assert all(p.read_bytes() == data for p, data in before.items())
    code, err = cli("train", tiny_yaml, "--out", tmp_path / "empty", "--resume")
    assert code == 2 and "--resume: no complete checkpoint" in err


# ------------------------------------------------------------------------------------------ non-finite runs
def _assert_last_good(out, step: int) -> None:
    """Only checkpoints up to `step`, the last one complete and loadable with finite weights; no final/."""
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names[-1] == f"step-{step}" and not any(n.endswith(".tmp") for n in names)
    model = AutoModelForCausalLM.from_pretrained(out / f"checkpoints/step-{step}/student")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not (out / "final").exists() and not (out / "summary.json").exists()
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, step + 1))


def test_nan_loss_stops_naming_step_and_samples(tiny_yaml, tiny_config, tmp_path, cli, monkeypatch):
    """A NaN term at step 3: the run stops before any update, names the samples, keeps step-2; --resume works."""
    forward = Objective.forward
    calls = []

    def poisoned(self, records):
        loss, metrics = forward(self, records)
        calls.append(1)
        if len(calls) == 3:
            metrics["loss/kv/gemma3"] = math.nan
            return loss * math.nan, metrics
        return loss, metrics

    monkeypatch.setattr(Objective, "forward", poisoned)
    out = tmp_path / "run"
    args = ["train.steps=4", "train.save_every=2"]
    code, err = cli("train", tiny_yaml, "--out", out, *args)
    assert code == 2
    cfg = tiny_config(*args)
    ids = [r["id"] for r in micro_batch(load_records(cfg.data), cfg, step=2, micro=0, rank=0, world=1)]
    assert (
        f"loss is nan at step 3, micro-batch 0 (samples {ids}); non-finite terms: ['loss/kv/gemma3']" in err
    )
    assert f"last good checkpoint: {out / 'checkpoints' / 'step-2'}" in err
    _assert_last_good(out, 2)
    monkeypatch.setattr(Objective, "forward", forward)
    code, err = cli("train", tiny_yaml, "--out", out, "--resume", *args)
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


class InfGrad(torch.autograd.Function):
    """Identity forward, infinite gradient backward: a finite loss whose update would be non-finite."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


def test_non_finite_gradient_stops_before_the_update(tiny_yaml, tmp_path, cli, monkeypatch):
    forward = Objective.forward
    calls = []

    def poisoned(self, records):
        loss, metrics = forward(self, records)
        calls.append(1)
        return (InfGrad.apply(loss) if len(calls) == 2 else loss), metrics

    monkeypatch.setattr(Objective, "forward", poisoned)
    out = tmp_path / "run"
    code, err = cli("train", tiny_yaml, "--out", out, "train.steps=3", "train.save_every=1")
    assert code == 2
    assert re.search(r"gradient norm is (inf|nan) at step 2 \(loss \d+\.\d+; samples of this process \[", err)
    _assert_last_good(out, 1)


def test_huge_lr_blows_up_and_stops(tiny_yaml, tmp_path, cli):
    out = tmp_path / "run"
    code, err = cli("train", tiny_yaml, "--out", out, "train.lr=1e4", "train.steps=4", "train.save_every=1")
    assert code == 2
    found = re.search(r"loss is (nan|inf) at step (\d+), micro-batch 0 \(samples \[", err)
    assert found, err
    step = int(found.group(2))
    assert step >= 2 and "Lower train.lr" in err
    _assert_last_good(out, step - 1)
