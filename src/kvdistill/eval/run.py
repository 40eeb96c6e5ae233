"""`kvdistill eval`: evaluate a saved student on held-out data, optionally against teachers.

CHECKPOINT is one of
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

import torch

from kvdistill.config import DataConfig, RunConfig, load_config
from kvdistill.errors import KvdistillError
from kvdistill.models.load import load_model

EVAL_FILE = "eval.json"  # RUN/eval.json: the newest `kvdistill eval` of the run (written_by: "kvdistill eval")
DEFAULT_SIZE = 32
DEFAULT_NEW_TOKENS = 16  # exact match: tokens generated per answer
DEFAULT_LATENT_BATCH = 32
DEFAULT_MAX_LENGTH = 256
MIN_FIT = 16  # probe-fit records at least (more when the held-out split is larger)
_SOURCES = {"jsonl": "jsonl", "json": "jsonl", "csv": "csv", "parquet": "parquet", "txt": "text"}


def resolve_checkpoint(checkpoint: str | Path) -> tuple[str, Path | None]:
    """(what `load_model` gets, the run directory or None) for a run, checkpoint or student directory or name."""
    from kvdistill.train.checkpoint import latest_checkpoint, student_dir

    path = Path(checkpoint).expanduser()
    if not path.is_dir():
        return str(checkpoint), None  # a zoo name or hub id; load_model explains a bad path
    if (path / "config.yaml").is_file() and not (path / "config.json").is_file():  # a run directory
        final = student_dir(path / "final")
        if (final / "config.json").is_file():
            return str(final), path
        ckpt = latest_checkpoint(path)
        if ckpt is None or not (ckpt / "student" / "config.json").is_file():
            raise KvdistillError(
                f"run directory '{path}' has neither final/ nor a complete checkpoint",
                "let training save a checkpoint (train.save_every, or run to the end)",
            )
        return str(ckpt / "student"), path
    if (path / "student" / "config.json").is_file():  # RUN/checkpoints/step-N, or RUN/final of an older run
        return str(path / "student"), _run_of(path)
    if (path / "config.json").is_file():  # a student directory: RUN/final, RUN/final/student of an older run
        return str(path), _run_of(path) if path.name == "final" else _run_of(path.parent)
    raise KvdistillError(
        f"'{checkpoint}' is not a run, checkpoint or student directory",
        "pass RUN, RUN/final, RUN/checkpoints/step-N, or a directory holding config.json",
    )


def _run_of(ckpt: Path) -> Path | None:
    """The run directory of RUN/final or RUN/checkpoints/step-N when it holds config.yaml."""
    if ckpt.name == "final":
        run = ckpt.parent
    elif ckpt.parent.name == "checkpoints":
        run = ckpt.parent.parent
    else:
        return None
    return run if (run / "config.yaml").is_file() else None


def data_config(
    data: str | None, run_cfg: RunConfig | None, size: int | None, max_length: int | None
) -> DataConfig:
    """The data to evaluate on: `data` (gsm_symbolic or a file), else the run's data, else gsm_symbolic."""
    if size is not None and size < 1:
        raise KvdistillError(f"--size {size}: no held-out samples", "pass --size 1 or more")
    if max_length is not None and max_length < 2:
        raise KvdistillError(f"--max-length {max_length}: a text of fewer than 2 tokens has no next token to score",
                             "pass --max-length 2 or more (default: the run's data.max_length, else 256)")
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
    suffix = Path(data).suffix.lstrip(".")
    source = _SOURCES.get(suffix)
    if source is None:
        raise KvdistillError(
            f"--data '{data}': unknown file type '.{suffix}'",
            "use .jsonl, .csv, .parquet or .txt, or gsm_symbolic",
        )
    return DataConfig(source=source, path=data, eval_size=size, max_length=max_length)


