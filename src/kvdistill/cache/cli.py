"""`kvdistill extract` and `kvdistill cache info|verify|merge`: thin commands over `kvdistill.cache`.

    kvdistill extract --teacher smollm2-135m --data gsm_symbolic --size 4096 --out caches/smollm2 \\
        --compression rkv --budget 128
    kvdistill extract CONFIG --teacher NAME --out DIR      teacher (with its compression) and data from a run
                                                           config; --out defaults to the teacher's cache_dir
    kvdistill extract ... --logits-top-k 64 [--logits-dtype float16] [--logits-temperatures 1,2]
                                                           K/V + top-k logits
    kvdistill extract ... --shard-index $SLURM_ARRAY_TASK_ID --num-shards 8, then kvdistill cache merge DIR
    kvdistill cache info DIR [--json] / cache verify DIR / cache merge DIR [--parts N]

Flags override the config; dotted overrides (`data.seed=3`, `teachers.0.compression.lam=0.2`) override both.
Nothing here imports torch until a command runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from kvdistill.errors import ConfigError, KvdistillError
from kvdistill.stopping import RERUN, stoppable

cache_app = typer.Typer(no_args_is_help=True, help="Inspect, verify and merge teacher-KV caches.")
console = Console(stderr=True)

# config key -> the flag that sets it, so errors name what the user typed
_FLAGS = {
    "teacher.model": "--teacher",
    "teacher.compression": "--compression/--budget",
    "teacher.compression.kind": "--compression",
    "teacher.compression.budget": "--budget",
    "teacher.compression.lam": "--lam",
    "teacher.compression.layers": "--layers",
    "teacher.compression.dtype": "--dtype",
    "teacher.logits.top_k": "--logits-top-k",
    "teacher.logits.dtype": "--logits-dtype",
    "teacher.logits.temperatures": "--logits-temperatures",
    "data": "--data",
    "data.source": "--data",
    "data.path": "--data",
    "data.size": "--size",
    "data.limit": "--limit",
    "data.max_length": "--max-length",
}


# ---------------------------------------------------------------------------------------------- extract
def extract(
    config: str | None = typer.Argument(
        None, help="Run config (YAML or packaged name): take the teacher and the data from it."
    ),
    overrides: list[str] | None = typer.Argument(
        None,
        help="Dotted overrides, e.g. data.size=512 data.seed=1 (teacher keys: teacher.compression.lam=0.2).",
    ),
    teacher: str | None = typer.Option(
        None, "--teacher", help="Teacher model (offline name, dir, hub id); with CONFIG: one of its teachers."
    ),
    out: str | None = typer.Option(
        None, "--out", "-o", help="Cache directory (with CONFIG: default the teacher's cache_dir)."
    ),
    data: str | None = typer.Option(
        None, "--data", help="gsm_symbolic or a .jsonl/.csv/.parquet/.txt file (default: gsm_symbolic)."
    ),
    compression: str | None = typer.Option(None, "--compression", help="full, right_crop or rkv."),
    budget: int | None = typer.Option(
        None, "--budget", help="Tokens kept per layer and head (right_crop, rkv)."
    ),
    lam: float | None = typer.Option(None, "--lam", help="R-KV weight of importance vs redundancy (0.1)."),
    layers: str | None = typer.Option(
        None, "--layers", help="Teacher layers to keep, e.g. 0,4,8 (default all)."
    ),
    dtype: str | None = typer.Option(None, "--dtype", help="Storage dtype: bfloat16, float16, float32."),
    size: int | None = typer.Option(
        None, "--size", help="data.size: generated samples (gsm_symbolic, arithmetic, ...)."
    ),
    limit: int | None = typer.Option(
        None, "--limit", help="data.limit: use only N records of a file (default: all)."
    ),
    max_length: int | None = typer.Option(None, "--max-length", help="data.max_length: tokens per text."),
    logits_top_k: int | None = typer.Option(
        None, "--logits-top-k", help="Also store the teacher's top-k log-probabilities per token (k)."
    ),
    logits_dtype: str | None = typer.Option(
        None, "--logits-dtype", help="Their storage dtype: float16 (default), bfloat16, float32."
    ),
    logits_temperatures: str | None = typer.Option(
        None,
        "--logits-temperatures",
        help="τ the log-probabilities are normalised at, e.g. 1,2 (default: losses.logit_kd's).",
    ),
    batch_size: int = typer.Option(8, "--batch-size", help="Texts per teacher forward."),
    shard_index: int = typer.Option(
        0, "--shard-index", help="This part of a split extraction (array index)."
    ),
    num_shards: int = typer.Option(1, "--num-shards", help="Parts the extraction is split into."),
    shard_size: int = typer.Option(256, "--shard-size", help="Samples per safetensors file."),
    device: str | None = typer.Option(
        None, "--device", help="cuda, cuda:1, cpu (default: cuda if available)."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Run one teacher over a dataset and store its (compressed) K/V in a cache; rerun to resume.

    Examples:

        kvdistill extract --teacher smollm2-135m --data gsm_symbolic --out caches/smollm2 \\
            --compression rkv --budget 128

        kvdistill extract my.yaml --teacher qwen --out caches/qwen
    """
    from kvdistill.cache.extract import extract as run_extract

    if config is not None and "=" in config and not Path(config).exists():  # an override, not a config path
        overrides, config = [config, *(overrides or [])], None
    teacher_cfg, data_cfg, cache_dir = extract_configs(
        config,
        overrides or [],
        teacher=teacher,
        out=out,
        data=data,
        compression={"kind": compression, "budget": budget, "lam": lam, "layers": layers, "dtype": dtype},
        size=size,
        limit=limit,
        max_length=max_length,
        logits={"top_k": logits_top_k, "dtype": logits_dtype, "temperatures": logits_temperatures},
    )
    with stoppable(console, RERUN):
        result = run_extract(
            teacher_cfg,
            data_cfg,
            cache_dir,
            batch_size=batch_size,
            device=device,
            shard_index=shard_index,
            num_shards=num_shards,
            shard_size=shard_size,
            progress=progress,
        )
    what = f"part {result['part']} of {num_shards} in " if result["part"] is not None else ""
    rate = f", {result['tokens_per_s']:,.0f} tokens/s" if result["stored"] else ""
    console.print(
        f"[green]wrote[/green] {what}{escape(str(cache_dir))}: {result['stored']} samples stored, "
        f"{result['skipped']} already there, {result['records']} in all ({result['tokens']:,} tokens in "
        f"{result['seconds']:.1f} s{rate})"
    )
    if result["part"] is not None:
        console.print(
            f"when every part has finished: kvdistill cache merge {escape(str(cache_dir))} "
            f"--parts {num_shards}"
        )


