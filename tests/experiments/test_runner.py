"""The experiment runner end to end on a micro spec (two tiny teachers, CE only vs KV distillation, two
seeds): results.json holds what the interface promises, a resumed experiment trains nothing again and gives
the same results, and --only runs the baseline too. The packaged `tiny` spec runs end to end (slow marker, CI
runs it)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch

from kvdistill.errors import ConfigError, KvdistillError
from kvdistill.experiments.memory import GIB
from kvdistill.experiments.runner import run_experiment
from kvdistill.experiments.spec import load_spec

TINY_MODEL = {
    "num_hidden_layers": 1,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 96,
}


def micro_spec(**changes) -> dict:
    spec = {
        "name": "micro",
        "base": {
            "student": {
                "from_config": {"base": "smollm2-135m", **TINY_MODEL, "head_dim": 16},
                "tokenizer": "gpt2-tokenizer",
            },
            "data": {"source": "arithmetic", "size": 80, "eval_size": 8, "max_length": 64},
            "train": {"steps": 4, "batch_size": 4, "lr": 1e-3, "eval_every": 2, "tensorboard": False},
        },
        "teachers": [
            {
                "name": "llama_bpe",
                "from_config": {"base": "smollm2-135m", **TINY_MODEL, "head_dim": 16},
                "steps": 3,
                "batch_size": 4,
            },
            {
                "name": "qwen_sp",
                "from_config": {"family": "qwen2", **TINY_MODEL},
                "tokenizer": "llama2-tokenizer",
                "steps": 3,
                "batch_size": 4,
            },
        ],
        "conditions": {
            "ce_only": {},
            "kd": {"teachers": ["llama_bpe", "qwen_sp"]},
            "kd_cached": {"teachers": ["llama_bpe", "qwen_sp"], "cache": True},
            "ce_flops": {"match_flops_of": "kd"},
        },
        "baseline": "ce_only",
        "seeds": [0, 1],
        "eval": {"max_new_tokens": 4, "batch_size": 8},
    }
    spec.update(changes)
    return spec


def test_micro_experiment_results_resume_and_only(tmp_path):
    spec = load_spec(micro_spec())
    results = run_experiment(spec, tmp_path)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert set(results["conditions"]) == {"ce_only", "kd", "kd_cached", "ce_flops"}
    for per in results["conditions"].values():
        for metric in ("exact_match", "ppl"):
            s = per[metric]
            assert len(s["values"]) == 2 and s["ci95"][0] <= s["mean"] <= s["ci95"][1]
    assert {(c["condition"], c["metric"]) for c in results["comparisons"]} == {
        (n, m) for n in ("kd", "kd_cached", "ce_flops") for m in ("exact_match", "ppl")
    }
    # the cached condition read its teachers from caches extracted once (cost reported), not online
    assert (
        set(results["extraction"]) == {"llama_bpe", "qwen_sp"}
        and results["extraction"]["qwen_sp"]["tokens"] > 0
    )
    run_cfg = (tmp_path / "runs" / "kd_cached" / "seed-0" / "config.yaml").read_text()
    assert "source: cache" in run_cfg and str(tmp_path / "caches" / "qwen_sp") in run_cfg
    assert set(results["teachers"]) == {"llama_bpe", "qwen_sp"}
    assert 0.0 <= results["teachers"]["llama_bpe"]["exact_match"] <= 1.0
    # CE only with the FLOPs of kd: 4 · (6 N_s + 2 Σ N_t) / 6 N_s steps, more than kd's 4
    assert results["steps"]["kd"] == 4 and results["steps"]["ce_flops"] > 4
    # different seeds: different students (init and data order)
    assert (
        results["conditions"]["ce_only"]["ppl"]["values"][0]
        != results["conditions"]["ce_only"]["ppl"]["values"][1]
    )
    assert (tmp_path / "results.md").read_text().count("| kd |") >= 2
    assert (tmp_path / "plots" / "exact_match.png").is_file() and (
        tmp_path / "plots" / "curve_ce_step.png"
    ).is_file()
    # resume: nothing is trained again, the same results
    stamp = {p: p.stat().st_mtime_ns for p in tmp_path.glob("runs/*/seed-*/final/*.safetensors")}
    again = run_experiment(spec, tmp_path)
    assert again == results
    assert stamp == {p: p.stat().st_mtime_ns for p in tmp_path.glob("runs/*/seed-*/final/*.safetensors")}
    # a half-finished experiment (one run's evaluation and student gone) runs only that pair
    victim = tmp_path / "runs" / "kd" / "seed-1"
    (victim / "eval.json").unlink()
    for f in (victim / "final").rglob("*"):
        if f.is_file():
            f.unlink()
    redone = run_experiment(spec, tmp_path)  # the same figures; its measured times are new
    for key in ("conditions", "comparisons", "steps", "extraction", "teachers"):
        assert redone[key] == results[key], key
    assert [r["step"] for r in redone["curves"]["kd"]["per_seed"]["1"]] == [
        r["step"] for r in results["curves"]["kd"]["per_seed"]["1"]
    ]
    # --only narrows to a condition and the baseline; --seeds to the first seeds
    narrow = run_experiment(spec, tmp_path, only=["kd"], seeds=1)
    assert set(narrow["conditions"]) == {"ce_only", "kd"} and narrow["seeds"] == [0]


def test_spec_errors_are_listed_together():
    bad = micro_spec(baseline="nope", seeds=[], metrics=["bleu"])
    bad["conditions"]["kd"]["teachers"] = ["missing"]
    with pytest.raises(ConfigError) as info:
        load_spec(bad)
    text = str(info.value)
    for expected in (
        "baseline 'nope' is not a condition",
        "['missing'] are not among the teachers",
        "seeds [] must be distinct",
        "metrics ['bleu'] are unknown",
    ):
        assert expected in text, expected
    with pytest.raises(
        ConfigError, match="'memory_ramp_s' = -1.0: Input should be greater than or equal to 0"
    ):
        load_spec(micro_spec(memory_ramp_s=-1.0))


def test_incompetent_teacher_stops_the_experiment(tmp_path):
    spec = micro_spec()
    spec["teachers"][0]["min_exact_match"] = 0.99
    with pytest.raises(
        KvdistillError, match="teacher 'llama_bpe' reached held-out exact match .* < the required 0.99"
    ):
        run_experiment(load_spec(spec), tmp_path)
    assert not (tmp_path / "runs").exists()  # no condition ran on an incompetent teacher


def test_concurrent_runs_in_subprocesses_equal_in_process_training(tiny_config, tmp_path):
    """`concurrent: 2` trains each run as its own `kvdistill train` process; the students equal the ones the
    same configs give when trained in this process, one after the other."""
    from safetensors.torch import load_file

    from kvdistill.experiments.runner import train_all

    configs = [tiny_config("train.steps=2", f"train.seed={s}") for s in (0, 1)]
    train_all(
        [(tmp_path / "sub" / f"seed-{s}", c) for s, c in zip((0, 1), configs, strict=True)], concurrent=2
    )
    train_all(
        [(tmp_path / "inproc" / f"seed-{s}", c) for s, c in zip((0, 1), configs, strict=True)], concurrent=1
    )
    for s in (0, 1):
        a = load_file(str(tmp_path / "sub" / f"seed-{s}" / "final" / "model.safetensors"))
        b = load_file(str(tmp_path / "inproc" / f"seed-{s}" / "final" / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "sub" / "seed-0.log").is_file()


@pytest.mark.slow
def test_packaged_tiny_spec_end_to_end(tmp_path):
    """`kvdistill experiment tiny` as a user runs it: two conditions x two seeds, results.json with the
    promised structure (CI runs this; a few minutes on 2 cores)."""
    from typer.testing import CliRunner

    from kvdistill.cli import app

    result = CliRunner().invoke(app, ["experiment", "tiny", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["conditions"]) == {"ce_only", "kd_both"} and results["seeds"] == [0, 1]
    for metric in ("exact_match", "ppl"):
        assert set(results["conditions"]["kd_both"][metric]) == {"values", "mean", "std", "ci95"}
    (cmp,) = [c for c in results["comparisons"] if c["metric"] == "ppl"]
    assert cmp["condition"] == "kd_both" and cmp["baseline"] == "ce_only" and 0 < cmp["p"] <= 1
    assert set(results["teachers"]) == {"llama_bpe", "qwen_sp"}
    assert "| kd_both |" in result.output


@pytest.mark.parametrize("name", ["../escaped", "/tmp/abs", "..", "a/b", "c" * 101])
def test_a_condition_or_teacher_name_that_is_not_one_path_segment_is_refused(tmp_path, name, tree):
    """Condition names became DIR/runs/<name>: `../` or absolute names wrote whole runs outside --out."""
    before = tree.snap(tmp_path)
    spec = micro_spec()
    spec["conditions"] = {"ce_only": {}, name: {"teachers": ["llama_bpe"]}}
    with pytest.raises(ConfigError) as err:
        load_spec(spec)
    assert any(
        f"conditions.{name}" in p
        and ("one path segment" in p or "at most 100" in p or "directory itself" in p)
        for p in err.value.problems
    ), err.value.problems
    spec = micro_spec(name=name)
    with pytest.raises(ConfigError, match="name"):
        load_spec(spec)
    assert tree.snap(tmp_path) == before


def test_an_experiment_writes_nothing_before_its_arguments_are_valid(tmp_path, tree):
    """A refused `experiment --only NOPE` still overwrote the experiment's spec.yaml."""
    out = tmp_path / "exp"
    out.mkdir()
    (out / ".kvdistill-run").write_text('{"kind": "experiment"}\n')
    (out / "spec.yaml").write_text("# the spec as it was run, with the user's notes\n")
    before = tree.snap(tmp_path)
    with pytest.raises(KvdistillError, match=r"--only \['NOPE'\]: not conditions of 'micro'") as err:
        run_experiment(load_spec(micro_spec()), out, only=["NOPE"])
    assert "use some of ce_only, kd" in err.value.fix
    with pytest.raises(KvdistillError, match="--seeds 0: no seed to run"):
        run_experiment(load_spec(micro_spec()), out, seeds=0)
    assert tree.snap(tmp_path) == before