def held_out(dcfg: DataConfig, *, fit: bool) -> tuple[list[dict], list[dict]]:
    """(probe-fit records, held-out records): the eval split of `dcfg` and, if `fit`, the start of its train split."""
    from kvdistill.data import load_records

    eval_records = load_records(dcfg, split="eval")
    fit_records = load_records(dcfg, split="train")[: max(len(eval_records), MIN_FIT)] if fit else []
    return fit_records, eval_records


def evaluate_student(
    model,
    tokenizer,
    teachers: dict,
    fit_records,
    eval_records,
    *,
    max_length: int,
    em: bool = True,
    batch_size: int = 8,
    teacher_cache=None,
    max_new_tokens: int = 16,
    progress: bool = False,
) -> dict:
    """Perplexity, exact match (if `em`) and, per teacher in `teachers` {name: (model, tokenizer)}, the KV probe
    1 - R² per student layer and its mean (`probe_kv_error`; empty without teachers). `progress`: bars on stderr.

    `teacher_cache` (a `kvdistill.eval.metrics.TeacherRowsCache`): pass the same one when evaluating several
    students against the same teachers and records, and each teacher's K/V are captured once for all of them.
    """
    from kvdistill.eval.metrics import exact_match, perplexity, probe_kv_error

    model.eval()
    out = {
        "perplexity": perplexity(model, tokenizer, eval_records, max_length=max_length, batch_size=batch_size,
                                 progress=progress)
    }
    if em:
        out["exact_match"] = exact_match(model, tokenizer, eval_records, batch_size=batch_size,
                                         max_new_tokens=max_new_tokens, progress=progress)
    out["probe_kv_error"] = {}
    for name, (t_model, t_tok) in teachers.items():
        layers = probe_kv_error(
            model,
            tokenizer,
            t_model,
            t_tok,
            fit_records,
            eval_records,
            max_length=max_length,
            batch_size=batch_size,
            cache=teacher_cache,
            progress=name if progress else None,
        )
        out["probe_kv_error"][name] = {"mean": sum(layers) / len(layers), "layers": layers}
    return out


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
    """Evaluate CHECKPOINT (see the module docstring); the result `kvdistill eval --json` prints. A latent student
    (its directory holds latent.json) is evaluated in latent mode (`evaluate_latent`). `probe`: the KV probe
    against the teachers; `save`: write RUN/eval.json when CHECKPOINT belongs to a run."""
    from kvdistill.student.latent import is_latent_student

    student, run_dir = resolve_checkpoint(checkpoint)
    if is_latent_student(student):
        return _evaluate_latent_checkpoint(checkpoint, student, run_dir, data=data, config=config, teachers=teachers,
                                           size=size, max_length=max_length, em=em, device=device,
                                           max_new_tokens=max_new_tokens, batch_size=batch_size, save=save)
    run_cfg = load_config(config) if config is not None else None
    if run_cfg is None and run_dir is not None:
        run_cfg = load_config(run_dir / "config.yaml")
    dcfg = data_config(data, run_cfg, size, max_length)
    if not probe:
        specs = {}
    elif teachers:
        specs = {Path(t).name or t: t for t in teachers}
    elif run_cfg is not None:
        specs = {t.name: t.model for t in run_cfg.teachers if t.model is not None}
    else:
        specs = {}
    fit, held = held_out(dcfg, fit=bool(specs))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = {name: load_model(model, device=device, attn_implementation="sdpa") for name, model in specs.items()}
    model, tok = load_model(student, device=device, attn_implementation="sdpa")  # eval reads no attention maps
    positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions < dcfg.max_length:
        raise KvdistillError(f"max_length {dcfg.max_length} is longer than the student's {positions} positions",
                             f"pass --max-length {positions} or less")
    result = evaluate_student(model, tok, loaded, fit, held, max_length=dcfg.max_length, em=em,
                              batch_size=batch_size or 8, max_new_tokens=max_new_tokens or DEFAULT_NEW_TOKENS,
                              progress=progress)
    result.update(
        written_by="kvdistill eval",
        evaluated_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
        step=_step_of(Path(student)),
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
        from kvdistill.cache.manifest import write_json_atomic

        write_json_atomic(run_dir / EVAL_FILE, result)
    return result


def _evaluate_latent_checkpoint(checkpoint, student: str, run_dir: Path | None, *, data, config, teachers, size,
                                max_length, em, device, max_new_tokens, batch_size, save) -> dict:
    """A latent student: latent-mode exact match (tokens, latency, latent passes per answer) and the answer CE after
    the latents on the held-out records, through `kvdistill.eval.latent.evaluate_latent` (the experiment runner's
    evaluation)."""
    from kvdistill.eval.latent import evaluate_latent

    if teachers:
        raise KvdistillError(f"--teacher {list(teachers)}: the KV probe error is measured for text students; a latent "
                             "student's K/V error against its targets is training's eval/latent_kv",
                             "drop --teacher for a latent student")
    run_cfg = load_config(config) if config is not None else None
    if run_cfg is None and run_dir is not None:
        run_cfg = load_config(run_dir / "config.yaml")
    dcfg = data_config(data, run_cfg, size, max_length)
    _, held = held_out(dcfg, fit=False)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ev = evaluate_latent(student, held, dcfg.template, max_new_tokens=max_new_tokens or DEFAULT_NEW_TOKENS,
                         batch_size=batch_size or DEFAULT_LATENT_BATCH, device=device, em=em)
    result = {"mode": "latent", "perplexity": {"ppl": ev["ppl"], "ce": ev["ce"], "tokens": ev["tokens"]},
              "probe_kv_error": {}}
    if em:
        result["exact_match"] = {k: ev[k] for k in ("exact_match", "correct", "n", "per_item", "samples", "gen_tokens",
                                                    "latency_s", "latent_passes", "latent_tokens")}
    result.update(written_by="kvdistill eval", evaluated_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
                  step=_step_of(Path(student)), checkpoint=str(checkpoint), student=student,
                  run_dir=str(run_dir) if run_dir else None, teachers={}, samples=len(held),
                  data={"source": dcfg.source, "path": dcfg.path, "eval_size": dcfg.eval_size,
                        "max_length": dcfg.max_length, "seed": dcfg.seed})
    if save and run_dir is not None:
        from kvdistill.cache.manifest import write_json_atomic

        write_json_atomic(run_dir / EVAL_FILE, result)
    return result


def _step_of(student: Path) -> int | None:
    """The optimizer step of the student in RUN/final (its trainer_state) or RUN/checkpoints/step-N, else None."""
    import json

    for state in (student / "kvdistill" / "trainer_state.json", student.parent / "trainer_state.json",
                  student.parent / "kvdistill" / "trainer_state.json"):
        try:
            step = json.loads(state.read_text()).get("step")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(step, int):
            return step
    return None


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
        lines[2] = f"| held-out perplexity of the answer after the latents | {ppl['ppl']:.3f} ({ppl['tokens']} tokens) |"
        lines[3] = f"| held-out answer CE (nats/token) | {ppl['ce']:.4f} |"
    if "exact_match" in result:
        em = result["exact_match"]
        value = "n/a (no records with an answer)" if em["exact_match"] is None else f"{em['exact_match']:.3f}"
        mode = " (latent mode)" if result.get("mode") == "latent" else ""
        lines.append(f"| exact match{mode} | {value} ({em.get('correct', 0)}/{em['n']}) |")
        if result.get("mode") == "latent" and em["n"]:
            lines.append(f"| generated tokens per answer | {em['gen_tokens']:.1f} |")
            lines.append(f"| latency per answer (s) | {em['latency_s']:.4f} |")
            lines.append(f"| latent tokens / backbone passes on latents | {em['latent_tokens']} / {em['latent_passes']} |")
    for name, err in result.get("probe_kv_error", {}).items():
        per_layer = ", ".join(f"{x:.3f}" for x in err["layers"])
        lines.append(
            f"| KV probe 1-R² vs {name} (mean; per student layer) | {err['mean']:.3f}; {per_layer} |"
        )
    return "\n".join(lines)
