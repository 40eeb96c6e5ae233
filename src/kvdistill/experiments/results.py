"""Collect an experiment's evaluations into results.json, results.md and plots.

results.json:
    {"spec": NAME, "baseline": NAME, "seeds": [...],
     "metrics": [METRIC, ...],      spec.metrics, then exact_match_<skill>, routing_acc, routing_acc_<skill>
                                    where the held-out set mixes skills (a condition reports those all its
                                    seeds have)
     "conditions": {NAME: {METRIC: {"values": [...], "mean": x, "std": x, "ci95": [lo, hi]}}},
     "comparisons": [{"condition": NAME, "baseline": NAME, "metric": METRIC, "diff": x, "ci95": [lo, hi],
                      "p": x, "n": seeds, "method": ...}],
     "teachers": {NAME: {"exact_match": x, "ppl": x, "params": n, "exact_match_<skill>": x, ...}},
     "routing_curves": {NAME: {"steps": [...], "routing_acc": [...]}}   (held out during training, mean over
                                                                        seeds)
     "steps": {NAME: steps},
     "runs": {NAME: [{"seed", "steps", "steps_trained", "selected_step", "stopped_early", "scored", "train_s",
                      "elapsed_s", "flops", "flops_selected", "amortised_s", "amortised_flops"}]},
     "curves": {NAME: {"per_seed": {SEED: [{"step", "flops", "train_s", "ce", "ppl", "exact_match"
                                            [, "latent_kv"]}]},
                       "mean": [{"step", "flops", "ce", "ppl", "exact_match"[, "latent_kv": summed over
                                 its targets]}]}},   held-out (validation) curves
     "extraction": {TEACHER: {"seconds", "tokens", "records", "flops", "readers", "runs",
                              "seconds_per_reader", "flops_per_reader"}},   (cache: true conditions only)
     "latent_swap": {NAME: {"exact_match", "swap_exact_match", "swap_follows", "drop"}},   latent students:
                                                        the swap probe (`experiments.latent_results`)
     "latent_kv_stability": {NAME: {"final", "largest_rise"}}}   latent students with L_KV targets
                                                                 (`experiments.latent_results`)
FLOPs: (6·N_s + 2·Σ N_t over online teachers) per student token (`matching.flops_per_token`) times the tokens
trained (a curve point: the run's mean tokens per step times its step), plus an on-policy run's sampling
(`matching.generation`) and for a cached condition its amortised share of the extractions
(`kvdistill.experiments.budget`: Σ_t flops_t / R_t).
Exact match is compared with a paired bootstrap over seeds and held-out problems (every student answers the
same problems); the other metrics over seeds (`kvdistill.experiments.stats.paired_comparison`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kvdistill.atomic import write_json_atomic, write_text_atomic
from kvdistill.eval.skills import skill_items
from kvdistill.experiments.latent_results import latent_kv_stability, latent_swap, latent_tables
from kvdistill.experiments.spec import PER_SKILL, ExperimentSpec, higher_is_better, metric_label
from kvdistill.experiments.stats import fmt, paired_comparison, summary


def _eval(out: Path, name: str, seed: int) -> dict:
    return json.loads((out / "runs" / name / f"seed-{seed}" / "eval.json").read_text())


def metrics_of(spec: ExperimentSpec, evals: dict[str, list[dict]]) -> list[str]:
    """spec.metrics, then the per-skill metrics the evaluations hold (a held-out set mixing skills):
    exact_match_<skill>, then routing_acc and routing_acc_<skill>."""
    extra = {
        k for runs in evals.values() for e in runs for k in e if k.startswith(PER_SKILL) and k != "per_item"
    }
    return list(spec.metrics) + sorted(
        extra, key=lambda k: (k.startswith("routing_acc"), k != "routing_acc", k)
    )


def _items(e: dict, metric: str) -> list:
    """The per-problem results a metric averages: all of them, or those of one skill (exact_match_<skill>)."""
    if metric == "exact_match":
        return e["per_item"]
    return skill_items(e["per_item"], e["skills"], metric.removeprefix("exact_match_"))


def collect(spec: ExperimentSpec, out: Path, names: list[str], seeds: list[int], teachers: dict) -> dict:
    evals = {n: [_eval(out, n, s) for s in seeds] for n in names}
    metrics = metrics_of(spec, evals)
    # a condition reports a metric all its seeds have (routing accuracy: router and similarity conditions
    # only)
    conditions = {
        n: {
            m: summary([e[m] for e in evals[n]])
            for m in metrics
            if all(e.get(m) is not None for e in evals[n])
        }
        for n in names
    }
    comparisons = []
    pairs = [(n, spec.baseline) for n in names if n != spec.baseline]
    pairs += [
        (a, b) for a, b in spec.compare if a in evals and b in evals and (a, b) not in pairs
    ]  # spec.compare
    for n, ref in pairs:
        for m in metrics:
            if m not in conditions[n] or m not in conditions[ref]:
                continue
            per_item = None
            if m == "exact_match" or m.startswith("exact_match_"):
                per_item = (
                    np.array([_items(e, m) for e in evals[n]], dtype=float),
                    np.array([_items(e, m) for e in evals[ref]], dtype=float),
                )
            cmp = paired_comparison([e[m] for e in evals[n]], [e[m] for e in evals[ref]], per_item=per_item)
            comparisons.append({"condition": n, "baseline": ref, "metric": m, **cmp})
    run_keys = (
        "steps",
        "steps_trained",
        "selected_step",
        "stopped_early",
        "scored",
        "train_s",
        "elapsed_s",
        "flops",
        "flops_selected",
        "amortised_s",
        "amortised_flops",
    )
    runs = {
        n: [{"seed": s, **{k: e.get(k) for k in run_keys}} for s, e in zip(seeds, evals[n], strict=True)]
        for n in names
    }
    results = {
        "spec": spec.name,
        "baseline": spec.baseline,
        "seeds": seeds,
        "metrics": metrics,
        "conditions": conditions,
        "comparisons": comparisons,
        "teachers": {
            k: {
                **{x: v.get(x) for x in ("exact_match", "ppl", "params")},
                **{x: y for x, y in sorted(v.items()) if x.startswith("exact_match_")},
            }
            for k, v in teachers.items()
        },
        "steps": {n: evals[n][0].get("steps") for n in names},
        "runs": runs,
        "curves": {n: curves_of(out, n, seeds, evals[n]) for n in names},
        "held_out": len(evals[names[0]][0].get("per_item", [])) or None,
    }
    swap = latent_swap(evals)
    if swap:
        results["latent_swap"] = swap
    stability = latent_kv_stability(results["curves"])
    if stability:
        results["latent_kv_stability"] = stability
    routing = _curves(out, names, seeds, "eval/routing_acc")
    if routing:
        results["routing_curves"] = {n: {"steps": st, "routing_acc": v} for n, (st, v) in routing.items()}
    return results


def curves_of(out: Path, name: str, seeds: list[int], evals: list[dict]) -> dict:
    """The held-out (validation) curve of each run of condition `name` from its metrics.jsonl eval rows, with
    FLOPs (module docstring) and training seconds per point, and their mean over the seeds at the steps every
    seed reached (runs that stopped early end sooner)."""
    per_seed: dict[str, list[dict]] = {}
    for s, ev in zip(seeds, evals, strict=True):
        path = out / "runs" / name / f"seed-{s}" / "metrics.jsonl"
        tokens, steps = ev.get("tokens"), ev.get("steps_trained")
        per_token = ev["train_flops"] / tokens if ev.get("train_flops") is not None and tokens else None
        rows: dict[int, dict] = {}
        for line in path.read_text().splitlines() if path.is_file() else []:
            row = json.loads(line)
            if row.get("split") != "eval" or "eval/ce" not in row:
                continue
            step = int(row["step"])
            flops = (
                None
                if per_token is None or not steps
                else per_token * tokens / steps * step + (ev.get("amortised_flops") or 0.0)
            )
            rows[step] = {
                "step": step,
                "flops": flops,
                "train_s": row.get("train_s"),
                "ce": row["eval/ce"],
                "ppl": row.get("eval/ppl"),
                "exact_match": row.get("eval/exact_match"),
            }
            latent_kv = {
                k.removeprefix("eval/latent_kv/"): v
                for k, v in row.items()
                if k.startswith("eval/latent_kv/")
            }
            if latent_kv:  # a latent student's held-out K/V error per teacher (the stability of E2-E4)
                rows[step]["latent_kv"] = latent_kv
        per_seed[str(s)] = [rows[k] for k in sorted(rows)]
    common = (
        sorted(set.intersection(*(set(r["step"] for r in v) for v in per_seed.values()))) if per_seed else []
    )
    mean = []
    for step in common:
        point = {"step": step}
        for key in ("flops", "ce", "ppl", "exact_match"):
            vals = [r[key] for v in per_seed.values() for r in v if r["step"] == step and r[key] is not None]
            point[key] = float(np.mean(vals)) if len(vals) == len(per_seed) else None
        kv = [
            sum(r["latent_kv"].values())
            for v in per_seed.values()
            for r in v
            if r["step"] == step and "latent_kv" in r
        ]
        if kv and len(kv) == len(per_seed):
            point["latent_kv"] = float(np.mean(kv))  # summed over the targets
        mean.append(point)
    return {"per_seed": per_seed, "mean": mean}


def markdown(results: dict, spec: ExperimentSpec) -> str:
    lines = [
        f"# Experiment `{results['spec']}`",
        "",
        f"Seeds {results['seeds']}; baseline `{results['baseline']}`; held-out problems: "
        f"{results['held_out']}.",
        "",
    ]
    if results.get("unscored"):  # `kvdistill experiment --report` of an unfinished experiment
        lines += [
            f"Report of the scored runs only; not scored (their conditions left out): "
            f"{', '.join(results['unscored'])}.",
            "",
        ]
    if results["teachers"]:
        skills = sorted({k for v in results["teachers"].values() for k in v if k.startswith("exact_match_")})
        lines += [
            "## Teachers",
            "",
            "| teacher | exact match | " + "".join(f"{k} | " for k in skills) + "ppl | parameters |",
            "|---|---|" + "---|" * len(skills) + "---|---|",
        ]
        lines += [
            f"| {k} | {fmt(v['exact_match'])} | "
            + "".join(f"{fmt(v.get(x))} | " for x in skills)
            + f"{fmt(v['ppl'])} | {v['params']:,} |"
            for k, v in results["teachers"].items()
        ]
        lines.append("")
    if results.get("extraction"):
        lines += [
            "## Teacher caches (extracted once, only the records the cached runs read)",
            "",
            "Each run reading teacher t's cache is charged seconds_t / R_t and FLOPs_t / R_t (R_t: the runs "
            "reading it; FLOPs_t = 2 · N_t · tokens extracted).",
            "",
            "| teacher | seconds | tokens | records | FLOPs | readers R_t | s per reader | FLOPs per reader "
            "|",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {k} | {v['seconds']:.1f} | {v['tokens']:,} | {v['records']:,} | {v.get('flops', 0):.3g} | "
            f"{v.get('readers', '—')} | {v.get('seconds_per_reader', 0):.2f} | "
            f"{v.get('flops_per_reader', 0):.3g} |"
            for k, v in results["extraction"].items()
        ]
        lines.append("")
    if results.get("runs"):
        lines += [
            "## Runs (median over seeds)",
            "",
            "| condition | train records | steps | steps trained | selected step | train s | FLOPs |",
            "|---|---|---|---|---|---|---|",
        ]
        for n, rows in results["runs"].items():

            def med(key, rows=rows):
                vals = [r[key] for r in rows if r.get(key) is not None]
                return float(np.median(vals)) if vals else None

            records = (results.get("train_records") or {}).get(n, "—")
            lines.append(
                f"| {n} | {records} | {results['steps'][n]} | {med('steps_trained'):g} | "
                f"{med('selected_step'):g} | {med('train_s'):.1f} | "
                f"{(med('flops') or 0):.3g} |"
            )
        lines.append("")
    for m in results.get("metrics", spec.metrics):
        arrow = "higher is better" if higher_is_better(m) else "lower is better"
        lines += [
            f"## {metric_label(m)} ({arrow})",
            "",
            "| condition | steps | mean ± std | 95% CI | per seed |",
            "|---|---|---|---|---|",
        ]
        for n, per in results["conditions"].items():
            if m not in per:
                continue
            s = per[m]
            lines.append(
                f"| {n} | {results['steps'][n]} | {fmt(s['mean'])} ± {fmt(s['std'])} | "
                f"[{fmt(s['ci95'][0])}, {fmt(s['ci95'][1])}] | {', '.join(fmt(v) for v in s['values'])} |"
            )
        rows = [c for c in results["comparisons"] if c["metric"] == m]
        if rows:
            lines += [
                "",
                "Paired differences (condition − reference):",
                "",
                "| condition | reference | diff | 95% CI | p | method |",
                "|---|---|---|---|---|---|",
            ]
            lines += [
                f"| {c['condition']} | {c['baseline']} | {fmt(c['diff'])} | "
                f"[{fmt(c['ci95'][0])}, {fmt(c['ci95'][1])}] | {c['p']:.3g} | {c['method']} |"
                for c in rows
            ]
        lines.append("")
    lines += latent_tables(results)
    if results.get("routing_curves"):
        lines += [
            "## Routing accuracy during training (held out, mean over seeds)",
            "",
            "| condition | "
            + " | ".join(f"step {st}" for st in next(iter(results["routing_curves"].values()))["steps"])
            + " |",
        ]
        lines.append("|---|" + "---|" * len(next(iter(results["routing_curves"].values()))["steps"]))
        lines += [
            f"| {n} | " + " | ".join(fmt(v) for v in c["routing_acc"]) + " |"
            for n, c in results["routing_curves"].items()
        ]
        lines.append("")
    return "\n".join(lines)


def plots(results: dict, spec: ExperimentSpec, out: Path) -> list[Path]:
    """Bars with 95% error bars per metric, and held-out perplexity against step per condition (mean over
    seeds)."""
    from matplotlib.figure import Figure

    folder = out / "plots"
    folder.mkdir(exist_ok=True)
    written = []
    for m in results.get("metrics", spec.metrics):
        names = [n for n in results["conditions"] if m in results["conditions"][n]]
        fig = Figure(figsize=(1.2 + 0.9 * len(names), 3.2))
        ax = fig.add_subplot()
        means = [results["conditions"][n][m]["mean"] for n in names]
        lo = [means[i] - results["conditions"][n][m]["ci95"][0] for i, n in enumerate(names)]
        hi = [results["conditions"][n][m]["ci95"][1] - means[i] for i, n in enumerate(names)]
        ax.bar(range(len(names)), means, yerr=[lo, hi], capsize=4, color="#8fb3d9")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_title(metric_label(m))
        fig.tight_layout()
        path = folder / f"{m}.png"
        fig.savefig(path, dpi=110)
        written.append(path)
    names = list(results["conditions"])
    for key, label, log, file in (
        ("eval/ppl", "held-out perplexity", True, "learning_curves.png"),
        ("eval/routing_acc", "routing accuracy (held out)", False, "routing_curves.png"),
    ):
        curves = _curves(out, names, results["seeds"], key)
        if not curves:
            continue
        fig = Figure(figsize=(6, 3.6))
        ax = fig.add_subplot()
        for n, (steps, values) in curves.items():
            ax.plot(steps, values, marker="o", label=n)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("log")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = folder / file
        fig.savefig(path, dpi=110)
        written.append(path)
    for metric, label in (
        ("ce", "held-out CE"),
        ("exact_match", "held-out exact match"),
        ("latent_kv", "held-out latent K/V error"),
    ):
        for axis in ("step", "flops"):
            path = _curve_plot(results, names, metric, axis, label, folder)
            if path is not None:
                written.append(path)
    return written


def _curves(
    out: Path, names: list[str], seeds: list[int], key: str = "eval/ppl"
) -> dict[str, tuple[list[int], list[float]]]:
    """Per condition, a held-out figure logged during training (train.eval_every), mean over seeds."""
    curves = {}
    for n in names:
        # step -> seed -> value; the last logged wins (the final evaluation repeats a step that eval_every
        # divides)
        by_step: dict[int, dict[int, float]] = {}
        for s in seeds:
            path = out / "runs" / n / f"seed-{s}" / "metrics.jsonl"
            for line in path.read_text().splitlines() if path.is_file() else []:
                row = json.loads(line)
                if row.get("split") == "eval" and key in row:
                    by_step.setdefault(int(row["step"]), {})[s] = float(row[key])
        full = sorted(k for k, v in by_step.items() if len(v) == len(seeds))
        if full:
            curves[n] = (full, [float(np.mean(list(by_step[k].values()))) for k in full])
    return curves


def _curve_plot(
    results: dict, names: list[str], metric: str, axis: str, label: str, folder: Path
) -> Path | None:
    """Mean held-out `metric` against `axis` (step or FLOPs), one line per condition; None with no points."""
    from matplotlib.figure import Figure

    lines = {
        n: [
            (p[axis], p[metric])
            for p in results["curves"][n]["mean"]
            if p.get(axis) is not None and p.get(metric) is not None
        ]
        for n in names
    }
    lines = {n: v for n, v in lines.items() if v}
    if not lines:
        return None
    fig = Figure(figsize=(6.4, 3.8))
    ax = fig.add_subplot()
    for n, pts in lines.items():
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", markersize=3, label=n)
    ax.set_xlabel("step" if axis == "step" else "training FLOPs")
    if axis == "flops":
        ax.set_xscale("log")
    ax.set_ylabel(label)
    ax.legend(fontsize=6)
    fig.tight_layout()
    path = folder / f"curve_{metric}_{axis}.png"
    fig.savefig(path, dpi=110)
    return path


def write_results(results: dict, spec: ExperimentSpec, out: Path) -> None:
    """results.json, results.md, then the plots and results.md again with them: the tables are on disk before
    the plots start (matplotlib's first import on a fresh machine builds its font cache; a time limit there
    once cut a GPU call's results.md off)."""
    write_json_atomic(out / "results.json", results)
    tables = markdown(results, spec) + "\n"
    write_text_atomic(out / "results.md", tables)
    figures = plots(results, spec, out)
    write_text_atomic(
        out / "results.md", tables + "\n".join(f"![{p.stem}](plots/{p.name})" for p in figures) + "\n"
    )
