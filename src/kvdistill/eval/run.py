"""`kvdistill eval`: evaluate a saved student on held-out data, optionally against teachers, through the one
evaluation path (`kvdistill.eval.student.evaluate_saved`, as the experiment runner and the quickstart).

CHECKPOINT is one of (`kvdistill.rundir.resolve_checkpoint`)
- a run directory (it holds config.yaml): its final student, else the student of its latest checkpoint;
- a checkpoint directory, RUN/final or RUN/checkpoints/step-N (it holds student/);
- a student directory (it holds config.json), or any name `load_model` accepts (zoo name, hub id).
For the first three, the run's config.yaml gives the held-out data (the eval split of the run's data) and the
teachers; `--data`, `--size`, `--max-length`, `--teacher` and `--config` override them, and the result is also
saved as RUN/eval.json (`EVAL_FILE`), which `kvdistill report` shows.

Most of an evaluation's time is the KV probe (the teachers' and the student's forwards on a fit split and the
held-out split, then a ridge fit per layer): progress bars show each stage, and `--no-probe` skips it.
"""

from __future__ import annotations

import time
from pathlib import Path

from kvdistill.atomic import write_json_atomic
from kvdistill.config import DataConfig, RunConfig, load_config
from kvdistill.device import default_device
from kvdistill.errors import KvdistillError
from kvdistill.models.load import load_model
from kvdistill.rundir import resolve_checkpoint, step_of

EVAL_FILE = (
    "eval.json"  # RUN/eval.json: the newest `kvdistill eval` of the run (written_by: "kvdistill eval")
)
DEFAULT_SIZE = 32
DEFAULT_NEW_TOKENS = 16  # exact match: tokens generated per answer
DEFAULT_LATENT_BATCH = 32
DEFAULT_MAX_LENGTH = 256
MIN_FIT = 16  # probe-fit records at least (more when the held-out split is larger)


def data_config(
    data: str | None, run_cfg: RunConfig | None, size: int | None, max_length: int | None
) -> DataConfig:
    """The data to evaluate on: `data` (gsm_symbolic or a file), else the run's data, else gsm_symbolic."""
    if size is not None and size < 1:
        raise KvdistillError(f"--size {size}: no held-out samples", "pass --size 1 or more")
    if max_length is not None and max_length < 2:
        raise KvdistillError(
            f"--max-length {max_length}: a text of fewer than 2 tokens has no next token to score",
            "pass --max-length 2 or more (default: the run's data.max_length, else 256)",
        )
    if data is None and run_cfg is not None:
        base = run_cfg.data
        eval_size = size if size is not None else base.eval_size
        if eval_size == 0:
            raise KvdistillError(
                "the run's config has data.eval_size 0: no held-out split",
                "pass --size N to hold out the first N records of its data",
            )
        update = {"eval_size": eval_size, "max_length": max_length or base.max_length}
        if base.source == "gsm_symbolic":  # generation is prefix-stable: the eval split stays the same
            update["size"] = max(base.size, eval_size + max(eval_size, MIN_FIT))
        # config.yaml spells out every field; only non-defaults count as set (a file's text/template mode
        # depends on whether data.text_field was set)
        return DataConfig.model_validate({**base.model_dump(exclude_defaults=True), **update})
    size = size or DEFAULT_SIZE
    max_length = max_length or DEFAULT_MAX_LENGTH
    if data is None or data == "gsm_symbolic":
        return DataConfig(
            source="gsm_symbolic", size=size + max(size, MIN_FIT), eval_size=size, max_length=max_length
        )
    from kvdistill.data.rows import source_of_file

    source = source_of_file(data)
    if source is None:
        raise KvdistillError(
            f"--data '{data}': unknown file type '{Path(data).suffix}'",
            "use .jsonl, .csv, .parquet or .txt, or gsm_symbolic",
        )
    return DataConfig(source=source, path=data, eval_size=size, max_length=max_length)


def held_out(dcfg: DataConfig, *, fit: bool) -> tuple[list[dict], list[dict]]:
    """(probe-fit records, held-out records): the eval split of `dcfg` and, if `fit`, the start of its train
    split."""
    from kvdistill.data import load_records

    eval_records = load_records(dcfg, split="eval")
    fit_records = load_records(dcfg, split="train")[: max(len(eval_records), MIN_FIT)] if fit else []
    return fit_records, eval_records


