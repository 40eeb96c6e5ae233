"""The specialists experiment end to end on the packaged CPU twin (`specialists-tiny`, shrunk to a few steps):
every teacher is trained on its own skill only, results.json holds exact match per skill (each figure the mean
of that skill's held-out results) for the teachers and every condition, and routing accuracy (overall and per
skill, with its held-out learning curve) for the router, similarity and confidence conditions only. The
packaged spec as it is runs under the slow marker."""

from __future__ import annotations

import json

import pytest
import yaml

from kvdistill.data import load_records
from kvdistill.experiments.conditions import condition_config
from kvdistill.experiments.runner import run_experiment
from kvdistill.experiments.spec import load_spec, spec_path

SKILLS = ["arithmetic", "gsm_symbolic", "sorting"]
MICRO = {
    "num_hidden_layers": 1,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
}


def shrunk() -> dict:
    """specialists-tiny with one-layer models, a few steps and a small data pool (same teachers, skills,
    conditions)."""
    spec = yaml.safe_load(spec_path("specialists-tiny").read_text())
    spec["base"]["data"].update(size=120, eval_size=12, max_length=48)
    spec["base"]["student"]["from_config"].update(MICRO, head_dim=16)
    spec["base"]["train"].update(steps=2, batch_size=4, eval_every=1)
    for teacher in spec["teachers"]:
        teacher["from_config"].update(
            MICRO, **({"head_dim": 16} if "head_dim" in teacher["from_config"] else {})
        )
        teacher.update(steps=2, batch_size=4)
    spec["eval"].update(max_new_tokens=3)
    return spec


def test_specialists_per_skill_metrics_and_routing_accuracy(tmp_path):
    spec = load_spec(shrunk())
    routed = ["kd_router", "kd_router_token", "kd_similarity", "kd_confidence", "kd_router_conf"]
    results = run_experiment(spec, tmp_path, only=routed, seeds=1)

    # each specialist trained on its own skill only; scored on the whole mixed held-out set, per skill
    for prep in spec.teachers:
        cfg = yaml.safe_load((tmp_path / "teachers" / prep.name / "config.yaml").read_text())
        assert cfg["data"]["train_skills"] == [prep.skill]
        assert set(results["teachers"][prep.name]) >= {f"exact_match_{s}" for s in SKILLS}

    held = load_records(
        condition_config(spec, "ce_only", 0, {t.name: {"model": "?"} for t in spec.teachers}).data, "eval"
    )
    skills = [r["skill"] for r in held]
    assert set(skills) == set(SKILLS)
    for name in ["ce_only", *routed]:
        per = results["conditions"][name]
        ev = json.loads((tmp_path / "runs" / name / "seed-0" / "eval.json").read_text())
        assert ev["skills"] == skills
        for s in SKILLS:
            mine = [x for x, k in zip(ev["per_item"], skills, strict=True) if k == s]
            assert per[f"exact_match_{s}"]["values"] == [pytest.approx(sum(mine) / len(mine))]
        has_routing = name in routed
        assert ("routing_acc" in per) == has_routing
        assert all((f"routing_acc_{s}" in per) == has_routing for s in SKILLS)
    for name in routed:
        per = results["conditions"][name]
        acc = per["routing_acc"]["values"][0]
        assert 0.0 < acc < 1.0
        by_skill = [per[f"routing_acc_{s}"]["values"][0] for s in SKILLS]
        counts = [skills.count(s) for s in SKILLS]
        assert acc == pytest.approx(sum(a * n for a, n in zip(by_skill, counts, strict=True)) / len(skills))
        # the learning curve: routing accuracy at every eval_every step (1 and 2), the last one the reported
        # figure
        assert results["routing_curves"][name]["steps"] == [1, 2]
        assert results["routing_curves"][name]["routing_acc"][-1] == pytest.approx(acc)
    compared = {(c["condition"], c["metric"]) for c in results["comparisons"]}
    assert ("kd_router", "exact_match_sorting") in compared and ("kd_router", "routing_acc") not in compared
    md = (tmp_path / "results.md").read_text()
    assert "routing accuracy on sorting problems" in md and "exact_match_gsm_symbolic" in md


@pytest.mark.slow
def test_packaged_specialists_tiny_runs(tmp_path):
    results = run_experiment(load_spec("specialists-tiny"), tmp_path, seeds=1)
    assert "routing_acc" in results["conditions"]["kd_router"]
