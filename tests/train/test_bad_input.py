"""`kvdistill train` on bad input: a message naming the problem and its fix, exit code 2, and no half-written
run directory; learning rates AdamW cannot use are refused; a run that goes non-finite stops, sets aside the
checkpoint whose weights gave the non-finite value, and its advice (resume with a lower train.lr) works."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from kvdistill.data import load_records
from kvdistill.errors import ConfigError
from kvdistill.objectives import TextObjective
from kvdistill.train.loader import micro_batch
from kvdistill.train.trainer import train


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
        "~data.size",
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
    path = tmp_path / "long.jsonl"
    words = " ".join(f"word{i} plus {i} is {2 * i}." for i in range(400))  # ~5000 tokens in every tokenizer
    path.write_text("".join(json.dumps({"text": f"{i}: {words}"}) + "\n" for i in range(8)))
    train(
        tiny_config("data.source=jsonl", "~data.size", f"data.path={path}", "train.steps=1"),
        tmp_path / "run",
        progress=False,
    )
    (row,) = files.metrics(tmp_path / "run")
    assert row["tokens"] == 4 * 32  # every sample cut to data.max_length student tokens
    assert math.isfinite(row["loss"]) and row["loss/kv/qwen2"] > 0 and row["loss/kv/gemma3"] > 0


def test_out_holding_a_run_needs_resume(tiny_yaml, tmp_path, cli):
    out = tmp_path / "run"
    assert cli("train", tiny_yaml, "--out", out)[0] == 0
    before = {p: p.read_bytes() for p in (out / "metrics.jsonl", out / "final/model.safetensors")}
    code, err = cli("train", tiny_yaml, "--out", out)
    assert code == 2
    assert f"--out {out} already holds a run (metrics.jsonl, checkpoints, final)" in err
    assert "pass --resume to continue it, or choose another --out" in err
    assert all(p.read_bytes() == data for p, data in before.items())
    code, err = cli("train", tiny_yaml, "--out", tmp_path / "empty", "--resume")
    assert code == 2
    assert (
        f"--resume: {tmp_path / 'empty'} holds no run to resume (no config.yaml, no complete checkpoint)"
        in err
    )
    assert "start without --resume" in err and not (tmp_path / "empty").exists()


# ------------------------------------------------------------------------------------------ learning rates
@pytest.mark.parametrize("value", ["1e39", "11", "inf", "0"])
def test_a_learning_rate_adamw_cannot_use_is_refused_when_loaded(tiny_yaml, tmp_path, cli, value):
    """1e39 used to overflow inside AdamW's update with a traceback, after the run directory was written."""
    code, err = cli("train", tiny_yaml, "--out", tmp_path / "run", f"train.lr={value}")
    assert code == 2
    bound = {"0": "greater than 0", "inf": "a finite number"}.get(value, "less than or equal to 10")
    assert "'train.lr' = " in err and bound in err
    assert not (tmp_path / "run").exists()


def test_the_trainer_refuses_a_learning_rate_that_skipped_the_schema(tiny_config, tmp_path):
    """A config built in code (model_copy skips validation) is checked again before anything is written."""
    cfg = tiny_config()
    cfg = cfg.model_copy(
        update={"train": cfg.train.model_copy(update={"lr": 1e39, "projector_lr": math.nan})}
    )
    with pytest.raises(ConfigError) as info:
        train(cfg, tmp_path / "run", progress=False)
    assert info.value.problems == [
        "train.lr = 1e+39: not a learning rate AdamW can use (it moves every weight by about lr per step); "
        "give a finite value above 0 and at most 10, e.g. 3e-4",
        "train.projector_lr = nan: not a learning rate AdamW can use (it moves every weight by about lr per "
        "step); give a finite value above 0 and at most 10, e.g. 3e-4",
    ]
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------ non-finite runs
def _assert_stopped(out, kept: list[int], aside: int | None, logged: int) -> None:
    """Complete checkpoints `kept` (loadable, finite), step-`aside`.diverged set aside (or none), no .tmp, no
    final/ or summary.json, metrics rows 1..logged."""
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == sorted([f"step-{k}" for k in kept] + ([f"step-{aside}.diverged"] if aside else [])), names
    for k in kept:
        model = AutoModelForCausalLM.from_pretrained(out / f"checkpoints/step-{k}/student")
        assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not (out / "final").exists() and not (out / "summary.json").exists()
    rows = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(1, logged + 1))


