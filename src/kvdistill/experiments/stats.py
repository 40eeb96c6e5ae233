"""Statistics of the experiment runner: per-condition summaries and paired comparisons over seeds.

Each (condition, seed) pair is one trained student. The same seed means the same initial weights and the same
data order in every condition, so a condition and its baseline are compared seed by seed (paired), never as
two independent samples.

Notation:
    S: seeds (trained students per condition), J: held-out problems (items), B: resamples
    d: per-seed differences condition - baseline, shape (S,)
    D: per-(seed, problem) differences, shape (S, J)

All functions are pure: the same inputs (and `seed`) give the same numbers; outputs are plain Python floats
and lists, ready for JSON.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats as sps

from kvdistill.errors import KvdistillError

EXACT_MAX_SEEDS = 16  # "auto" enumerates all 2^S sign flips up to here (65,536 rows), Monte Carlo above
EXACT_LIMIT = 20  # method="exact" is refused above this (2^20 flips)
_CHUNK = 1 << 16  # rows of sign flips / bootstrap resamples held in memory at once
METHODS = ("auto", "exact", "monte_carlo")


def _is_finite_number(v) -> bool:
    try:
        return v is not None and not isinstance(v, (str, bytes)) and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _as_scores(values: Sequence[float], what: str) -> np.ndarray:
    """`values` as a 1-D float array; refuses an empty sequence and None/NaN/inf, naming their positions."""
    values = list(values)
    if not values:
        raise KvdistillError(f"{what} is empty", "give at least one score (one per seed)")
    bad = [i for i, v in enumerate(values) if not _is_finite_number(v)]
    if bad:
        shown = ", ".join(f"[{i}]={values[i]!r}" for i in bad)
        raise KvdistillError(
            f"{what} has {len(bad)} missing, non-numeric or non-finite value(s): {shown}",
            "a run that failed or produced no score must be re-run or left out of every condition for that "
            "seed",
        )
    return np.asarray(values, dtype=np.float64)


def _t_interval(x: np.ndarray) -> list[float]:
    """Student-t 95% interval of the mean of `x` (S,); [mean, mean] for one value (no spread to estimate)."""
    n, mean = x.size, float(x.mean())
    if n == 1:
        return [mean, mean]
    half = float(sps.t.ppf(0.975, n - 1)) * float(x.std(ddof=1)) / math.sqrt(n)
    return [mean - half, mean + half]


def summary(values: Sequence[float]) -> dict:
    """Mean, sample std and 95% interval of one condition's scores over seeds.

    Args:
        values: one score per seed (S,), S >= 1; None, NaN and inf are refused with a KvdistillError.

    Returns:
        {"values": [...], "mean": float, "std": float (ddof=1; 0.0 for one value),
         "ci95": [lo, hi]} with the Student-t interval mean ± t_{0.975, S-1} · std / √S ([mean, mean] for
        S=1).
    """
    x = _as_scores(values, "values")
    return {
        "values": [float(v) for v in x],
        "mean": float(x.mean()),
        "std": float(x.std(ddof=1)) if x.size > 1 else 0.0,
        "ci95": _t_interval(x),
    }


def _sign_flip_exact(d: np.ndarray) -> float:
    """Two-sided p of mean(d) under H0 "d is symmetric about 0", enumerating all 2^S sign flips of d (S,)."""
    n = d.size
    observed = abs(float(d.sum()))
    tol = 1e-9 * max(float(np.abs(d).sum()), 1e-300)  # flips that tie the observed sum up to rounding count
    bits = np.arange(n)
    extreme = 0
    for start in range(0, 1 << n, _CHUNK):
        rows = np.arange(start, min(start + _CHUNK, 1 << n))
        signs = 1.0 - 2.0 * ((rows[:, None] >> bits) & 1)  # (rows, S) of ±1, every pattern once
        extreme += int((np.abs(signs @ d) >= observed - tol).sum())
    return extreme / float(1 << n)


def _sign_flip_monte_carlo(d: np.ndarray, n_resamples: int, rng: np.random.Generator) -> float:
    """Like _sign_flip_exact with `n_resamples` random flips; p = (1 + #extreme) / (1 + B), never 0."""
    observed = abs(float(d.sum()))
    tol = 1e-9 * max(float(np.abs(d).sum()), 1e-300)
    extreme = 0
    for start in range(0, n_resamples, _CHUNK):
        rows = min(_CHUNK, n_resamples - start)
        signs = rng.choice(np.array([-1.0, 1.0]), size=(rows, d.size))  # (rows, S)
        extreme += int((np.abs(signs @ d) >= observed - tol).sum())
    return (1 + extreme) / (1 + n_resamples)


def _bootstrap_interval(diffs: np.ndarray, n_resamples: int, rng: np.random.Generator) -> list[float]:
    """Percentile 95% interval of mean(D) under a two-way bootstrap of D (S, J) over seeds and problems.

    Each resample draws S seeds with replacement and, once, J problem indices with replacement; it keeps the
    cells D[s*, j*] (the same problems for both conditions, since D already pairs them, and for every drawn
    seed, since every seed was scored on the same problems). Its mean is written with the draw counts
    w_s (B, S) and w_j (B, J) as w_s · D · w_jᵀ / (S·J), so no resampled matrix is built.
    """
    n_seeds, n_items = diffs.shape
    means = np.empty(n_resamples)
    chunk = max(1, (1 << 22) // max(n_seeds, n_items))  # about 4M cells (32 MB) per (rows, J) array
    for start in range(0, n_resamples, chunk):
        rows = min(chunk, n_resamples - start)
        w_seed = rng.multinomial(n_seeds, np.full(n_seeds, 1.0 / n_seeds), size=rows)  # (rows, S)
        w_item = rng.multinomial(n_items, np.full(n_items, 1.0 / n_items), size=rows)  # (rows, J)
        means[start : start + rows] = ((w_seed @ diffs) * w_item).sum(axis=1) / (n_seeds * n_items)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return [float(lo), float(hi)]


def _as_per_item(per_item, n_seeds: int, condition: np.ndarray, baseline: np.ndarray) -> np.ndarray:
    """Checks `per_item` against the per-seed scores; returns D = condition - baseline per problem, (S, J)."""
    if not isinstance(per_item, (tuple, list)) or len(per_item) != 2:
        raise KvdistillError(
            f"per_item must be a pair (condition_items, baseline_items), got {type(per_item).__name__}",
            "pass two arrays of shape (n_seeds, n_items)",
        )
    arrays = []
    for name, arr, scores in (("condition", per_item[0], condition), ("baseline", per_item[1], baseline)):
        try:
            arr = np.asarray(arr, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise KvdistillError(f"per_item {name} scores are not numbers ({exc})") from None
        if arr.ndim != 2 or arr.shape[0] != n_seeds or arr.shape[1] == 0:
            raise KvdistillError(
                f"per_item {name} scores have shape {arr.shape}, expected ({n_seeds}, n_items >= 1): "
                f"one row per seed ({n_seeds} seeds), one column per held-out problem",
            )
        bad = np.argwhere(~np.isfinite(arr))
        if bad.size:
            shown = ", ".join(f"[{s}, {j}]" for s, j in bad[:5].tolist())
            raise KvdistillError(
                f"per_item {name} scores have {len(bad)} NaN/inf value(s) at (seed, problem) {shown}"
            )
        row_means = arr.mean(axis=1)
        off = np.flatnonzero(~np.isclose(row_means, scores, rtol=1e-9, atol=1e-9))
        if off.size:
            shown = ", ".join(f"seed [{s}]: {row_means[s]!r} vs {scores[s]!r}" for s in off[:5].tolist())
            raise KvdistillError(
                f"per_item {name} row means differ from the per-seed {name} scores ({shown})",
                "per_item must hold the per-problem scores whose mean over problems is the per-seed score "
                "(e.g. 0/1 exact match per problem with the exact-match rate per seed)",
            )
        arrays.append(arr)
    if arrays[0].shape != arrays[1].shape:
        raise KvdistillError(
            f"per_item condition scores have shape {arrays[0].shape} but baseline scores {arrays[1].shape}",
            "score both conditions on the same held-out problems, in the same order",
        )
    return arrays[0] - arrays[1]  # (S, J)


def paired_comparison(
    condition: Sequence[float],
    baseline: Sequence[float],
    *,
    per_item: tuple[np.ndarray, np.ndarray] | None = None,
    method: str = "auto",
    n_resamples: int = 10000,
    seed: int = 0,
) -> dict:
    """A condition against its baseline, paired by seed.

    Args:
        condition, baseline: one score per seed (S,), in the same seed order; equal lengths, no None/NaN/inf.
        per_item: optional (condition_items, baseline_items), each (S, J): the score of every held-out problem
            for each seed (e.g. 0/1 exact match), the same J problems in the same order for both conditions.
            Each row's mean must equal that seed's score in `condition` / `baseline`.
        method: the permutation test: "exact" enumerates all 2^S sign flips (S <= 20), "monte_carlo" draws
            `n_resamples` of them, "auto" is "exact" for S <= 16 and "monte_carlo" above.
        n_resamples: random sign flips (Monte Carlo) and bootstrap resamples (with per_item).
        seed: seeds the Monte Carlo flips and the bootstrap; the result is a function of the inputs and
            `seed`.

    Returns:
        {"diff": mean(condition - baseline), "ci95": [lo, hi], "p": two-sided p, "n": S,
         "method": "exact" | "monte_carlo" (the test), "interval": "paired_t" | "bootstrap"}, plus
         "n_items": J with per_item.

    The test, with or without per_item, is a sign-flip permutation test of the S per-seed differences d:
    under H0 (condition and baseline training are exchangeable for each seed) each d_s is as likely as -d_s,
    and p is the fraction of the 2^S flips whose |sum| reaches the observed |sum(d)|. Differences of 0 or a
    symmetric set give p = 1; S all-positive differences give the smallest possible p, 2/2^S (0.25 for three
    seeds, 0.0625 for five, 0.03125 for six: below six seeds nothing reaches p < 0.05). Monte Carlo uses
    p = (1 + #extreme) / (1 + B), which is never 0 and valid for a finite B.

    Why seeds and not (seed, problem) pairs with per_item: the seed is what was randomised (the trained
    student); the J problems of one seed are scored by the same two students, so they are not independent
    units. Swapping condition/baseline per (seed, problem) would treat S·J cells as exchangeable, leave the
    seed-to-seed training noise out of the null, and give p-values far too small when that noise dominates,
    answering "did these particular students differ" rather than "does the condition change training".

    The interval is, without per_item, the paired Student-t interval of d (mean ± t_{0.975,S-1}·sd(d)/√S;
    [diff, diff] for S=1). With per_item it is a percentile bootstrap over both sources of variation:
    each resample draws S seeds with replacement and J problems with replacement, the same problem indices
    for both conditions (the per-problem differences are resampled as pairs) and for every drawn seed (the
    problems are crossed with the seeds: every seed was scored on the same problems, so a problem's
    effect on the difference is shared, and redrawing problems independently per seed would average it away
    and understate the problem-sampling variance by up to a factor S). The interval then narrows as J grows
    and reflects a finite held-out set, which the t interval over S per-seed means cannot see.
    """
    cond = _as_scores(condition, "condition")
    base = _as_scores(baseline, "baseline")
    if cond.size != base.size:
        raise KvdistillError(
            f"condition has {cond.size} scores but baseline has {base.size}",
            "pass one score per seed for the same seeds in the same order (every seed trained in both "
            "conditions)",
        )
    if method not in METHODS:
        raise KvdistillError(f"method {method!r} is not one of {', '.join(METHODS)}")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)) or n_resamples < 1:
        raise KvdistillError(f"n_resamples must be a positive integer, got {n_resamples!r}")
    n = cond.size
    test = ("exact" if n <= EXACT_MAX_SEEDS else "monte_carlo") if method == "auto" else method
    if test == "exact" and n > EXACT_LIMIT:
        raise KvdistillError(
            f"method 'exact' enumerates 2^{n} sign flips for {n} seeds (limit {EXACT_LIMIT} seeds)",
            "use method='monte_carlo' or 'auto'",
        )
    diffs_items = None if per_item is None else _as_per_item(per_item, n, cond, base)

    d = cond - base  # (S,)
    rng_flips, rng_boot = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    p = _sign_flip_exact(d) if test == "exact" else _sign_flip_monte_carlo(d, int(n_resamples), rng_flips)
    if diffs_items is None:
        ci95, interval = _t_interval(d), "paired_t"
    else:
        ci95, interval = _bootstrap_interval(diffs_items, int(n_resamples), rng_boot), "bootstrap"
    out = {
        "diff": float(d.mean()),
        "ci95": ci95,
        "p": min(1.0, p),
        "n": int(n),
        "method": test,
        "interval": interval,
    }
    if diffs_items is not None:
        out["n_items"] = int(diffs_items.shape[1])
    return out


def fmt(x: float | None) -> str:
    """A figure as the results' tables write it: 3 decimals (1 from 100 on), '—' for none."""
    if x is None:
        return "—"
    return f"{x:.3f}" if abs(x) < 100 else f"{x:.1f}"