def extract_configs(
    config: str | None,
    overrides: list[str],
    *,
    teacher: str | None,
    out: str | None,
    data: str | None,
    compression: dict,
    size: int | None,
    max_length: int | None,
    limit: int | None = None,
    logits: dict | None = None,
):
    """(TeacherConfig, DataConfig, out dir) from a run config and/or flags; every problem listed together. A
    logits section (the teacher's, or from the --logits-* flags) without temperatures gets those of the
    config's losses.logit_kd (its defaults without a config)."""
    from kvdistill.config import (
        DataConfig,
        LogitKDConfig,
        TeacherConfig,
        apply_overrides,
        config_path,
        merge_data,
        read_raw,
    )

    if config is not None:
        raw = read_raw(config_path(config), overrides)
        teacher_raw = dict(_pick_teacher(raw, teacher, config))
        data_raw = dict(raw.get("data") or {})
    else:
        if teacher is None:
            raise KvdistillError("no teacher given", "pass --teacher MODEL, or CONFIG --teacher NAME")
        scoped = apply_overrides({"teacher": {"model": teacher}, "data": {}}, overrides)
        unknown = sorted(set(scoped) - {"teacher", "data"})
        if unknown:
            raise ConfigError(
                [f"override key(s) {unknown}: without CONFIG only data.* and teacher.* can be set"],
                "overrides",
            )
        teacher_raw, data_raw = dict(scoped["teacher"] or {}), dict(scoped["data"] or {})
    teacher_raw["compression"] = _compression_raw(teacher_raw.get("compression"), compression)
    problems = []
    logits_raw = _logits_raw(teacher_raw.get("logits"), logits or {})
    if logits_raw is not None:
        teacher_raw["logits"] = logits_raw
        if isinstance(logits_raw, dict) and logits_raw.get("temperatures") is None:
            losses_raw = raw.get("losses") if config is not None else None
            kd_raw = (losses_raw or {}).get("logit_kd") if isinstance(losses_raw, dict) else None
            kd, kd_problems = _validated(LogitKDConfig, dict(kd_raw or {}), "losses.logit_kd")
            problems += kd_problems
            if kd is not None and kd.temperatures_used() is None:
                problems.append(
                    "--logits-temperatures: losses.logit_kd has a linear τ schedule; give the "
                    "temperatures to store (e.g. --logits-temperatures 1,2,4)"
                )
            elif kd is not None:
                logits_raw["temperatures"] = kd.temperatures_used()
    if data is not None:
        try:
            data_raw = merge_data(data_raw, _data_source(data, overrides))  # a generator's size goes with it
        except KvdistillError as err:
            problems.append(f"{err.problem} ({err.fix})")
    if size is not None:
        data_raw["size"] = size
    if limit is not None:
        data_raw["limit"] = limit
    if max_length is not None:
        data_raw["max_length"] = max_length
    teacher_raw.setdefault("source", "online")
    teacher_cfg, teacher_problems = _validated(TeacherConfig, teacher_raw, "teacher")
    data_cfg, data_problems = _validated(DataConfig, data_raw, "data")
    problems += teacher_problems + data_problems
    if teacher_cfg is not None and data_cfg is not None:
        from kvdistill.config.schema import budget_problems

        problems += [
            p.replace(".budget (", ".budget (--budget, ").replace(
                "data.max_length (", "data.max_length (--max-length, "
            )
            for p in budget_problems(teacher_cfg.compression, data_cfg.max_length, "teacher.compression")
        ]
    cache_dir = out or (teacher_raw.get("cache_dir") if config is not None else None)
    if cache_dir is None:
        problems.append(
            "--out: no cache directory given" + (" (and the teacher has no cache_dir)" if config else "")
        )
    if problems:
        raise ConfigError(problems, source="kvdistill extract")
    return teacher_cfg, data_cfg, cache_dir


