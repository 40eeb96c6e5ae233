"""Experiment statistics against hand-computed values and brute-force references."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from kvdistill.errors import KvdistillError
from kvdistill.experiments.stats import paired_comparison, summary

# t_{0.975, 2} by hand: Student-t with 2 df has CDF 1/2 + t / (2·sqrt(2 + t²)); setting it to 0.975 gives
# t / sqrt(2 + t²) = 0.95, so t = 0.95 · sqrt(2 / (1 - 0.95²)) = 4.302652...
T_975_2 = 0.95 * math.sqrt(2 / (1 - 0.95**2))


def test_t_quantile_by_hand():
    assert abs(T_975_2 - 4.302652) < 1e-6


# summary


def test_summary_of_one_two_three():
    s = summary([1, 2, 3])
    assert s["values"] == [1.0, 2.0, 3.0]
    assert s["mean"] == pytest.approx(2.0)
    assert s["std"] == pytest.approx(1.0)  # sqrt(((1-2)² + 0 + (3-2)²) / 2)
    half = T_975_2 * 1.0 / math.sqrt(3)
    assert s["ci95"] == pytest.approx([2 - half, 2 + half], rel=1e-12)


def test_summary_of_one_value():
    assert summary([0.7]) == {"values": [0.7], "mean": 0.7, "std": 0.0, "ci95": [0.7, 0.7]}


def test_summary_of_constant_values_has_zero_width():
    s = summary([0.5, 0.5, 0.5, 0.5])
    assert s["std"] == 0.0
    assert s["ci95"] == [0.5, 0.5]


@pytest.mark.parametrize("bad", [float("nan"), None, float("inf"), "0.3"])
def test_summary_refuses_missing_values_naming_them(bad):
    with pytest.raises(KvdistillError, match=r"values has 1 missing.*\[1\]="):
        summary([0.1, bad, 0.3])


def test_summary_refuses_empty():
    with pytest.raises(KvdistillError, match="values is empty"):
        summary([])


# paired comparison over seeds


def test_three_seeds_by_hand():
    r = paired_comparison([3, 5, 4], [1, 2, 2])
    # d = [2, 3, 2]: mean 7/3; deviations -1/3, 2/3, -1/3 -> var = (1/9 + 4/9 + 1/9) / 2 = 1/3
    assert r["diff"] == pytest.approx(7 / 3)
    half = T_975_2 * math.sqrt(1 / 3) / math.sqrt(3)
    assert r["ci95"] == pytest.approx([7 / 3 - half, 7 / 3 + half], rel=1e-12)
    # only "all +" and "all -" of the 8 sign flips reach |sum| = 7
    assert r["p"] == pytest.approx(2 / 8)
    assert (r["n"], r["method"], r["interval"]) == (3, "exact", "paired_t")


def test_exact_p_with_mixed_signs_by_hand():
    # d = [1, 2, -0.5], observed sum 2.5; flip sums ±3.5, ±2.5, ±1.5, ±0.5: four reach 2.5 -> 4/8
    r = paired_comparison([1, 2, 0], [0, 0, 0.5])
    assert r["p"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "cond, base", [([1, 3], [2, 2]), ([2, -2, 1, -1], [0, 0, 0, 0]), ([0.4] * 5, [0.4] * 5)]
)
def test_symmetric_or_zero_differences_give_p_one(cond, base):
    r = paired_comparison(cond, base)
    assert r["diff"] == pytest.approx(0.0)
    assert r["p"] == 1.0


def test_identical_conditions():
    scores = [0.31, 0.28, 0.35, 0.30]
    r = paired_comparison(scores, scores)
    assert r["diff"] == 0.0
    assert r["ci95"] == [0.0, 0.0]
    assert r["p"] == 1.0


def test_exact_matches_brute_force_enumeration():
    rng = np.random.default_rng(3)
    cond, base = rng.normal(0.3, 1, 7), rng.normal(0, 1, 7)
    d = cond - base
    flips = [
        abs(sum(s * x for s, x in zip(signs, d, strict=True)))
        for signs in itertools.product((-1, 1), repeat=7)
    ]
    expected = sum(f >= abs(d.sum()) - 1e-12 for f in flips) / 2**7
    assert paired_comparison(cond, base)["p"] == pytest.approx(expected)


def test_one_seed():
    r = paired_comparison([0.6], [0.5])
    assert r["diff"] == pytest.approx(0.1)
    assert r["ci95"] == pytest.approx([0.1, 0.1])
    assert r["p"] == 1.0  # two flips, both |±0.1| reach 0.1


def test_auto_switches_to_monte_carlo_above_sixteen_seeds():
    assert paired_comparison([1.0] * 16, [0.0] * 16)["method"] == "exact"
    assert paired_comparison([1.0] * 16, [0.0] * 16)["p"] == pytest.approx(2 / 2**16)
    r = paired_comparison([1.0] * 17, [0.0] * 17, n_resamples=2000)
    assert r["method"] == "monte_carlo"
    assert 1 / 2001 <= r["p"] <= 3 / 2001  # exact p is 2/2^17; Monte Carlo never reports 0


def test_monte_carlo_is_deterministic_and_close_to_exact():
    rng = np.random.default_rng(0)
    cond, base = rng.normal(0.4, 1, 14), rng.normal(0, 1, 14)
    exact = paired_comparison(cond, base, method="exact")["p"]
    mc = paired_comparison(cond, base, method="monte_carlo", n_resamples=20000, seed=5)
    assert mc == paired_comparison(cond, base, method="monte_carlo", n_resamples=20000, seed=5)
    assert mc["p"] == pytest.approx(exact, abs=4 * math.sqrt(exact * (1 - exact) / 20000))


# paired comparison with per-problem scores (bootstrap interval)


def _synthetic(n_seeds, n_items, *, p_base=0.5, lift=0.1, seed_sd=0.0, data_seed=0):
    """0/1 scores per (seed, problem): P(correct) = difficulty + seed effect (+ lift for the condition)."""
    rng = np.random.default_rng(data_seed)
    difficulty = rng.uniform(p_base - 0.3, p_base + 0.3, n_items)  # (J,)
    seed_effect = rng.normal(0, seed_sd, (n_seeds, 1))  # (S, 1)
    base = (rng.random((n_seeds, n_items)) < difficulty + seed_effect).astype(float)  # (S, J)
    cond = (rng.random((n_seeds, n_items)) < difficulty + seed_effect + lift).astype(float)  # (S, J)
    return cond, base


def _compare_items(cond, base, **kw):
    return paired_comparison(cond.mean(axis=1), base.mean(axis=1), per_item=(cond, base), **kw)


def test_bootstrap_is_deterministic_for_a_seed():
    cond, base = _synthetic(4, 200)
    a, b = _compare_items(cond, base, seed=1), _compare_items(cond, base, seed=1)
    assert a == b
    assert _compare_items(cond, base, seed=2)["ci95"] != a["ci95"]
    assert (a["interval"], a["n_items"], a["method"]) == ("bootstrap", 200, "exact")


def test_bootstrap_keeps_the_seed_level_test():
    cond, base = _synthetic(5, 100)
    with_items = _compare_items(cond, base)
    seeds_only = paired_comparison(cond.mean(axis=1), base.mean(axis=1))
    assert with_items["diff"] == pytest.approx(seeds_only["diff"])
    assert with_items["p"] == seeds_only["p"]


def test_bootstrap_interval_contains_the_true_difference_and_shrinks_with_problems():
    widths = []
    for n_items in (100, 400, 1600):
        cond, base = _synthetic(5, n_items, lift=0.1, data_seed=n_items)
        r = _compare_items(cond, base)
        lo, hi = r["ci95"]
        assert lo < 0.1 < hi
        assert lo < r["diff"] < hi
        widths.append(hi - lo)
    # the width goes as 1/sqrt(J) when the seeds add no variance: x16 problems -> about a quarter as wide
    assert widths[0] > widths[1] > widths[2]
    assert widths[2] < 0.4 * widths[0]


def test_bootstrap_with_one_seed_matches_the_normal_interval():
    # one seed: only problems are resampled; the percentile interval ≈ mean ± 1.96·sd(D)/sqrt(J)
    cond, base = _synthetic(1, 2000)
    r = _compare_items(cond, base)
    d = (cond - base)[0]
    half = 1.959964 * d.std(ddof=0) / math.sqrt(d.size)
    assert r["ci95"] == pytest.approx([d.mean() - half, d.mean() + half], abs=0.1 * half)


def test_bootstrap_includes_seed_variance():
    # the same problems and the same noise level, but seeds that disagree: the interval must widen
    quiet = _compare_items(*_synthetic(6, 400, seed_sd=0.0, data_seed=1))
    noisy_cond, noisy_base = _synthetic(6, 400, seed_sd=0.0, data_seed=1)
    noisy_cond = noisy_cond.copy()
    gains = np.arange(400) % 2 == 0  # (J,): three seeds get every even problem right
    noisy_cond[:3] = np.maximum(noisy_cond[:3], gains)
    noisy = _compare_items(noisy_cond, noisy_base)
    assert np.diff(noisy["ci95"])[0] > 1.5 * np.diff(quiet["ci95"])[0]


# bad input


def test_mismatched_lengths():
    with pytest.raises(KvdistillError, match="condition has 3 scores but baseline has 2"):
        paired_comparison([1, 2, 3], [1, 2])


def test_nan_in_either_condition():
    with pytest.raises(KvdistillError, match=r"condition has 1 missing.*\[2\]=nan"):
        paired_comparison([1, 2, float("nan")], [1, 2, 3])
    with pytest.raises(KvdistillError, match=r"baseline has 1 missing.*\[0\]=None"):
        paired_comparison([1, 2, 3], [None, 2, 3])


def test_per_item_shape_errors():
    cond, base = _synthetic(3, 10)
    with pytest.raises(KvdistillError, match=r"shape \(2, 10\), expected \(3, n_items >= 1\)"):
        paired_comparison(cond.mean(1), base.mean(1), per_item=(cond[:2], base))
    with pytest.raises(
        KvdistillError, match=r"condition scores have shape \(3, 10\) but baseline scores \(3, 8\)"
    ):
        paired_comparison(cond.mean(1), base[:, :8].mean(1), per_item=(cond, base[:, :8]))
    with pytest.raises(KvdistillError, match="must be a pair"):
        paired_comparison(cond.mean(1), base.mean(1), per_item=cond)


def test_per_item_nan_and_inconsistent_means():
    cond, base = _synthetic(3, 10)
    bad = cond.copy()
    bad[1, 4] = np.nan
    with pytest.raises(KvdistillError, match=r"NaN/inf value\(s\) at \(seed, problem\) \[1, 4\]"):
        paired_comparison(cond.mean(1), base.mean(1), per_item=(bad, base))
    with pytest.raises(KvdistillError, match=r"baseline row means differ.*seed \[0\]"):
        paired_comparison(cond.mean(1), base.mean(1) + [0.1, 0, 0], per_item=(cond, base))


def test_bad_method_and_resamples():
    with pytest.raises(KvdistillError, match="method 'bootstrap' is not one of auto, exact, monte_carlo"):
        paired_comparison([1, 2], [0, 1], method="bootstrap")
    with pytest.raises(KvdistillError, match="2\\^21 sign flips"):
        paired_comparison([1.0] * 21, [0.0] * 21, method="exact")
    with pytest.raises(KvdistillError, match="n_resamples must be a positive integer"):
        paired_comparison([1, 2], [0, 1], n_resamples=0)
