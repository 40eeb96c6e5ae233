"""`kvdistill experiment --smoke`: the spec's own runs shrunk to 2 steps (every other setting of a run kept),
and a smoke directory that the real experiment cannot resume from."""

from __future__ import annotations

import json

import pytest

from kvdistill.errors import KvdistillError
from kvdistill.experiments.conditions import condition_config, teacher_config
from kvdistill.experiments.runner import run_experiment
from kvdistill.experiments.smoke import smoke_spec
from kvdistill.experiments.spec import load_spec

from .test_runner import micro_spec


def _unknown(spec) -> dict:
    return {t.name: {"model": "?", "params": 0} for t in spec.teachers}


@pytest.mark.parametrize("name", ["specialists", "kava", "distill-small"])
def test_every_packaged_run_keeps_its_settings_but_trains_two_steps(name):
    """Each condition of the packaged GPU specs: its smoke config equals its real config in every field but
    the shrunk ones (so the smoke run exercises the same models, data, losses, fusion and latents)."""
    real = load_spec(name)
    smoke = smoke_spec(real)
    assert smoke.name == f"{name}-smoke" and smoke.concurrent == 1 and smoke.seeds == real.seeds
    shrunk = {"steps", "batch_size", "grad_accum", "warmup_steps", "eval_every", "eval_max_new_tokens"}
    shrunk |= {"save_every"}
    for cond in real.conditions:
        got = condition_config(smoke, cond, 0, _unknown(real)).model_dump()
        want = condition_config(real, cond, 0, _unknown(real)).model_dump()
        assert (got["train"]["steps"], got["train"]["batch_size"], got["train"]["eval_every"]) == (2, 2, 1)
        assert got["train"]["save_every"] == 0 and got["train"]["warmup_steps"] == 0
        assert got["data"]["eval_size"] == min(want["data"]["eval_size"], 8)
        assert got["data"]["val_size"] == min(want["data"]["val_size"], 8)
        for section in ("student", "teachers", "losses", "fusion"):
            assert got[section] == want[section], (cond, section)
        assert {k: v for k, v in got["train"].items() if k not in shrunk} == {
            k: v for k, v in want["train"].items() if k not in shrunk
        }, cond
        assert {k: v for k, v in got["data"].items() if k not in ("eval_size", "val_size")} == {
            k: v for k, v in want["data"].items() if k not in ("eval_size", "val_size")
        }, cond
    for real_prep, prep in zip(real.teachers, smoke.teachers, strict=True):
        assert (prep.steps, prep.batch_size, prep.min_exact_match) == (min(real_prep.steps, 2), 2, 0.0)
        got, want = teacher_config(smoke, prep).model_dump(), teacher_config(real, real_prep).model_dump()
        assert got["student"] == want["student"] and got["data"]["size"] == want["data"]["size"]
        assert got["data"].get("train_skills") == want["data"].get("train_skills")
    assert smoke.eval.batch_size <= 8 and smoke.eval.max_new_tokens <= 4
    # on a machine without a GPU: mixed precision off, for the students and the teachers alike
    cpu = smoke_spec(real, cpu=True)
    for cond in real.conditions:
        assert condition_config(cpu, cond, 0, _unknown(real)).train.mixed_precision == "no"
    for prep in cpu.teachers:
        assert teacher_config(cpu, prep).train.mixed_precision == "no"


def test_a_smoke_run_trains_every_condition_two_steps_in_a_directory_the_real_one_refuses(tmp_path):
    spec = load_spec(micro_spec(conditions={"ce_only": {}, "kd": {"teachers": ["llama_bpe", "qwen_sp"]}}))
    out = tmp_path / "smoke"
    results = run_experiment(spec, out, seeds=1, smoke=True)
    assert results["spec"] == "micro-smoke" and set(results["conditions"]) == {"ce_only", "kd"}
    for cond in ("ce_only", "kd"):
        ev = json.loads((out / "runs" / cond / "seed-0" / "eval.json").read_text())
        assert ev["steps_trained"] == 2 and len(ev["per_item"]) == 8
    assert json.loads((out / ".kvdistill-run").read_text())["kind"] == "smoke experiment"
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(KvdistillError, match="smoke experiment directory, not an experiment"):
        run_experiment(spec, out, seeds=1)  # would reuse the 2-step teachers
    with pytest.raises(KvdistillError, match="--smoke with --plan"):
        run_experiment(spec, tmp_path / "other", smoke=True, plan=True)
    with pytest.raises(KvdistillError, match="--smoke with --report"):
        run_experiment(spec, out, smoke=True, report=True)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert not (tmp_path / "other").exists()
    # a real experiment's directory refuses a smoke run the same way
    real = tmp_path / "real"
    real.mkdir()
    (real / ".kvdistill-run").write_text(json.dumps({"kind": "experiment", "tool": "kvdistill"}) + "\n")
    with pytest.raises(KvdistillError, match="experiment directory, not a smoke experiment"):
        run_experiment(spec, real, seeds=1, smoke=True)