def test_an_experiment_into_the_users_folder_is_refused(tmp_path, tree):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "spec.yaml").write_text("# my own spec\n")
    before = tree.snap(tmp_path)
    with pytest.raises(KvdistillError, match="holds files that kvdistill did not write"):
        run_experiment(load_spec(micro_spec()), tmp_path / "mine")
    assert tree.snap(tmp_path) == before


@pytest.fixture(scope="module")
def given_teacher(tmp_path_factory):
    """A saved tiny llama with the GPT-2 tokenizer: a teacher used as given (steps 0)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from kvdistill.models.load import load_tokenizer

    tok = load_tokenizer("gpt2-tokenizer")
    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=96,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("given")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_given_teacher_probe_and_init_are_scored_through_the_one_path(tmp_path, given_teacher):
    """A teacher of steps 0 is used as given (nothing trained, not scored); eval.probe adds every run's KV
    probe against it, eval.init scores the untrained student; each figure is what `kvdistill.eval.student`
    gives."""
    from kvdistill.config import load_config
    from kvdistill.data import load_records
    from kvdistill.eval.metrics import TeacherRowsCache
    from kvdistill.eval.student import evaluate_saved, evaluate_student
    from kvdistill.models.load import load_model
    from kvdistill.student import build_student

    spec = micro_spec(
        teachers=[{"name": "given", "model": given_teacher, "steps": 0}],
        conditions={"ce_only": {}, "kd": {"teachers": ["given"]}},
        seeds=[0],
        eval={"max_new_tokens": 4, "batch_size": 8, "probe": True, "init": True},
    )
    results = run_experiment(load_spec(spec), tmp_path)
    assert not (tmp_path / "teachers" / "given" / "final").exists()
    assert "exact_match" not in json.loads((tmp_path / "teachers" / "given" / "teacher.json").read_text())
    assert results["teachers"]["given"]["params"] > 0
    cfg = load_config(tmp_path / "runs" / "kd" / "seed-0" / "config.yaml")
    held = load_records(cfg.data, split="eval")
    fit = load_records(cfg.data, split="train")[:16]
    teachers = {"given": load_model(given_teacher, attn_implementation="sdpa")}
    kw = dict(
        max_length=cfg.data.max_length, batch_size=8, max_new_tokens=4, teacher_cache=TeacherRowsCache()
    )
    for name, got in (
        (
            "kd",
            evaluate_saved(
                tmp_path / "runs" / "kd" / "seed-0" / "final",
                held,
                template=cfg.data.template,
                teachers=teachers,
                fit_records=fit,
                **kw,
            ),
        ),
        ("init", evaluate_student(*build_student(cfg.student, seed=0), teachers, fit, held, **kw)),
    ):
        record = json.loads(
            (tmp_path / ("init" if name == "init" else "runs/kd") / "seed-0" / "eval.json").read_text()
        )
        assert (
            record["ppl"] == got["perplexity"]["ppl"] and record["per_item"] == got["exact_match"]["per_item"]
        )
        assert record["probe_kv_error"] == got["probe_kv_error"]
        assert len(record["probe_kv_error"]["given"]["layers"]) == 1  # one per student layer
    with pytest.raises(ConfigError, match="steps 0 uses a model as given"):
        load_spec(micro_spec(teachers=[{"name": "t", "from_config": {"base": "smollm2-135m"}, "steps": 0}]))


def test_only_the_teachers_the_chosen_conditions_read_are_prepared():
    from kvdistill.experiments.runner import teachers_needed

    kava = load_spec("kava")  # E1 and E4 distil the backbone itself (student_from); E5 reads the two others
    assert teachers_needed(kava, ["E1", "E4", "nocot_ft", "cot_ft"]) == ["backbone"]
    assert teachers_needed(kava, ["E1", "E5"]) == ["backbone", "qwen_sp", "gemma_sp"]
    assert teachers_needed(kava, ["E4_long", "E4_codi1_long", "nocot_long"]) == ["backbone"]
    assert ("E4_long", "nocot_long") in kava.compare
    small = load_spec("distill-small")
    assert teachers_needed(small, ["ce_only"]) == []
    assert teachers_needed(small, ["ce_only", "kd_gemma"]) == ["gemma_sp"]
    assert teachers_needed(small, list(small.conditions)) == ["llama_bpe", "qwen_sp", "gemma_sp"]


# -------------------------------------------------------------------------------------- the pool's gate
SLEEPER = (
    "import sys, time; t0 = time.time(); time.sleep(float(sys.argv[2])); "
    "open(sys.argv[1], 'w').write(f'{t0} {time.time()}')"
)


def pool_jobs(tmp_path, n: int, need: int | None, sleep_s: float):
    """n children that each sleep `sleep_s` and write their (start, end) time to tmp_path/job-i."""
    from kvdistill.experiments.runner import Job

    return [
        Job(
            [sys.executable, "-c", SLEEPER, str(tmp_path / f"job-{i}"), str(sleep_s)],
            tmp_path / f"job-{i}.log",
            f"job-{i}",
            need,
        )
        for i in range(n)
    ]


def spans(tmp_path, n: int) -> list[tuple[float, float]]:
    return [tuple(map(float, (tmp_path / f"job-{i}").read_text().split())) for i in range(n)]


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    return max(sum(1 for s, e in intervals if s <= t < e) for t, _ in intervals)


def test_the_pool_waits_for_memory_and_runs_every_job_in_order(tmp_path, monkeypatch, caplog):
    """10 GiB free, 4 GiB per job, children inside the ramp: two at once although concurrent allows five;
    every job runs, in order, and each waiting job says once why it waits."""
    import subprocess

    from kvdistill.experiments import memory
    from kvdistill.experiments.runner import run_pool

    popen, started = subprocess.Popen, []  # (label, children of the pool still alive when it started)

    def recording_popen(cmd, **kw):
        alive = sum(1 for _, p in started if p.poll() is None)
        proc = popen(cmd, **kw)
        started.append((Path(cmd[-2]).name, proc))
        alive_at_start.append(alive)
        return proc

    alive_at_start: list[int] = []
    monkeypatch.setattr(subprocess, "Popen", recording_popen)
    monkeypatch.setattr(memory, "cuda_free_bytes", lambda: 10 * GIB)
    caplog.set_level(logging.INFO, logger="kvdistill.experiments.runner")
    run_pool(pool_jobs(tmp_path, 6, 4 * GIB, 0.5), 5, "training", ramp_s=600.0, poll_s=0.1)
    assert [label for label, _ in started] == [f"job-{i}" for i in range(6)]  # every job, in order
    assert max(alive_at_start) <= 1  # never a third beside two
    assert most_at_once(spans(tmp_path, 6)) <= 2
    waits = [r.getMessage() for r in caplog.records if "waiting for" in r.getMessage()]
    assert waits and all("waiting for 4.0 GiB of GPU memory: 10.0 GiB free, 8.0 GiB" in m for m in waits)
    assert len(waits) == len({m.split(":")[0] for m in waits}) <= 4  # once per waiting job (jobs 2-5)


def test_a_job_larger_than_the_free_memory_runs_alone_never_deadlocks(tmp_path, monkeypatch, caplog):
    from kvdistill.experiments import memory
    from kvdistill.experiments.runner import run_pool

    monkeypatch.setattr(memory, "cuda_free_bytes", lambda: 10 * GIB)
    caplog.set_level(logging.INFO, logger="kvdistill.experiments.runner")
    run_pool(pool_jobs(tmp_path, 2, 20 * GIB, 0.2), 2, "training", ramp_s=600.0, poll_s=0.1)
    (s0, e0), (s1, _) = spans(tmp_path, 2)
    assert e0 <= s1  # one after the other
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "exceeds" in r.getMessage()]
    assert len(warned) == 2


def test_without_cuda_the_pool_is_bounded_by_concurrent_only(tmp_path, monkeypatch):
    from kvdistill.experiments import memory
    from kvdistill.experiments.runner import run_pool

    monkeypatch.setattr(memory, "cuda_free_bytes", lambda: None)
    run_pool(pool_jobs(tmp_path, 3, 100 * GIB, 1.5), 3, "training", ramp_s=600.0, poll_s=0.1)
    times = spans(tmp_path, 3)
    assert max(s for s, _ in times) < min(e for _, e in times)  # all three at once
