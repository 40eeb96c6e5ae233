"""`kvdistill quickstart`: the packaged experiment spec `quickstart` (configs/experiments/quickstart.yaml) run
by the experiment runner, and its before/after table.

Two real teachers used as given are distilled into a small student, against a CE-only twin: both students
start from the same initial weights and see the same samples in the same order for the same number of steps;
the only difference is the KV distillation term. The runner scores both and the untrained student (eval.init)
through the one evaluation path: held-out perplexity, exact match and the per-layer KV probe 1-R² against each
teacher (eval.probe; see kvdistill.eval.metrics). DIR holds what any experiment leaves (runs/, init/,
results.json, ...) and the quickstart's own summary.json and report.md.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from kvdistill.atomic import write_json_atomic

ROWS = (("untrained init", "init"), ("CE only", "ce-only"), ("KV distilled", "kd"))  # table row: its record


def _row(label: str, record: dict, teachers: list[str]) -> list:
    row = [label, f"{record['ppl']:.2f}", f"{record['exact_match']:.3f}"]
    for name in teachers:
        row.append(f"{record['probe_kv_error'][name]['mean']:.3f}")
    return row


def run_quickstart(out: str | Path, *, steps: int | None = None, overrides: list[str] | None = None) -> dict:
    """Run (or resume) the quickstart spec into `out`; `steps`: the students' train.steps, `overrides`: dotted
    overrides of both runs. Returns the summary also written to DIR/summary.json."""
    from kvdistill.eval.report import write_report
    from kvdistill.experiments.runner import run_dir, run_experiment
    from kvdistill.experiments.spec import load_spec
    from kvdistill.models import zoo

    t0 = time.time()
    out = Path(out)
    raw = load_spec("quickstart").model_dump(mode="json")
    if steps:
        raw["budget"]["steps"] = steps
    for cond in raw["conditions"].values():
        cond["overrides"] += list(overrides or [])
    spec = load_spec(raw)
    zoo.fetch_all(["smollm2-135m", "gemma3-270m", "gpt2-tokenizer"])  # one-time GGUF conversion
    results = run_experiment(spec, out)
    seed = spec.seeds[0]
    dirs = {
        "init": out / "init" / f"seed-{seed}",
        "ce-only": run_dir(out, "ce-only", seed),
        "kd": run_dir(out, "kd", seed),
    }
    records = {name: json.loads((d / "eval.json").read_text()) for name, d in dirs.items()}

    names = [t.name for t in spec.teachers]
    header = ["student", "held-out ppl", "exact match"] + [f"KV probe 1-R² vs {n}" for n in names]
    rows = [_row(label, records[key], names) for label, key in ROWS]
    layer_header = ["teacher", "student layer", "init", "CE only", "KV distilled"]
    layer_rows = []
    for n in names:
        per_layer = [records[key]["probe_kv_error"][n]["layers"] for _, key in ROWS]
        for i, (a, b, c) in enumerate(zip(*per_layer, strict=True)):
            layer_rows.append([n, str(i), f"{a:.3f}", f"{b:.3f}", f"{c:.3f}"])
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    summary = {
        "config": spec.base,
        "steps": results["steps"]["kd"],
        "held_out_samples": len(results["test_ids"]),
        "results": records,
        "before_after": {"header": header, "rows": rows},
        "kv_error_per_layer": {"header": layer_header, "rows": layer_rows},
        "table_markdown": "\n".join(md),
        "elapsed_s": round(time.time() - t0, 1),
    }
    write_report(
        [dirs["kd"], dirs["ce-only"]],
        out / "report.md",
        title="kvdistill quickstart",
        extra_tables=[
            ("Before / after (held-out)", header, rows),
            ("KV probe 1-R² per student layer", layer_header, layer_rows),
        ],
    )
    write_json_atomic(out / "summary.json", summary)
    return summary