def evaluate_checkpoint(
    checkpoint: str,
    *,
    data: str | None = None,
    config: Path | None = None,
    teachers: list[str] = (),
    size: int | None = None,
    max_length: int | None = None,
    em: bool = True,
    probe: bool = True,
    device: str | None = None,
    max_new_tokens: int | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    save: bool = True,
) -> dict:
    """Evaluate CHECKPOINT (see the module docstring) through `kvdistill.eval.student.evaluate_saved`; the
    result `kvdistill eval --json` prints. A latent student (its directory holds latent.json) is evaluated in
    latent mode (batches of 32 unless `batch_size`). `probe`: the KV probe against the teachers (text
    students); `save`: write RUN/eval.json when CHECKPOINT belongs to a run."""
    from kvdistill.eval.student import evaluate_saved
    from kvdistill.student.latent import is_latent_student

    student, run_dir = resolve_checkpoint(checkpoint)
    latent = is_latent_student(student)
    if latent and teachers:
        raise KvdistillError(
            f"--teacher {list(teachers)}: the KV probe error is measured for text students; a latent "
            "student's K/V error against its targets is training's eval/latent_kv",
            "drop --teacher for a latent student",
        )
    run_cfg = load_config(config) if config is not None else None
    if run_cfg is None and run_dir is not None:
        run_cfg = load_config(run_dir / "config.yaml")
    dcfg = data_config(data, run_cfg, size, max_length)
    if not probe or latent:
        specs = {}
    elif teachers:
        specs = {Path(t).name or t: t for t in teachers}
    elif run_cfg is not None:
        specs = {t.name: t.model for t in run_cfg.teachers if t.model is not None}
    else:
        specs = {}
    fit, held = held_out(dcfg, fit=bool(specs))
    device = default_device(device)
    loaded = {
        name: load_model(model, device=device, attn_implementation="sdpa") for name, model in specs.items()
    }
    result = evaluate_saved(
        student,
        held,
        template=dcfg.template,
        max_length=dcfg.max_length,
        em=em,
        max_new_tokens=max_new_tokens or DEFAULT_NEW_TOKENS,
        batch_size=batch_size or (DEFAULT_LATENT_BATCH if latent else 8),
        device=device,
        teachers=loaded,
        fit_records=fit,
        progress=progress,
    )
    result.update(
        written_by="kvdistill eval",
        evaluated_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
        step=step_of(Path(student)),
        checkpoint=str(checkpoint),
        student=student,
        run_dir=str(run_dir) if run_dir else None,
        teachers=specs,
        samples=len(held),
        data={
            "source": dcfg.source,
            "path": dcfg.path,
            "eval_size": dcfg.eval_size,
            "max_length": dcfg.max_length,
            "seed": dcfg.seed,
        },
    )
    if save and run_dir is not None:
        write_json_atomic(run_dir / EVAL_FILE, result)
    return result


def markdown_table(result: dict) -> str:
    """The result as a two-column markdown table."""
    ppl = result["perplexity"]
    lines = [
        "| metric | value |",
        "|---|---|",
        f"| held-out perplexity | {ppl['ppl']:.3f} ({ppl['tokens']} tokens) |",
        f"| held-out CE (nats/token) | {ppl['ce']:.4f} |",
    ]
    if result.get("mode") == "latent":
        lines[2] = (
            f"| held-out perplexity of the answer after the latents | {ppl['ppl']:.3f} ({ppl['tokens']} "
            "tokens) |"
        )
        lines[3] = f"| held-out answer CE (nats/token) | {ppl['ce']:.4f} |"
    if "exact_match" in result:
        em = result["exact_match"]
        value = "n/a (no records with an answer)" if em["exact_match"] is None else f"{em['exact_match']:.3f}"
        mode = " (latent mode)" if result.get("mode") == "latent" else ""
        lines.append(f"| exact match{mode} | {value} ({em.get('correct', 0)}/{em['n']}) |")
        if result.get("mode") == "latent" and em["n"]:
            lines.append(f"| generated tokens per answer | {em['gen_tokens']:.1f} |")
            lines.append(f"| latency per answer (s) | {em['latency_s']:.4f} |")
            lines.append(
                f"| latent tokens / backbone passes on latents | {em['latent_tokens']} / "
                f"{em['latent_passes']} |"
            )
    if "latent_swap" in result:
        swap = result["latent_swap"]
        lines.append(
            f"| exact match with another question's latents (swap probe) | {swap['exact_match']:.3f} "
            f"({swap['correct']}/{swap['n']}); the other question's answer: {swap['follows']:.3f} |"
        )
    for name, err in result.get("probe_kv_error", {}).items():
        per_layer = ", ".join(f"{x:.3f}" for x in err["layers"])
        lines.append(
            f"| KV probe 1-R² vs {name} (mean; per student layer) | {err['mean']:.3f}; {per_layer} |"
        )
    return "\n".join(lines)
