"""The experiment runner end to end on a micro spec (two tiny teachers, CE only vs KV distillation, two
seeds): results.json holds what the interface promises, a resumed experiment trains nothing again and gives
the same results, and --only runs the baseline too. The packaged `tiny` spec runs end to end (slow marker, CI
runs it)."""

from __future__ import annotations

import json

import pytest
import torch

from kvdistill.errors import ConfigError, KvdistillError
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


def test_a_plan_checks_every_runs_data_and_writes_nothing_but_the_generated_data(tmp_path, tree, monkeypatch):
    """`experiment --plan`: every planned run with its training records, teachers included; under --out
    nothing at all, and a generated source's problems kept in $KVDISTILL_HOME/data (what carry.sh packs for a
    GPU machine without reasoning_gym)."""
    from kvdistill.data.gsm import cache_file

    pytest.importorskip("reasoning_gym")
    monkeypatch.setenv("KVDISTILL_HOME", str(tmp_path / "home"))
    work = tmp_path / "work"
    work.mkdir()
    raw = micro_spec()
    raw["base"]["data"] = {"source": "gsm_symbolic", "size": 60, "eval_size": 8, "max_length": 64}
    raw["conditions"] = {"ce_only": {}, "ce_small": {"overrides": ["data.train_size=20"]}}
    spec = load_spec(raw)
    before = tree.snap(work)
    planned = run_experiment(spec, work / "exp", seeds=2, plan=True)["plan"]
    assert tree.snap(work) == before  # no experiment directory, no lock, no spec.yaml
    assert set(planned) == {
        "teacher llama_bpe",
        "teacher qwen_sp",
        "ce_only/seed-0",
        "ce_only/seed-1",
        "ce_small/seed-0",
        "ce_small/seed-1",
    }
    assert planned["ce_small/seed-0"] == planned["ce_small/seed-1"] == 20
    assert planned["ce_only/seed-0"] > 20 and planned["teacher llama_bpe"] == planned["ce_only/seed-0"]
    assert cache_file(0).is_file() and len(cache_file(0).read_text().splitlines()) >= 60


def test_a_report_writes_the_results_of_the_scored_runs_only(tmp_path, tree):
    """`experiment --report` on an unfinished experiment (as a GPU call cut off by its time brings it back,
    without the students' weights): the conditions whose every seed is scored, with the same figures the
    finished experiment gave; the rest listed as not scored; nothing trained, nothing but the results
    written. Refused without the baseline's runs, and for a directory no experiment wrote."""
    import shutil

    raw = micro_spec()
    raw["conditions"] = {"ce_only": {}, "kd": {"teachers": ["llama_bpe"]}, "kd2": {"teachers": ["qwen_sp"]}}
    spec = load_spec(raw)
    full = run_experiment(spec, tmp_path / "exp")
    # what gpu.sh packs: no weights, no results
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "exp", cut, ignore=shutil.ignore_patterns("final", "checkpoints", "best"))
    for name in ("results.json", "results.md"):
        (cut / name).unlink()
    shutil.rmtree(cut / "plots")
    (cut / "runs" / "kd2" / "seed-1" / "eval.json").unlink()
    before = tree.snap(cut / "runs")
    got = run_experiment(spec, cut, report=True)
    assert tree.snap(cut / "runs") == before  # nothing trained or scored again
    assert got["unscored"] == ["kd2/seed-1"] and set(got["conditions"]) == {"ce_only", "kd"}
    assert got["conditions"] == {n: full["conditions"][n] for n in ("ce_only", "kd")}
    assert got["comparisons"] == [c for c in full["comparisons"] if c["condition"] == "kd"]
    assert got["teachers"] == {"llama_bpe": full["teachers"]["llama_bpe"]}
    assert got["flops_per_token"]["kd"] == full["flops_per_token"]["kd"]
    assert json.loads((cut / "results.json").read_text())["unscored"] == ["kd2/seed-1"]
    assert "not scored (their conditions left out): kd2/seed-1" in (cut / "results.md").read_text()
    # --seeds 1: every condition's first seed is scored
    assert set(run_experiment(spec, cut, seeds=1, report=True)["conditions"]) == {"ce_only", "kd", "kd2"}
    (cut / "runs" / "ce_only" / "seed-0" / "eval.json").unlink()
    with pytest.raises(KvdistillError, match=r"the baseline's runs \['ce_only/seed-0'\] are not scored"):
        run_experiment(spec, cut, report=True)
    (tmp_path / "other").mkdir()
    with pytest.raises(KvdistillError, match="not an experiment directory"):
        run_experiment(spec, tmp_path / "other", report=True)