def _pick_teacher(raw: dict, teacher: str | None, config: str) -> dict:
    teachers = raw.get("teachers") or []
    if not isinstance(teachers, list) or not all(isinstance(t, dict) for t in teachers):
        raise ConfigError(["teachers must be a list of mappings"], source=str(config))
    labels = [t.get("name") or str(t.get("model", "")).rstrip("/").split("/")[-1] for t in teachers]
    if teacher is None:
        if len(teachers) == 1:
            return teachers[0]
        raise KvdistillError(
            f"{config} has {len(teachers)} teachers: say which to extract",
            f"pass --teacher with one of {labels}" if teachers else "add a teacher to the config",
        )
    for t, label in zip(teachers, labels, strict=True):
        if teacher in (label, t.get("model")):
            return t
    raise KvdistillError(
        f"--teacher '{teacher}' is not a teacher of {config} (its teachers: {labels})",
        "pass one of those names, or drop CONFIG to extract any model",
    )


def _compression_raw(base, flags: dict) -> dict:
    """The config's compression mapping with the flags that were given put over it."""
    out = dict(base or {})
    if flags.get("kind") is not None and flags["kind"] != out.get("kind"):
        out.pop("budget", None)  # a budget belongs to the kind it was given with
    for key, value in flags.items():
        if value is None:
            continue
        if key == "layers":
            try:
                value = [int(x) for x in str(value).replace(" ", "").split(",") if x]
            except ValueError:
                raise KvdistillError(
                    f"--layers '{flags['layers']}' is not a comma-separated list of layer indices",
                    "e.g. --layers 0,4,8",
                ) from None
        out[key] = value
    return out


