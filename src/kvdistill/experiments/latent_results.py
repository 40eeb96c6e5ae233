"""The results of latent-reasoning conditions (`kvdistill.student.latent`) beside the common ones of
`kvdistill.experiments.results`: the swap probe (does a latent student's answer read its latents?) and the
stability of the latent K/V error (KaVa's third question), their summaries over seeds and results.md tables.
"""

from __future__ import annotations

import numpy as np

from kvdistill.experiments.stats import fmt, paired_comparison, summary

__all__ = ["latent_kv_stability", "latent_swap", "latent_tables"]


def latent_swap(evals: dict[str, list[dict]]) -> dict:
    """The swap probe of the latent conditions (every seed's eval.json holds swap_per_item): {condition:
    {exact_match, swap_exact_match, swap_follows: summaries over seeds, drop: the paired difference
    swapped − own latents (bootstrap over seeds and problems)}}."""
    out = {}
    for n, runs in evals.items():
        if not runs or not all(e.get("swap_per_item") is not None for e in runs):
            continue
        own = np.array([e["per_item"] for e in runs], dtype=float)  # (S, J)
        swapped = np.array([e["swap_per_item"] for e in runs], dtype=float)  # (S, J), the same J problems
        out[n] = {
            "exact_match": summary([e["exact_match"] for e in runs]),
            "swap_exact_match": summary([e["swap_exact_match"] for e in runs]),
            "swap_follows": summary([e["swap_follows"] for e in runs]),
            "drop": paired_comparison(
                [e["swap_exact_match"] for e in runs],
                [e["exact_match"] for e in runs],
                per_item=(swapped, own),
            ),
        }
    return out


def latent_kv_stability(curves: dict[str, dict]) -> dict:
    """KaVa's stability question from the held-out curves of the latent conditions (every seed logged the
    latent K/V error, summed over its targets): {condition: {"final": the last evaluation's L_KV over
    seeds, "largest_rise": per seed the largest rise of L_KV from one evaluation to the next (0 for a curve
    that never rose), over seeds}}, each a `summary`."""
    out = {}
    for n, curve in curves.items():
        per_seed = [
            [sum(p["latent_kv"].values()) for p in points if "latent_kv" in p]
            for points in curve["per_seed"].values()
        ]
        if not per_seed or not all(per_seed):
            continue
        rises = [max([0.0] + [b - a for a, b in zip(v[:-1], v[1:], strict=True)]) for v in per_seed]
        out[n] = {"final": summary([v[-1] for v in per_seed]), "largest_rise": summary(rises)}
    return out


def latent_tables(results: dict) -> list[str]:
    """results.md's sections of the latent conditions (none where the results hold neither)."""
    return _swap_table(results.get("latent_swap")) + _stability_table(results.get("latent_kv_stability"))


def _swap_table(swap: dict | None) -> list[str]:
    """results.md's swap-probe section (results["latent_swap"]); none without latent conditions."""
    if not swap:
        return []
    lines = [
        "## Do the latent students' answers read their latents? (swap probe)",
        "",
        "Each test question answered from another question's latents (one with another answer): an "
        "answer that ignores the latents is unchanged; one read from them follows the other question's "
        "answer.",
        "",
        "| condition | exact match | with swapped latents | swapped − own (95% CI) | p | answers the "
        "other question's |",
        "|---|---|---|---|---|---|",
    ]
    for n, v in swap.items():
        d = v["drop"]
        lines.append(
            f"| {n} | {fmt(v['exact_match']['mean'])} | {fmt(v['swap_exact_match']['mean'])} | "
            f"{fmt(d['diff'])} [{fmt(d['ci95'][0])}, {fmt(d['ci95'][1])}] | {d['p']:.3g} | "
            f"{fmt(v['swap_follows']['mean'])} |"
        )
    return lines + [""]


def _stability_table(stability: dict | None) -> list[str]:
    """results.md's section on the latent K/V error's stability (results["latent_kv_stability"])."""
    if not stability:
        return []
    lines = [
        "## Held-out latent K/V error (L_KV summed over its targets): how stable each target is",
        "",
        "| condition | last evaluation, mean ± std | per seed | largest rise between two evaluations, "
        "mean (max over seeds) |",
        "|---|---|---|---|",
    ]
    for n, v in stability.items():
        f, r = v["final"], v["largest_rise"]
        lines.append(
            f"| {n} | {fmt(f['mean'])} ± {fmt(f['std'])} | {', '.join(fmt(x) for x in f['values'])} | "
            f"{fmt(r['mean'])} ({fmt(max(r['values']))}) |"
        )
    return lines + [""]
