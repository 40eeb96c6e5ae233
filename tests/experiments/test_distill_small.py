"""The packaged `distill-small` spec and its CPU twin `distill-small-tiny`, run end to end as a user runs it:
the teachers on their own (larger) data, one test split for every run and a separate validation split, early
stopping, the cache budget (exactly the records the runs read, its cost amortised as documented), CE only at
equal FLOPs and at equal measured wall time, the decaying K/V weight and the held-out curves in
results.json."""

from __future__ import annotations

import json
import statistics

import pytest
import yaml

from kvdistill.config import load_config
from kvdistill.data import load_records
from kvdistill.experiments.spec import load_spec


def test_packaged_distill_small_spec_is_valid():
    spec = load_spec("distill-small")
    assert spec.seeds == [0, 1, 2, 3, 4, 5] and spec.concurrent == "auto"
    assert spec.conditions["ce_wall"].match_wall_of == "kd_fixed"
    assert spec.conditions["ce_flops"].match_flops_of == "kd_fixed"
    assert spec.conditions["kd_fixed_cached"].cache
    assert all(t.data == {"train_size": None} for t in spec.teachers)
    sizes = {
        n: next((o for o in c.overrides if o.startswith("data.train_size")), None)
        for n, c in spec.conditions.items()
    }
    assert sizes["ce_only_500"] == sizes["kd_fixed_500"] == "data.train_size=500"
    assert sizes["ce_only_8000"] == sizes["kd_fixed_8000"] == "data.train_size=8000"
    three = ["llama_bpe", "qwen_sp", "gemma_sp"]
    for name in ("kd_logits", "kd_logits_kv", "kd_fixed_onpolicy"):
        assert spec.conditions[name].teachers == three, name


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from typer.testing import CliRunner

    from kvdistill.cli import app

    out = tmp_path_factory.mktemp("distill-small-tiny")
    result = CliRunner().invoke(app, ["experiment", "distill-small-tiny", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "results.json").read_text())


def run_config(out, name, seed):
    return load_config(out / "runs" / name / f"seed-{seed}" / "scored-config.yaml")


@pytest.mark.slow
def test_one_test_split_disjoint_from_every_training_set(tiny_run):
    out, results = tiny_run
    test, val = set(results["test_ids"]), set(results["val_ids"])
    assert len(test) == 8 and len(val) == 8 and not test & val
    for name in results["conditions"]:
        for seed in results["seeds"]:
            cfg = run_config(out, name, seed)
            assert [r["id"] for r in load_records(cfg.data, split="eval")] == results["test_ids"]
            assert not {r["id"] for r in load_records(cfg.data, split="train")} & (test | val)
    for teacher in results["teachers"]:
        cfg = load_config(out / "teachers" / teacher / "config.yaml")
        train = {r["id"] for r in load_records(cfg.data, split="train")}
        assert not train & (test | val) and len(train) == results["teacher_train_records"][teacher]
    assert results["teacher_train_records"]["llama_bpe"] > results["train_records"]["ce_only"] == 24
    assert results["train_records"]["ce_only_12"] == 12
    for name, rows in results["runs"].items():  # every run scored its best validation checkpoint
        for row in rows:
            best = json.loads((out / "runs" / name / f"seed-{row['seed']}" / "best.json").read_text())
            assert row["scored"] == "best" and row["selected_step"] == best["step"] <= row["steps_trained"]