def test_nan_loss_stops_naming_step_and_samples(tiny_yaml, tiny_config, tmp_path, cli, monkeypatch):
    """A NaN term at step 3: the run stops before any update and names the samples; step-2's weights gave the
    NaN, so that checkpoint is set aside and, none being older, --resume trains the run again from step 0."""
    forward = TextObjective.forward
    calls = []

    def poisoned(self, records):
        loss, metrics = forward(self, records)
        calls.append(1)
        if len(calls) == 3:
            metrics["loss/kv/gemma3"] = math.nan
            return loss * math.nan, metrics
        return loss, metrics

    monkeypatch.setattr(TextObjective, "forward", poisoned)
    out = tmp_path / "run"
    args = ["train.steps=4", "train.save_every=2"]
    code, err = cli("train", tiny_yaml, "--out", out, *args)
    assert code == 2
    cfg = tiny_config(*args)
    ids = [r["id"] for r in micro_batch(load_records(cfg.data), cfg, step=2, micro=0, rank=0, world=1)]
    assert (
        f"loss is nan at step 3, micro-batch 0 (samples {ids}); non-finite terms: ['loss/kv/gemma3']" in err
    )
    assert (
        "the weights saved at step 2 gave this and would again at any lr, so that checkpoint was set aside "
        "as "
        f"{out / 'checkpoints' / 'step-2.diverged'}; no checkpoint was saved before the divergence: rerun "
        "the "
        "same command with --resume train.lr=0.0001 (now 0.001) or lower to train the run again from step 0"
    ) in err
    _assert_stopped(out, kept=[], aside=2, logged=2)
    monkeypatch.setattr(TextObjective, "forward", forward)
    code, err = cli("train", tiny_yaml, "--out", out, "--resume", *args)
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-2.diverged", "step-4"]


class InfGrad(torch.autograd.Function):
    """Identity forward, infinite gradient backward: a finite loss whose update would be non-finite."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


def test_non_finite_gradient_stops_before_the_update(tiny_yaml, tmp_path, cli, monkeypatch):
    forward = TextObjective.forward
    calls = []

    def poisoned(self, records):
        loss, metrics = forward(self, records)
        calls.append(1)
        return (InfGrad.apply(loss) if len(calls) == 3 else loss), metrics

    monkeypatch.setattr(TextObjective, "forward", poisoned)
    out = tmp_path / "run"
    code, err = cli("train", tiny_yaml, "--out", out, "train.steps=4", "train.save_every=1")
    assert code == 2
    assert re.search(r"gradient norm is (inf|nan) at step 3 \(loss \d+\.\d+; samples of this process \[", err)
    assert f"set aside as {out / 'checkpoints' / 'step-2.diverged'}" in err
    assert f"the last checkpoint saved before the divergence is {out / 'checkpoints' / 'step-1'}" in err
    _assert_stopped(out, kept=[1], aside=2, logged=2)


def test_the_advice_after_a_divergence_works(tiny_yaml, tmp_path, cli, monkeypatch, files):
    """A stand-in for a learning rate too high: the loss is NaN once any student weight has moved more than
    1.5e-2 from its initial value (AdamW moves a weight by at most about lr per step). At lr 1e-2 the weights
    of step 2 are past it (the NaN comes at step 3); at the advised lr 1e-3, from step 1 on, they never are.
    Before, the advice repeated the failure: --resume took step-2 (past the limit at any lr) and kept the old
    lr."""
    forward = TextObjective.forward
    initial: dict[str, torch.Tensor] = {}

    def moved_too_far(self, records):
        loss, metrics = forward(self, records)
        weights = {n: p.detach() for n, p in self.named_parameters() if n.startswith("student.")}
        if not initial:  # the first call of the first run: the initial weights
            initial.update({n: w.clone() for n, w in weights.items()})
        if max(float((w - initial[n]).abs().max()) for n, w in weights.items()) > 1.5e-2:
            return loss * math.nan, metrics
        return loss, metrics

    monkeypatch.setattr(TextObjective, "forward", moved_too_far)
    out = tmp_path / "run"
    args = ["train.lr=1e-2", "train.steps=4", "train.save_every=1"]
    code, err = cli("train", tiny_yaml, "--out", out, *args)
    assert code == 2
    assert re.search(r"loss is nan at step 3, micro-batch 0 \(samples \[", err), err
    step1 = out / "checkpoints" / "step-1"
    assert f"set aside as {out / 'checkpoints' / 'step-2.diverged'}" in err
    assert (
        f"the last checkpoint saved before the divergence is {step1}: to continue from it with a lower "
        "learning rate, rerun the same command with --resume train.lr=0.001 (now 0.01) or lower"
    ) in err
    _assert_stopped(out, kept=[1], aside=2, logged=2)
    code, err = cli("train", tiny_yaml, "--out", out, "--resume", *args, "train.lr=0.001")
    assert code == 0, err
    rows = files.metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["lr"] == 1e-2 and rows[1]["lr"] == pytest.approx(1e-3 * (1 + math.cos(math.pi / 4)) / 2)
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