def _logits_raw(base, flags: dict):
    """The teacher's logits mapping with the --logits-* flags put over it (None: neither gave one)."""
    given = {k: v for k, v in flags.items() if v is not None}
    if base is None and not given:
        return None
    out = {} if base is None else dict(base) if isinstance(base, dict) else base
    if not isinstance(out, dict):
        return out  # the schema names the problem
    if "temperatures" in given:
        try:
            given["temperatures"] = [
                float(x) for x in str(given["temperatures"]).replace(" ", "").split(",") if x
            ]
        except ValueError:
            raise KvdistillError(
                f"--logits-temperatures '{flags['temperatures']}' is not a comma-separated list of numbers",
                "e.g. --logits-temperatures 1,2",
            ) from None
    out.update(given)
    return out


def _data_source(data: str, overrides: list[str]) -> dict:
    if data == "gsm_symbolic":
        return {"source": "gsm_symbolic", "path": None}
    from kvdistill.data.rows import source_of_file

    source = source_of_file(data)  # --data: a source name or a file whose suffix names its format
    if source is None:
        if any(o.startswith("data.source=") for o in overrides):
            return {"path": data}
        raise KvdistillError(
            f"--data '{data}': cannot tell its format from the suffix '{Path(data).suffix}'",
            "use gsm_symbolic or a .jsonl/.csv/.parquet/.txt file, or add data.source=jsonl|csv|parquet|text",
        )
    return {"source": source, "path": data}


def _validated(cls, raw: dict, section: str):
    """(instance or None, problems), each problem naming the key and, where a flag sets it, the flag."""
    from pydantic import ValidationError

    from kvdistill.config.problems import validation_problems

    try:
        return cls.model_validate(raw), []
    except ValidationError as err:
        return None, validation_problems(err, cls, prefix=section, flags=_FLAGS)


# ---------------------------------------------------------------------------------------------- cache
@cache_app.command("info")
def info(
    directory: str = typer.Argument(..., help="A cache directory."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Teacher, compression, samples, tokens, bytes per token and per-layer shapes of a cache.

    Example: kvdistill cache info caches/smollm2 --json
    """
    from kvdistill.cache.verify import cache_info, format_info

    result = cache_info(directory)
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
    else:
        sys.stdout.write(format_info(result) + "\n")


@cache_app.command("verify")
def verify(directory: str = typer.Argument(..., help="A cache directory.")) -> None:
    """Check every shard's checksum, size and shapes against the manifest; exit 1 if anything is wrong, 2 if
    the manifest itself is refused (missing, malformed, naming files outside the cache).

    Example: kvdistill cache verify caches/smollm2
    """
    from kvdistill.cache.verify import cache_problems, load_cache_manifest

    problems = cache_problems(directory, load_cache_manifest(directory))
    if problems:
        for p in problems:
            console.print(f"[red]problem:[/red] {escape(p)}")
        console.print(f"[bold red]{escape(directory)}: {len(problems)} problem(s)[/bold red]")
        raise typer.Exit(1)
    console.print(f"[green]ok[/green] {escape(directory)}")


@cache_app.command("merge")
def merge(
    directory: str = typer.Argument(..., help="Directory the parts were written into."),
    parts: int | None = typer.Option(None, "--parts", help="Expected number of parts (--num-shards)."),
    allow_incomplete: bool = typer.Option(False, "--allow-incomplete", help="Merge unfinished parts too."),
) -> None:
    """Combine the parts of a split extraction (manifest.part-*.json) into one cache; safe to rerun.

    Example: kvdistill cache merge caches/smollm2
    """
    from kvdistill.cache.merge import merge_parts

    merged = merge_parts(directory, expected_parts=parts, require_complete=not allow_incomplete)
    console.print(
        f"[green]merged[/green] {len(merged['merged_from'])} parts into {escape(directory)}: "
        f"{len(merged['samples'])} samples in {len(merged['shards'])} shards"
    )
