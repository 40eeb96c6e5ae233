"""`kvdistill quickstart`: two real teachers distilled into a small student, against a CE-only twin.

Both students start from the same initial weights, see the same samples in the same order for the same
number of steps; the only difference is the KV distillation term. Figures are held-out perplexity, exact match
and the per-layer KV probe 1-R² against each teacher (see kvdistill.eval.metrics).
"""

from __future__ import annotations

import json
import time
from importlib.resources import files
from pathlib import Path

from kvdistill.config import load_config
from kvdistill.paths import claim, dir_problem
from kvdistill.train.checkpoint import student_dir


def _row(label: str, result: dict, teachers: list[str]) -> list:
    row = [label, f"{result['perplexity']['ppl']:.2f}", f"{result['exact_match']['exact_match']:.3f}"]
    for name in teachers:
        row.append(f"{result['probe_kv_error'][name]['mean']:.3f}")
    return row


def run_quickstart(out: str | Path, *, steps: int | None = None, overrides: list[str] | None = None) -> dict:
    from kvdistill.data import load_records
    from kvdistill.eval.metrics import TeacherRowsCache
    from kvdistill.eval.report import write_report
    from kvdistill.eval.run import evaluate_student
    from kvdistill.models import zoo
    from kvdistill.models.load import load_model
    from kvdistill.student import build_student
    from kvdistill.train.trainer import train

    t0 = time.time()
    out = Path(out)
    problem = dir_problem(out, "quickstart", legacy=("kd", "ce-only"))
    if problem:
        raise problem
    claim(out, "quickstart")
    zoo.fetch_all(["smollm2-135m", "gemma3-270m", "gpt2-tokenizer"])  # one-time GGUF conversion
    extra = list(overrides or []) + ([f"train.steps={steps}"] if steps else [])
    cfg = load_config(files("kvdistill") / "configs" / "quickstart.yaml", extra)
    ce_cfg = cfg.model_copy(update={"name": "ce-only", "teachers": []})
    ce_cfg = load_config(raw={**ce_cfg.model_dump(mode="json"), "losses": {"ce": cfg.losses.ce, "kv": {"weight": 0}}})

    runs = {"kd": out / "kd", "ce-only": out / "ce-only"}
    for name, run_cfg in (("kd", cfg), ("ce-only", ce_cfg)):
        if not (runs[name] / "summary.json").is_file():
            resume = (runs[name] / "config.yaml").is_file()  # a started run (checkpoint or not) resumes
            train(run_cfg, runs[name], resume=resume)

    teachers = {t.name: load_model(t.model, attn_implementation="sdpa") for t in cfg.teachers}
    fit = load_records(cfg.data, split="train")[:32]
    held = load_records(cfg.data, split="eval")
    cache = TeacherRowsCache()  # each teacher's K/V on fit and held captured once for the three students
    init_student, init_tok = build_student(cfg.student, seed=cfg.train.seed)
    results = {"init": evaluate_student(init_student, init_tok, teachers, fit, held, max_length=cfg.data.max_length,
                                        teacher_cache=cache)}
    for name, run_dir in runs.items():
        model, tok = load_model(str(student_dir(run_dir / "final")), attn_implementation="sdpa")
        results[name] = evaluate_student(model, tok, teachers, fit, held, max_length=cfg.data.max_length,
                                         teacher_cache=cache)
    del cache

    names = list(teachers)
    header = ["student", "held-out ppl", "exact match"] + [f"KV probe 1-R² vs {n}" for n in names]
    rows = [_row("untrained init", results["init"], names), _row("CE only", results["ce-only"], names),
            _row("KV distilled", results["kd"], names)]
    layer_header = ["teacher", "student layer", "init", "CE only", "KV distilled"]
    layer_rows = []
    for n in names:
        for i, (a, b, c) in enumerate(zip(results["init"]["probe_kv_error"][n]["layers"],
                                          results["ce-only"]["probe_kv_error"][n]["layers"],
                                          results["kd"]["probe_kv_error"][n]["layers"], strict=True)):
            layer_rows.append([n, str(i), f"{a:.3f}", f"{b:.3f}", f"{c:.3f}"])
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    summary = {
        "config": cfg.name,
        "steps": cfg.train.steps,
        "held_out_samples": len(held),
        "results": results,
        "before_after": {"header": header, "rows": rows},
        "kv_error_per_layer": {"header": layer_header, "rows": layer_rows},
        "table_markdown": "\n".join(md),
        "elapsed_s": round(time.time() - t0, 1),
    }
    write_report([runs["kd"], runs["ce-only"]], out / "report.md", title="kvdistill quickstart",
                 extra_tables=[("Before / after (held-out)", header, rows),
                               ("KV probe 1-R² per student layer", layer_header, layer_rows)])
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