@pytest.mark.slow
def test_cache_budget_reads_exactly_what_the_runs_read_and_is_amortised(tiny_run):
    from kvdistill.cache.reader import CacheReader
    from kvdistill.experiments.budget import records_read

    out, results = tiny_run
    read = set().union(*(records_read(run_config(out, "kd_fixed_cached", s)) for s in results["seeds"]))
    for teacher, ext in results["extraction"].items():
        assert set(CacheReader(out / "caches" / teacher).index) == read and ext["records"] == len(read)
        assert ext["readers"] == 2 and ext["runs"] == ["kd_fixed_cached/seed-0", "kd_fixed_cached/seed-1"]
        assert ext["flops"] == 2 * results["teachers"][teacher]["params"] * ext["tokens"]
        assert ext["flops_per_reader"] == pytest.approx(ext["flops"] / 2)
        assert ext["seconds_per_reader"] == pytest.approx(ext["seconds"] / 2)
    share = sum(e["flops_per_reader"] for e in results["extraction"].values())
    share_s = sum(e["seconds_per_reader"] for e in results["extraction"].values())
    for row in results["runs"]["kd_fixed_cached"]:
        ev = json.loads((out / "runs" / "kd_fixed_cached" / f"seed-{row['seed']}" / "eval.json").read_text())
        assert ev["amortised_flops"] == pytest.approx(share) and ev["amortised_s"] == pytest.approx(share_s)
        # a cached teacher costs nothing per step: 6·N_s per student token, plus the share
        assert ev["flops"] == pytest.approx(6 * results["student_params"] * ev["tokens"] + share)
    assert "Each run reading teacher t's cache is charged" in (out / "results.md").read_text()


@pytest.mark.slow
def test_equal_flops_and_equal_wall_time_steps(tiny_run):
    out, results = tiny_run
    n_s = results["student_params"]
    per_token = results["flops_per_token"]
    teacher_params = sum(t["params"] for t in results["teachers"].values())
    assert per_token["ce_only"] == 6 * n_s and per_token["kd_fixed"] == 6 * n_s + 2 * teacher_params
    assert results["steps"]["ce_flops"] == round(6 * per_token["kd_fixed"] / per_token["ce_only"])

    def summaries(name):
        return [
            json.loads((out / "runs" / name / f"seed-{s}" / "summary.json").read_text())
            for s in results["seeds"]
        ]

    wall = statistics.median(s["train_s"] for s in summaries("kd_fixed"))
    rate = statistics.median(s["train_s"] / s["steps"] for s in summaries("ce_only"))
    assert results["steps"]["ce_wall"] == max(1, round(wall / rate))


@pytest.mark.slow
def test_kv_schedule_grad_norms_and_curves_are_logged(tiny_run):
    out, results = tiny_run
    cfg = run_config(out, "kd_fixed_decay", 0)
    rows = [
        json.loads(x)
        for x in (out / "runs" / "kd_fixed_decay" / "seed-0" / "metrics.jsonl").read_text().splitlines()
    ]
    train_rows = [r for r in rows if "kv/weight" in r]
    assert [r["step"] for r in train_rows] == list(range(1, len(train_rows) + 1))
    for r in train_rows:
        assert r["kv/weight"] == pytest.approx(cfg.losses.kv.weight_at(r["step"] - 1, cfg.train.steps))
    assert train_rows[0]["kv/weight"] == 1.0
    with_norms = [r for r in rows if "grad_norm/kd" in r]
    assert with_norms and all(r["step"] % 2 == 0 and r["grad_norm/ce"] > 0 for r in with_norms)
    for name, curve in results["curves"].items():
        for seed in results["seeds"]:
            points = curve["per_seed"][str(seed)]
            steps = [p["step"] for p in points]
            (run,) = [r for r in results["runs"][name] if r["seed"] == seed]
            # every 2 steps, and the last trained step; ce_wall's steps come from measured times, so the
            # machine's load sets how many there are (on a loaded CPU as few as 3)
            assert steps[0] == 2 and steps == sorted(set(steps)), name
            assert all(s % 2 == 0 or s == run["steps_trained"] for s in steps), name
            if name != "ce_wall":
                assert steps[:2] == [2, 4], name
            assert all(p["flops"] > 0 and p["ce"] > 0 and 0 <= p["exact_match"] <= 1 for p in points)
        assert curve["mean"] and curve["mean"][0]["step"] == 2
    assert (out / "plots" / "curve_exact_match_flops.png").is_file()
    spec = yaml.safe_load((out / "spec.yaml").read_text())
    assert spec["name"] == "distill-small-tiny"


def train_rows(out, name, seed=0):
    rows = (out / "runs" / name / f"seed-{seed}" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, rows) if r.get("split") != "eval" and "loss/ce" in r]


