"""kvdistill command line. Commands are thin: they parse options, call the library, and print.

Every KvdistillError is printed as a clean message with its fix and exit code 2; nothing else is caught. Text
from the user (paths, names, values) is printed verbatim (`escape`: Rich would read `[red]` or `[/x]` as
markup). A command that writes (train, extract, experiment, quickstart) stopped by Ctrl-C or SIGTERM says how
to continue and exits 128 + the signal.
Logging: `--log-level LEVEL` (before the command) or the environment variable KVDISTILL_LOG (default WARNING;
INFO shows what a run decides, e.g. resumes and data counts; DEBUG everything).
"""

from __future__ import annotations

import json
import logging
import os
import sys

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kvdistill.config import config_path
from kvdistill.errors import KvdistillError
from kvdistill.eval.cli import evaluate, generate, report
from kvdistill.stopping import RERUN, resume_hint, stoppable

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Multi-teacher KV-cache distillation from heterogeneous teachers into one student.\n\n"
    "Start with `kvdistill quickstart`, then `kvdistill config show > my.yaml` for your own job.",
)
zoo_app = typer.Typer(
    no_args_is_help=True, help="The offline model zoo (real models shipped in PyPI packages)."
)
app.add_typer(zoo_app, name="zoo")
config_app = typer.Typer(
    no_args_is_help=True, help="Configs: print the full commented default or a packaged one."
)
app.add_typer(config_app, name="config")
console = Console(stderr=True)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _version(value: bool) -> None:
    if value:
        from kvdistill import __version__

        sys.stdout.write(f"kvdistill {__version__}\n")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    log_level: str | None = typer.Option(
        None,
        "--log-level",
        envvar="KVDISTILL_LOG",
        show_envvar=True,
        help=f"Logging level: {', '.join(LOG_LEVELS)} (default WARNING).",
    ),
) -> None:
    """Options that come before the command, e.g. `kvdistill --log-level INFO train my.yaml --out runs/a`."""
    if log_level is not None:
        level = log_level.upper()
        if level not in LOG_LEVELS:
            raise KvdistillError(
                f"--log-level / KVDISTILL_LOG '{log_level}' is not a logging level",
                f"use one of {', '.join(LOG_LEVELS)}",
            )
        logging.getLogger().setLevel(level)


def _echo_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


