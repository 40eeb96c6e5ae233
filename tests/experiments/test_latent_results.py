"""The results of latent conditions against hand-made records: the swap probe's summary and paired drop, and
the stability of the latent K/V error read from the held-out curves."""

from __future__ import annotations

import pytest

from kvdistill.experiments.latent_results import latent_kv_stability, latent_swap
from kvdistill.experiments.results import markdown
from kvdistill.experiments.spec import ExperimentSpec


def _eval(own: list[int], swapped: list[int], follows: float) -> dict:
    return {
        "exact_match": sum(own) / len(own),
        "per_item": own,
        "swap_exact_match": sum(swapped) / len(swapped),
        "swap_per_item": swapped,
        "swap_follows": follows,
    }


def test_the_swap_probe_is_summarised_per_condition_with_its_paired_drop():
    evals = {
        "E4": [_eval([1, 1, 0, 1], [0, 1, 0, 0], 0.5), _eval([1, 0, 0, 1], [0, 0, 0, 1], 0.25)],
        "nocot": [{"exact_match": 0.5, "per_item": [1, 0, 1, 0]}] * 2,  # no latents: no probe
        "half": [_eval([1, 1, 1, 1], [1, 1, 1, 1], 0.0), {"exact_match": 1.0, "per_item": [1, 1, 1, 1]}],
    }
    got = latent_swap(evals)
    assert set(got) == {"E4"}  # a condition reports it only where every seed has it
    e4 = got["E4"]
    assert e4["exact_match"]["values"] == [0.75, 0.5] and e4["swap_exact_match"]["values"] == [0.25, 0.25]
    assert e4["swap_follows"]["mean"] == pytest.approx(0.375)
    # swapped − own, paired by seed and problem: (0.25 − 0.75 + 0.25 − 0.5) / 2
    assert e4["drop"]["diff"] == pytest.approx(-0.375) and e4["drop"]["n_items"] == 4
    assert e4["drop"]["ci95"][0] <= -0.375 <= e4["drop"]["ci95"][1]


def _points(*values, targets=("self",)) -> list[dict]:
    """A seed's held-out curve: evaluations every 10 steps, each target's L_KV an equal share of `values`."""
    n = len(targets)
    return [{"step": 10 * (i + 1), "latent_kv": {t: v / n for t in targets}} for i, v in enumerate(values)]


def test_latent_kv_stability_reads_the_last_value_and_the_largest_rise_of_each_seed():
    curves = {
        "E4": {"per_seed": {"0": _points(0.5, 0.3, 0.4, 0.2), "1": _points(0.6, 0.5)}},
        "E5": {"per_seed": {"0": _points(0.9, 1.2, 0.8, targets=("qwen", "gemma"))}},  # summed over targets
        "E1": {"per_seed": {"0": [{"step": 10}], "1": [{"step": 10}]}},  # no L_KV target
        "E2": {"per_seed": {"0": _points(0.4), "1": [{"step": 10}]}},  # one seed without: left out
    }
    got = latent_kv_stability(curves)
    assert set(got) == {"E4", "E5"}
    assert got["E4"]["final"]["values"] == [0.2, 0.5]
    assert got["E4"]["largest_rise"]["values"] == pytest.approx([0.1, 0.0])
    assert got["E5"]["final"]["values"] == pytest.approx([0.8])
    assert got["E5"]["largest_rise"]["values"] == pytest.approx([0.3])


def test_results_md_has_both_latent_sections():
    spec = ExperimentSpec.model_validate(
        {"name": "k", "base": {}, "conditions": {"E4": {}}, "baseline": "E4", "metrics": ["exact_match"]}
    )
    evals = {"E4": [_eval([1, 0], [0, 0], 0.5), _eval([1, 1], [1, 0], 0.5)]}
    results = {
        "spec": "k",
        "baseline": "E4",
        "seeds": [0, 1],
        "held_out": 2,
        "metrics": [],
        "teachers": {},
        "conditions": {"E4": {}},
        "comparisons": [],
        "steps": {"E4": 10},
        "latent_swap": latent_swap(evals),
        "latent_kv_stability": latent_kv_stability(
            {"E4": {"per_seed": {"0": _points(0.5, 0.7), "1": _points(0.4, 0.3)}}}
        ),
    }
    md = markdown(results, spec)
    assert "| E4 | 0.750 | 0.250 | -0.500 [" in md and "(swap probe)" in md
    assert "| E4 | 0.500 ± 0.283 | 0.700, 0.300 | 0.100 (0.200) |" in md