@pytest.mark.slow
def test_logit_and_on_policy_conditions_train_what_they_say(tiny_run):
    out, results = tiny_run
    teachers = ("llama_bpe", "qwen_sp")
    logits_only = train_rows(out, "kd_logits")
    assert logits_only and all(
        f"loss/logit_kd/{t}" in r and f"loss/kv/{t}" not in r for r in logits_only for t in teachers
    )
    both = train_rows(out, "kd_logits_kv")
    assert all(f"loss/logit_kd/{t}" in r and f"loss/kv/{t}" in r for r in both for t in teachers)
    assert run_config(out, "kd_fixed_onpolicy", 0).train.on_policy.lam == 0.5
    for row in results["runs"]["kd_fixed_onpolicy"]:  # every step says whether it was on-policy
        sampled = [r["on_policy/sampled"] for r in train_rows(out, "kd_fixed_onpolicy", row["seed"])]
        assert set(sampled) <= {0.0, 1.0} and len(sampled) == row["steps_trained"]
    rows = [r for s in results["seeds"] for r in train_rows(out, "kd_fixed_onpolicy", s)]
    assert {r["on_policy/sampled"] for r in rows} == {0.0, 1.0}
    assert all(r["on_policy/new_tokens"] > 0 for r in rows if r["on_policy/sampled"] == 1.0)
    # the sampling is charged: 2·N_s per generated token, beside (6·N_s + 2·Σ N_t) per trained token
    n_s, per_token = results["student_params"], results["flops_per_token"]["kd_fixed_onpolicy"]
    assert per_token == 6 * n_s + 2 * sum(results["teachers"][t]["params"] for t in ("llama_bpe", "qwen_sp"))
    for s in results["seeds"]:
        ev = json.loads((out / "runs" / "kd_fixed_onpolicy" / f"seed-{s}" / "eval.json").read_text())
        generated = sum(int(r["on_policy/new_tokens"]) for r in train_rows(out, "kd_fixed_onpolicy", s))
        assert ev["generated_tokens"] == generated and ev["generation_flops"] == 2 * n_s * generated
        assert ev["flops"] == per_token * ev["tokens"] + 2 * n_s * generated
    assert (
        sum(
            json.loads((out / "runs" / "kd_fixed" / "seed-0" / "eval.json").read_text())[k]
            for k in ("generated_tokens", "generation_flops")
        )
        == 0
    )  # off-policy: nothing sampled


def test_packaged_plateau_conditions_stop_on_validation_exact_match():
    spec = load_spec("distill-small")
    for name in ("ce_plateau", "kd_gemma_plateau", "kd_fixed_plateau"):
        overrides = spec.conditions[name].overrides
        assert "train.early_stopping.metric=exact_match" in overrides and "train.steps=2000" in overrides
    assert ("kd_fixed_plateau", "ce_plateau") in spec.compare


@pytest.mark.slow
def test_plateau_conditions_score_their_best_validation_exact_match(tiny_run):
    out, results = tiny_run
    for name in ("ce_plateau", "kd_fixed_plateau"):
        assert run_config(out, name, 0).train.early_stopping.metric == "exact_match"
        for row in results["runs"][name]:
            rows = (out / "runs" / name / f"seed-{row['seed']}" / "metrics.jsonl").read_text().splitlines()
            evals = [r for r in map(json.loads, rows) if "eval/exact_match" in r]
            # the checkpoint scored is the first evaluation of the highest validation exact match, and
            # training stops after `patience` (2) evaluations without a strict improvement, or at step 10
            best = max(r["eval/exact_match"] for r in evals)
            assert row["selected_step"] == next(r["step"] for r in evals if r["eval/exact_match"] == best)
            after = [r for r in evals if r["step"] > row["selected_step"]]
            assert row["steps_trained"] == 10 or (row["stopped_early"] and len(after) == 2)
    pairs = {(c["condition"], c["baseline"]) for c in results["comparisons"]}
    assert ("kd_fixed_plateau", "ce_plateau") in pairs