# ---------------------------------------------------------------- zoo
@zoo_app.command("list")
def zoo_list(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the offline model names and whether they are ready locally.

    Example: kvdistill zoo list --json
    """
    from kvdistill.models import zoo

    rows = [
        {"name": e.name, "kind": e.kind, "package": e.package, "description": e.description}
        for e in zoo.ZOO.values()
    ]
    if as_json:
        _echo_json(rows)
        return
    table = Table("name", "kind", "package", "description")
    for r in rows:
        table.add_row(r["name"], r["kind"], r["package"], r["description"])
    Console().print(table)


@zoo_app.command("fetch")
def zoo_fetch(names: list[str] | None = typer.Argument(None, help="Zoo names (default: all).")) -> None:
    """Convert the GGUF models once into cached safetensors and fetch the tokenizer-only assets.

    Example: kvdistill zoo fetch smollm2-135m gpt2-tokenizer
    """
    from kvdistill.models import zoo

    for name, path in zoo.fetch_all(names).items():
        console.print(f"[green]ready[/green] {escape(name)}: {escape(str(path))}")


# ---------------------------------------------------------------- inspect
@app.command()
def inspect(
    models: list[str] = typer.Argument(
        ..., help="Offline names, local dirs, .gguf files or hub ids; the first is the student."
    ),
    text: str | None = typer.Option(
        None, "--text", "-t", help="Show how this text tokenizes (tokens with UTF-8 byte spans)."
    ),
    strategy: str = typer.Option("ratio", help="Layer-map strategy for the plan: ratio, uniform, skip."),
    projector: str = typer.Option(
        "auto", help="Projector kind for the plan: auto, identity, per_head, linear."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list, one object per model."),
) -> None:
    """Show KV geometry, tokenization and the student→teacher alignment plan.

    Example: kvdistill inspect smollm2-135m gemma3-270m minilm-l6 --text "2 + 3 = 5"
    """
    if text is not None:
        from kvdistill.eval.generate import check_text

        check_text(text, "--text")
    from kvdistill.inspection import inspect_models, show_inspection

    entries = inspect_models(models, text=text, strategy=strategy, projector=projector)
    if as_json:
        _echo_json(entries)
        return
    show_inspection(entries, text, Console())


# -------------------------------------------------------------- train / eval / report / quickstart / validate
def _load(config: str, overrides: list[str] | None):
    from kvdistill.config import load_config

    return load_config(config_path(config), overrides or [])


def _phase_list(spec: str) -> list[int]:
    try:
        if "-" in spec:
            lo, hi = (int(x) for x in spec.split("-"))
            phases = list(range(lo, hi + 1))
        else:
            phases = [int(x) for x in spec.split(",")]
    except ValueError:
        phases = []
    if not phases or any(p < 1 or p > 5 for p in phases):
        raise KvdistillError(
            f"--phases '{spec}' is not a range or list within 1-5", "e.g. --phases 1-5 or 2,3"
        )
    return phases


@app.command()
def validate(
    config: str = typer.Argument(..., help="YAML config (or a packaged name: quickstart, phase1 … phase5)."),
    overrides: list[str] | None = typer.Argument(None, help="Dotted overrides, e.g. train.lr=1e-4."),
) -> None:
    """Check a config: every problem at once, by the checks `train` runs before its first step (keys, types,
    models found, from_config shapes, layer maps, data fields and splits, max_length); nothing is written.

    Examples:

        kvdistill validate my.yaml

        kvdistill validate quickstart train.steps=10 data.max_length=128
    """
    from kvdistill.config import check_config, parse_config, read_raw
    from kvdistill.errors import ConfigError
    from kvdistill.train.preflight import preflight

    raw = read_raw(config_path(config), overrides or [])
    try:
        cfg = parse_config(raw, source=str(config))
    except ConfigError:  # the schema fails: every section checked on its own (check_config)
        cfg, problems = check_config(raw, source=str(config))
        raise ConfigError(problems, source=str(config)) from None
    checked = preflight(cfg)
    if checked.problems:
        raise ConfigError(checked.problems, source=str(config))
    for note in checked.model_notes + checked.data_notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")
    console.print(
        f"[green]ok[/green] {escape(config)}: student, {len(cfg.teachers)} teacher(s), data "
        f"({len(checked.train_records)} train / {len(checked.eval_records)} eval records) and losses valid"
    )


@app.command()
def train(
    config: str | None = typer.Argument(None, help="YAML config or packaged name; omit with --phases."),
    overrides: list[str] | None = typer.Argument(
        None, help="Dotted overrides, e.g. train.steps=10 teachers.0.weight=0.3"
    ),
    out: str = typer.Option(..., "--out", "-o", help="Run directory."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in --out."),
    phases: str | None = typer.Option(
        None, "--phases", help="Run the curriculum phases, e.g. 1-5 (packaged configs)."
    ),
    init_student: str | None = typer.Option(
        None, "--init-student", help="Start from this student directory."
    ),
) -> None:
    """Distill the teachers of CONFIG into its student (CPU, one GPU, or DDP under accelerate/torchrun).

    CONFIG may also be a curriculum file (a `curriculum:` list of stage configs); --phases runs the packaged
    5-phase curriculum.

    Examples:

        kvdistill train my.yaml --out runs/a train.lr=1e-4 teachers.0.weight=0.3

        kvdistill train my.yaml --out runs/a --resume

        kvdistill train --phases 1-5 --out runs/curriculum
    """
    from kvdistill.train.curriculum import is_curriculum, read_curriculum, run_curriculum, run_phases
    from kvdistill.train.trainer import train as run_train

    if config is not None and "=" in config and not os.path.exists(config):  # an override, not a config path
        overrides, config = [config, *(overrides or [])], None
    if phases:
        if config is not None:
            raise KvdistillError(
                f"--phases runs the packaged phase configs; CONFIG '{config}' would be ignored",
                "drop CONFIG (put changes in overrides), or list your configs in a curriculum file",
            )
        with stoppable(console, resume_hint()):
            results = run_phases(_phase_list(phases), out, overrides or [], resume=resume)
        _done(out, ", ".join(r["stage"] for r in results))
        return
    if config is None:
        raise KvdistillError("no config given", "kvdistill train CONFIG --out DIR, or --phases 1-5")
    if is_curriculum(config):
        stages, shared = read_curriculum(config)
        with stoppable(console, resume_hint()):
            results = run_curriculum(
                stages, out, shared + list(overrides or []), resume=resume, init_student=init_student
            )
        _done(out, ", ".join(r["stage"] for r in results))
        return
    cfg = _load(config, overrides)
    with stoppable(console, resume_hint()):
        summary = run_train(cfg, out, resume=resume, init_student=init_student)
    _done(out, ", ".join(f"{k}={v:.4g}" for k, v in summary.items() if isinstance(v, (int, float))))


def _done(out: str, what: str) -> None:
    """The closing line, printed once: by the main process under accelerate/torchrun (RANK 0)."""
    if os.environ.get("RANK", "0") == "0":
        console.print(f"[green]done[/green] {escape(out)}: {escape(what)}")


# -------------------------------------------------------------- eval / generate / report (kvdistill.eval.cli)
app.command("eval")(evaluate)
app.command()(generate)
app.command()(report)


@app.command()
def quickstart(
    out: str = typer.Option("quickstart-out", "--out", "-o", help="Output directory."),
    steps: int | None = typer.Option(None, help="Override train.steps (default from the packaged config)."),
) -> None:
    """The default run: SmolLM2 + Gemma-3 distilled into a small GPT-2-tokenizer student vs a CE-only twin.

    Example: kvdistill quickstart --out quickstart-out --steps 20
    """
    from kvdistill.experiments.quickstart import run_quickstart

    with stoppable(console, RERUN):
        summary = run_quickstart(out, steps=steps)
    sys.stdout.write(summary["table_markdown"] + "\n")
    console.print(f"[green]wrote[/green] {escape(out)}/summary.json and {escape(out)}/report.md")


@app.command()
def experiment(
    spec: str = typer.Argument(..., help="Experiment spec YAML, or a packaged name (tiny, suite)."),
    out: str = typer.Option(..., "--out", "-o", help="Experiment directory (resumable: rerun to continue)."),
    only: list[str] | None = typer.Option(
        None, "--only", help="Run only this condition (repeatable); the baseline always runs."
    ),
    seeds: int | None = typer.Option(None, "--seeds", help="Use only the spec's first N seeds."),
    plan: bool = typer.Option(
        False,
        "--plan",
        help="Check the spec and every run's data (generated data kept under $KVDISTILL_HOME/data), list "
        "the runs; train nothing, write nothing under --out.",
    ),
    report: bool = typer.Option(
        False,
        "--report",
        help="Train and score nothing: write results.json, results.md and the plots from the runs already "
        "scored in --out (the rest listed as not scored).",
    ),
    smoke: bool = typer.Option(
        False,
        "--smoke",
        help="Run every chosen run of the spec for 2 steps on 8 held-out problems, teachers for 2 steps: the "
        "spec's own models, tokenizers, data and conditions end to end in minutes on a CPU, before GPU time "
        "is spent (its figures mean nothing; --out must not be the real experiment's).",
    ),
) -> None:
    """Prepare the spec's teachers, train every (condition, seed), evaluate on one held-out set, compare.

    Examples:

        kvdistill experiment tiny --out runs/tiny

        kvdistill experiment suite --out runs/suite --only kv-fixed --seeds 1

        kvdistill experiment specialists --out runs/specialists --plan

        kvdistill experiment specialists --out runs/specialists --report

        kvdistill experiment specialists --out runs/specialists-smoke --smoke --seeds 1
    """
    from kvdistill.experiments.results import markdown
    from kvdistill.experiments.runner import run_experiment
    from kvdistill.experiments.spec import load_spec

    parsed = load_spec(spec)
    if seeds is not None and seeds < 1:
        raise KvdistillError(f"--seeds {seeds}: no seed to run", "pass --seeds 1 or more")
    if plan and report:
        raise KvdistillError("--plan and --report together", "pass one of them")
    if plan:
        planned = run_experiment(parsed, out, only=only, seeds=seeds, plan=True, smoke=smoke)["plan"]
        sys.stdout.write(
            "".join(f"{name}: {records} training records\n" for name, records in planned.items())
        )
        console.print(f"[green]planned[/green] {len(planned)} runs of {escape(parsed.name)}; nothing trained")
        return
    with stoppable(console, RERUN):
        results = run_experiment(parsed, out, only=only, seeds=seeds, report=report, smoke=smoke)
    sys.stdout.write(markdown(results, parsed) + "\n")
    console.print(
        f"[green]wrote[/green] {escape(out)}/results.json, {escape(out)}/results.md and {escape(out)}/plots/"
    )


# ---------------------------------------------------------------- config
@config_app.command("show")
def config_show(
    name: str | None = typer.Argument(
        None,
        help="A packaged config (quickstart, phase1 … phase5, pikv) or a YAML "
        "file; omitted: every default, with a minimal student and teacher.",
    ),
    overrides: list[str] | None = typer.Argument(None, help="Dotted overrides, e.g. train.steps=10."),
) -> None:
    """Print a complete config as commented YAML: every field with its value, choices and meaning.

    Generated from the config schema, so it is always the code's own defaults; the output is a valid config.

    Examples:

        kvdistill config show > my.yaml        # every default, to edit

        kvdistill config show quickstart       # a packaged config in full

        kvdistill config show my.yaml train.steps=10
    """
    from kvdistill.config import load_config
    from kvdistill.config.show import EXAMPLE, commented_yaml

    if name is None:
        cfg = load_config(raw=json.loads(json.dumps(EXAMPLE)), overrides=overrides or [])
        header = (
            "kvdistill config: every field at its default (student and teacher filled in from the offline "
            "zoo).\nEdit what you need; `kvdistill validate FILE` checks it."
        )
    else:
        cfg = _load(name, overrides)
        header = f"kvdistill config: {name}, every field spelled out.\n`kvdistill validate FILE` checks it."
    sys.stdout.write(commented_yaml(cfg, header))


# ---------------------------------------------------------------- extract / cache
from kvdistill.cache.cli import cache_app, extract  # noqa: E402 (kept next to where it is registered)

app.add_typer(cache_app, name="cache")
app.command()(extract)


def main() -> None:
    level = os.environ.get("KVDISTILL_LOG", "WARNING").upper()
    logging.basicConfig(
        level=level if level in LOG_LEVELS else "WARNING", format="%(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except KvdistillError as err:
        console.print(f"[bold red]error:[/bold red] {escape(err.problem)}")
        if err.fix:
            console.print(f"[yellow]fix:[/yellow] {escape(err.fix)}")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
