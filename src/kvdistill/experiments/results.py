"""Collect an experiment's evaluations into results.json, results.md and plots.

results.json:
    {"spec": NAME, "baseline": NAME, "seeds": [...],
     "conditions": {NAME: {METRIC: {"values": [...], "mean": x, "std": x, "ci95": [lo, hi]}}},
     "comparisons": [{"condition": NAME, "baseline": NAME, "metric": METRIC, "diff": x, "ci95": [lo, hi], "p": x,
                      "n": seeds, "method": ...}],
     "teachers": {NAME: {"exact_match": x, "ppl": x, "params": n}},
     "steps": {NAME: steps},
     "extraction": {TEACHER: {"seconds": x, "tokens": n, "records": n}}}   (cache: true conditions only)
Exact match is compared with a paired bootstrap over seeds and held-out problems (every student answers the same
problems); the other metrics over seeds (`kvdistill.experiments.stats.paired_comparison`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kvdistill.cache.manifest import write_json_atomic
from kvdistill.experiments.spec import HIGHER_IS_BETTER, METRICS, ExperimentSpec
from kvdistill.experiments.stats import paired_comparison, summary


def _eval(out: Path, name: str, seed: int) -> dict:
    return json.loads((out / "runs" / name / f"seed-{seed}" / "eval.json").read_text())


def collect(spec: ExperimentSpec, out: Path, names: list[str], seeds: list[int], teachers: dict) -> dict:
    evals = {n: [_eval(out, n, s) for s in seeds] for n in names}
    conditions = {n: {m: summary([e[m] for e in evals[n]]) for m in spec.metrics} for n in names}
    comparisons = []
    for n in names:
        if n == spec.baseline:
            continue
        for m in spec.metrics:
            per_item = None
            if m == "exact_match":
                per_item = (np.array([e["per_item"] for e in evals[n]], dtype=float),
                            np.array([e["per_item"] for e in evals[spec.baseline]], dtype=float))
            cmp = paired_comparison([e[m] for e in evals[n]], [e[m] for e in evals[spec.baseline]],
                                    per_item=per_item)
            comparisons.append({"condition": n, "baseline": spec.baseline, "metric": m, **cmp})
    return {"spec": spec.name, "baseline": spec.baseline, "seeds": seeds, "conditions": conditions,
            "comparisons": comparisons,
            "teachers": {k: {x: v.get(x) for x in ("exact_match", "ppl", "params")} for k, v in teachers.items()},
            "steps": {n: evals[n][0].get("steps") for n in names},
            "held_out": len(evals[names[0]][0].get("per_item", [])) or None}


def _fmt(x) -> str:
    if x is None:
        return "—"
    return f"{x:.3f}" if abs(x) < 100 else f"{x:.1f}"


def markdown(results: dict, spec: ExperimentSpec) -> str:
    lines = [f"# Experiment `{results['spec']}`", "",
             f"Seeds {results['seeds']}; baseline `{results['baseline']}`; held-out problems: {results['held_out']}.",
             ""]
    if results["teachers"]:
        lines += ["## Teachers", "", "| teacher | exact match | ppl | parameters |", "|---|---|---|---|"]
        lines += [f"| {k} | {_fmt(v['exact_match'])} | {_fmt(v['ppl'])} | {v['params']:,} |"
                  for k, v in results["teachers"].items()]
        lines.append("")
    if results.get("extraction"):
        lines += ["## Teacher caches (extracted once, shared by every cached condition and seed)", "",
                  "| teacher | seconds | tokens | records |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['seconds']:.1f} | {v['tokens']:,} | {v['records']:,} |"
                  for k, v in results["extraction"].items()]
        lines.append("")
    for m in spec.metrics:
        arrow = "higher is better" if HIGHER_IS_BETTER[m] else "lower is better"
        lines += [f"## {METRICS[m]} ({arrow})", "", "| condition | steps | mean ± std | 95% CI | per seed |",
                  "|---|---|---|---|---|"]
        for n, per in results["conditions"].items():
            s = per[m]
            lines.append(f"| {n} | {results['steps'][n]} | {_fmt(s['mean'])} ± {_fmt(s['std'])} | "
                         f"[{_fmt(s['ci95'][0])}, {_fmt(s['ci95'][1])}] | {', '.join(_fmt(v) for v in s['values'])} |")
        rows = [c for c in results["comparisons"] if c["metric"] == m]
        if rows:
            lines += ["", f"Paired difference against `{results['baseline']}` (condition − baseline):", "",
                      "| condition | diff | 95% CI | p | method |", "|---|---|---|---|---|"]
            lines += [f"| {c['condition']} | {_fmt(c['diff'])} | [{_fmt(c['ci95'][0])}, {_fmt(c['ci95'][1])}] | "
                      f"{c['p']:.3g} | {c['method']} |" for c in rows]
        lines.append("")
    return "\n".join(lines)


def plots(results: dict, spec: ExperimentSpec, out: Path) -> list[Path]:
    """Bars with 95% error bars per metric, and held-out perplexity against step per condition (mean over seeds)."""
    from matplotlib.figure import Figure

    folder = out / "plots"
    folder.mkdir(exist_ok=True)
    written = []
    names = list(results["conditions"])
    for m in spec.metrics:
        fig = Figure(figsize=(1.2 + 0.9 * len(names), 3.2))
        ax = fig.add_subplot()
        means = [results["conditions"][n][m]["mean"] for n in names]
        lo = [means[i] - results["conditions"][n][m]["ci95"][0] for i, n in enumerate(names)]
        hi = [results["conditions"][n][m]["ci95"][1] - means[i] for i, n in enumerate(names)]
        ax.bar(range(len(names)), means, yerr=[lo, hi], capsize=4, color="#8fb3d9")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_title(METRICS[m])
        fig.tight_layout()
        path = folder / f"{m}.png"
        fig.savefig(path, dpi=110)
        written.append(path)
    curves = _curves(out, names, results["seeds"])
    if curves:
        fig = Figure(figsize=(6, 3.6))
        ax = fig.add_subplot()
        for n, (steps, ppl) in curves.items():
            ax.plot(steps, ppl, marker="o", label=n)
        ax.set_xlabel("step")
        ax.set_ylabel("held-out perplexity")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = folder / "learning_curves.png"
        fig.savefig(path, dpi=110)
        written.append(path)
    return written


def _curves(out: Path, names: list[str], seeds: list[int]) -> dict[str, tuple[list[int], list[float]]]:
    """Per condition, the held-out perplexity logged during training (train.eval_every), mean over seeds."""
    curves = {}
    for n in names:
        by_step: dict[int, list[float]] = {}
        for s in seeds:
            path = out / "runs" / n / f"seed-{s}" / "metrics.jsonl"
            for line in path.read_text().splitlines() if path.is_file() else []:
                row = json.loads(line)
                if row.get("split") == "eval" and "eval/ppl" in row:
                    by_step.setdefault(int(row["step"]), []).append(float(row["eval/ppl"]))
        full = sorted(k for k, v in by_step.items() if len(v) == len(seeds))
        if full:
            curves[n] = (full, [float(np.mean(by_step[k])) for k in full])
    return curves


def write_results(results: dict, spec: ExperimentSpec, out: Path) -> None:
    write_json_atomic(out / "results.json", results)
    figures = plots(results, spec, out)
    md = markdown(results, spec) + "\n" + "\n".join(f"![{p.stem}](plots/{p.name})" for p in figures) + "\n"
    (out / "results.md").write_text(md)
