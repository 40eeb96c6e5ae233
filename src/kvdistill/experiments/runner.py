"""`kvdistill experiment SPEC --out DIR`: prepare the teachers, train every (condition, seed), evaluate,
compare.

Directory layout (everything resumable: a finished step is skipped, a killed run resumes from its checkpoint):
    DIR/spec.yaml                        the spec as run
    DIR/teachers/NAME/                   a teacher's own CE training run; teacher.json: its held-out exact
                                         match (a teacher of steps 0 is used as given: teacher.json only)
    DIR/runs/CONDITION/seed-S/           an ordinary training run (config.yaml, metrics.jsonl, final/, ...)
    DIR/runs/CONDITION/seed-S/eval.json  its test figures, per-problem exact match included, and its steps
                                         trained, selected step, FLOPs and wall time; on a held-out set mixing
                                         skills also exact_match_<skill> and, for a router or similarity
                                         fusion over teachers labelled with a skill, routing_acc(_<skill>);
                                         with eval.probe its KV probe 1-R² against every teacher
                                         (probe_kv_error)
    DIR/init/seed-S/eval.json            eval.init: the baseline's untrained student, scored the same way
    DIR/caches/TEACHER/, TEACHER.json    `cache: true` conditions: the records their runs read, and the cost
    DIR/results.json, DIR/results.md     per condition and metric: values, mean, std, 95% interval;
                                         comparisons; per run and condition the held-out (validation) curves
                                         against step, FLOPs and wall time
    DIR/plots/                           bars with error bars per metric, held-out learning curves

Order: the teachers; the caches (each teacher's extraction in a child process); every condition except those
matched by wall time (`match_wall_of`), `concurrent` at once, the ones those are measured on first; the
wall-time-matched conditions join the queue as soon as the runs they are measured on have finished (their
steps come from the measured times); then every run's scoring on the test split, in child processes.
On a CUDA device every pool of child processes starts the next one only where the free memory holds its
estimate (`pool.run_pool`, the gate of `kvdistill.experiments.memory`), whatever `concurrent` says.

Where the base config sets train.early_stopping, a run is scored with its best validation checkpoint
(DIR/.../best/student), else with its final student.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from kvdistill.atomic import write_json_atomic, write_text_atomic
from kvdistill.config.schema import RunConfig
from kvdistill.data import load_records
from kvdistill.errors import KvdistillError
from kvdistill.experiments import memory
from kvdistill.experiments.caches import prepare_caches
from kvdistill.experiments.conditions import check_splits, condition_config, teacher_config
from kvdistill.experiments.matching import (
    flops_per_token,
    flops_steps,
    generation,
    student_params,
    wall_steps,
)
from kvdistill.experiments.pool import Job, resolve_concurrent, run_pool, train_all
from kvdistill.experiments.score import score
from kvdistill.experiments.spec import ExperimentSpec
from kvdistill.experiments.teachers import prepare_teachers
from kvdistill.paths import claim, dir_problem
from kvdistill.rundir import student_dir as student_of

log = logging.getLogger(__name__)


def run_dir(out: Path, name: str, seed: int) -> Path:
    return out / "runs" / name / f"seed-{seed}"


def run_experiment(
    spec: ExperimentSpec,
    out: str | Path,
    *,
    only: list[str] | None = None,
    seeds: int | None = None,
    plan: bool = False,
    report: bool = False,
    smoke: bool = False,
) -> dict:
    """Run (or resume) the experiment; returns the results also written to DIR/results.json.

    `plan`: check the arguments and every planned run's data (a generated source's files are generated and
    kept, e.g. GSM-Symbolic problems under $KVDISTILL_HOME/data, what a machine without the generator reads)
    and return {"plan": {run: train records}} (teachers as "teacher NAME", runs as "CONDITION/seed-S"), with
    nothing trained and nothing written under `out`.

    `report`: train and score nothing; write results.json / results.md / plots from the runs already scored
    in `out` (an experiment directory, e.g. one a time limit stopped, or one unpacked from another machine
    without the students' weights): the conditions every chosen seed of which is scored, with the rest listed
    under "unscored". Refused when the baseline has an unscored run (no comparison without it).

    `smoke`: run the spec's smoke version instead (`kvdistill.experiments.smoke`: every chosen run for 2
    steps, on 8 held-out problems), into a directory marked as a smoke experiment."""
    from kvdistill.experiments.results import collect
    from kvdistill.experiments.smoke import SMOKE_KIND, smoke_spec

    out = Path(out)
    if smoke and (plan or report):
        raise KvdistillError(
            f"--smoke with {'--plan' if plan else '--report'}",
            "pass --smoke alone (it plans, trains and reports the smoke runs)",
        )
    if smoke:
        from kvdistill.device import default_device

        spec = smoke_spec(spec, cpu=default_device() == "cpu")
    kind = SMOKE_KIND if smoke else "experiment"
    # every argument checked before the first write: a refused command leaves DIR as it was
    names = list(spec.conditions) if not only else _only(spec, only)
    if seeds is not None and seeds < 1:
        raise KvdistillError(f"--seeds {seeds}: no seed to run", "pass --seeds 1 or more")
    use_seeds = spec.seeds[:seeds] if seeds else spec.seeds
    problem = dir_problem(out, kind)
    if problem:
        raise problem
    unknown = {t.name: {"model": "?", "params": 0} for t in spec.teachers}
    probe = condition_config(spec, spec.baseline, use_seeds[0], unknown)
    held = load_records(probe.data, split="eval")
    val = load_records(probe.data, split="val")
    if not held:
        raise KvdistillError(
            "the base config holds out no records (data.eval_size 0)",
            "set data.eval_size in the spec's base config",
        )
    first = [n for n in names if spec.conditions[n].match_wall_of is None]
    later = [n for n in names if n not in first]
    planned = {f"teacher {p.name}": teacher_config(spec, p) for p in spec.teachers if p.steps > 0}
    planned.update({f"{n}/seed-{s}": condition_config(spec, n, s, unknown) for n in names for s in use_seeds})
    t0 = time.time()
    data_sizes = check_splits(planned, held, val)  # before anything trains
    if plan:
        return {"plan": data_sizes}
    if report:
        results, scored = _reported(spec, out, names, use_seeds)
        return _write(results, spec, out, scored, use_seeds, data_sizes, held, val)
    claim(out, kind)  # every argument checked: the first write
    write_text_atomic(out / "spec.yaml", yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    teachers = prepare_teachers(spec, out, held, names)  # only those the chosen conditions read
    log.info("phase teachers done after %.0f s", time.time() - t0)
    _free_device_cache()
    # with the prepared teachers: a `student_from` spec's student is one of them
    n_student = student_params(condition_config(spec, spec.baseline, use_seeds[0], teachers))
    configs = {
        (n, s): condition_config(spec, n, s, teachers, flops_steps(spec, n, teachers, n_student))
        for n in first
        for s in use_seeds
    }
    extraction = prepare_caches(spec, out, configs, teachers)
    log.info("phase caches done after %.0f s", time.time() - t0)
    configs = {k: condition_config(spec, k[0], k[1], teachers, cfg.train.steps) for k, cfg in configs.items()}
    estimate = memory.run_estimator(teachers)
    concurrent = resolve_concurrent(spec, list(configs.values()), teachers, estimate)
    wall: dict[tuple[str, int], RunConfig] = {}

    def wall_matched() -> dict[tuple[str, int], RunConfig]:
        """The wall-time-matched runs, once the runs they are measured on have all finished training."""
        needed = {
            c
            for n in later
            for c in (spec.conditions[n].match_wall_of, spec.conditions[n].wall_rate_of or spec.baseline)
        }
        summaries = {(n, s): run_dir(out, n, s) / "summary.json" for n in needed for s in use_seeds}
        if wall or not later or not all(p.is_file() for p in summaries.values()):
            return {}
        measured = {
            n: [_measured(spec, n, json.loads(summaries[n, s].read_text()), extraction) for s in use_seeds]
            for n in needed
        }
        wall.update(
            {
                (n, s): condition_config(spec, n, s, teachers, wall_steps(spec, n, measured))
                for n in later
                for s in use_seeds
            }
        )
        return wall

    _train_and_score(
        spec,
        out,
        configs,
        teachers,
        concurrent,
        extraction,
        n_student,
        more=wall_matched,
        estimate=estimate,
        first=sorted(
            {
                c
                for n in later
                for c in (spec.conditions[n].match_wall_of, spec.conditions[n].wall_rate_of or spec.baseline)
            }
        ),
    )
    if later and not wall:
        raise KvdistillError(
            "the runs that wall-time matching is measured on did not all finish",
            "read the logs under DIR/runs; rerun the same command to resume",
        )
    configs.update(wall)
    log.info(
        "phase runs trained and scored after %.0f s (%d runs, %d at once)",
        time.time() - t0,
        len(configs),
        concurrent,
    )
    results = collect(spec, out, names, use_seeds, teachers)
    results["extraction"] = extraction
    results["concurrent"] = concurrent
    results["flops_per_token"] = {n: flops_per_token(spec, n, teachers, n_student) for n in names}
    results["student_params"] = n_student
    return _write(results, spec, out, names, use_seeds, data_sizes, held, val)


def _write(
    results: dict,
    spec: ExperimentSpec,
    out: Path,
    names: list[str],
    seeds: list[int],
    data_sizes: dict[str, int],
    held: list[dict],
    val: list[dict],
) -> dict:
    """Add the data each condition trained on and the held-out ids to `results`, write them; returns them."""
    from kvdistill.experiments.results import write_results

    results["train_records"] = {n: data_sizes[f"{n}/seed-{seeds[0]}"] for n in names}
    results["teacher_train_records"] = {p.name: data_sizes.get(f"teacher {p.name}", 0) for p in spec.teachers}
    results["test_ids"] = [r["id"] for r in held]
    results["val_ids"] = [r["id"] for r in val]
    write_results(results, spec, out)
    return results


def _scored(out: Path, name: str, seed: int) -> bool:
    """Whether the run has the experiment's own test record (a `kvdistill eval` of it is not one)."""
    path = run_dir(out, name, seed) / "eval.json"
    return path.is_file() and json.loads(path.read_text()).get("written_by") != "kvdistill eval"


def _reported(spec: ExperimentSpec, out: Path, names: list[str], seeds: list[int]) -> tuple[dict, list[str]]:
    """`run_experiment(report=True)`: the results of the runs already scored (its docstring), and the
    conditions they hold."""
    from kvdistill.experiments.results import collect
    from kvdistill.experiments.teachers import teachers_needed
    from kvdistill.paths import marker_kind

    if marker_kind(out) != "experiment":
        raise KvdistillError(
            f"--report: {out} is not an experiment directory (no marker of `kvdistill experiment`)",
            "pass the --out of an experiment that has run, or run it without --report",
        )
    scored = {(n, s) for n in names for s in seeds if _scored(out, n, s)}  # each eval.json read once here
    unscored = [f"{n}/seed-{s}" for n in names for s in seeds if (n, s) not in scored]
    missing_base = [r for r in unscored if r.startswith(f"{spec.baseline}/")]
    if missing_base:
        raise KvdistillError(
            f"--report: the baseline's runs {missing_base} are not scored, so nothing can be compared",
            "rerun without --report to train and score them, or pass --seeds N for the seeds it has",
        )
    complete = [n for n in names if all((n, s) in scored for s in seeds)]
    teachers = {}
    for t in teachers_needed(spec, complete):
        record = out / "teachers" / t / "teacher.json"
        if record.is_file():
            model = str(student_of(out / "teachers" / t / "final"))
            teachers[t] = {"model": model, **json.loads(record.read_text())}
    results = collect(spec, out, complete, seeds, teachers)
    results["unscored"] = unscored
    # what each run was charged, as its record holds it (the students' weights need not be here)
    first = {n: json.loads((run_dir(out, n, seeds[0]) / "eval.json").read_text()) for n in complete}
    results["flops_per_token"] = {  # the per-token formula's: without an on-policy run's sampling
        n: round((e["train_flops"] - e.get("generation_flops", 0)) / e["tokens"])
        if e.get("train_flops") and e.get("tokens")
        else None
        for n, e in first.items()
    }
    log.info("report of %d conditions; %d runs not scored: %s", len(complete), len(unscored), unscored)
    return results, complete


def _free_device_cache() -> None:
    """Give the blocks this process cached while scoring the teachers back to the device before the runs start
    (the runner itself keeps only its CUDA context; extraction and scoring run in child processes)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _measured(spec: ExperimentSpec, name: str, summary: dict, extraction: dict) -> dict:
    """What `wall_steps` reads of a finished run: its training seconds, steps trained, amortised extraction
    s."""
    cond = spec.conditions[name]
    share = sum(extraction[t]["seconds_per_reader"] for t in cond.teachers) if cond.cache else 0.0
    return {
        "train_s": summary.get("train_s", summary["elapsed_s"]),
        "steps_trained": summary["steps"],
        "amortised_s": share,
    }


def _train_and_score(
    spec: ExperimentSpec,
    out: Path,
    configs: dict[tuple[str, int], RunConfig],
    teachers: dict[str, dict],
    concurrent: int,
    extraction: dict,
    n_student: int,
    *,
    more=None,
    first: list[str] = (),
    estimate: Callable[[RunConfig], int] | None = None,
) -> None:
    """Train the runs of `configs` not finished yet, then score each on the test split (eval.json, `score`):
    its figures, the student it was scored with (best or final), steps trained, selected step, wall time,
    FLOPs (`flops_per_token` per student token) and, for a cached condition, its amortised extraction share.
    Scoring runs `concurrent` at once in child processes (in this process when concurrent is 1).

    Training order: the conditions in `first` (what wall-time matching is measured on), then the longest runs
    first; `more()`, asked whenever a run ends, gives further runs (the wall-time-matched ones) that join the
    queue and `configs`. `estimate`: each run's bytes for the memory gate (`train_all`)."""
    from kvdistill.config import dump_config

    def done(n, s):
        return (student_of(run_dir(out, n, s) / "final") / "config.json").is_file()

    order = sorted(
        configs, key=lambda k: (k[0] not in first, -configs[k].train.steps * (1 + len(configs[k].teachers)))
    )
    pending = [(run_dir(out, n, s), configs[n, s]) for n, s in order if not done(n, s)]

    def extra_runs():
        new = more() if more is not None else {}
        configs.update(new)
        return [(run_dir(out, n, s), cfg) for (n, s), cfg in new.items() if not done(n, s)]

    train_all(pending, concurrent, more=extra_runs, estimate=estimate, ramp_s=spec.memory_ramp_s)
    log.info("all %d runs trained; scoring the unscored ones on the test split", len(configs))
    probe = {t: info["model"] for t, info in teachers.items()} if spec.eval.probe else None
    jobs = []
    for (n, s), cfg in configs.items():  # the baseline's untrained students, a 'before' beside the runs
        d = out / "init" / f"seed-{s}"
        if spec.eval.init and n == spec.baseline and not (d / "eval.json").is_file():
            d.mkdir(parents=True, exist_ok=True)
            (d / "scored-config.yaml").write_text(dump_config(cfg))
            jobs.append(
                {
                    "spec": spec.model_dump(mode="json"),
                    "config": str(d / "scored-config.yaml"),
                    "init": True,
                    "probe_teachers": probe,
                    "record": str(d / "eval.json"),
                }
            )
    for (n, s), cfg in configs.items():
        d = run_dir(out, n, s)
        if _scored(out, n, s):
            continue
        summary = json.loads((d / "summary.json").read_text())
        best = d / "best" / "student"
        selected = cfg.train.early_stopping is not None and best.is_dir()
        scored = best if selected else student_of(d / "final")
        per_token = flops_per_token(spec, n, teachers, n_student)
        trained = int(summary["steps"])
        sel_step = int(summary["best_step"]) if selected else trained
        cond = spec.conditions[n]
        share_s = sum(extraction[t]["seconds_per_reader"] for t in cond.teachers) if cond.cache else 0.0
        share_f = sum(extraction[t]["flops_per_reader"] for t in cond.teachers) if cond.cache else 0.0
        generated, gen_flops = generation(d / "metrics.jsonl", n_student)  # on-policy sampling
        train_flops = per_token * summary["tokens"] + gen_flops
        extra = dict(
            elapsed_s=summary.get("elapsed_s"),
            train_s=summary.get("train_s", summary.get("elapsed_s")),
            steps=cfg.train.steps,
            steps_trained=trained,
            selected_step=sel_step,
            scored="best" if selected else "final",
            stopped_early=bool(summary.get("stopped_early", False)),
            tokens=summary["tokens"],
            flops=train_flops + share_f,
            train_flops=train_flops,
            flops_selected=train_flops / max(trained, 1) * sel_step + share_f,
            generated_tokens=generated,
            generation_flops=gen_flops,
            amortised_s=share_s,
            amortised_flops=share_f,
        )
        # the routing accuracy training's own held-out evaluation gave the trained fusion (Objective.evaluate)
        extra.update(
            {k.removeprefix("eval/"): v for k, v in summary.items() if k.startswith("eval/routing_acc")}
        )
        config = d / "scored-config.yaml"
        config.write_text(dump_config(cfg))
        routing = teachers[spec.eval.routing_teacher]["model"] if spec.eval.routing_teacher else None
        jobs.append(
            {
                "spec": spec.model_dump(mode="json"),
                "config": str(config),
                "scored": str(scored),
                "extra": extra,
                "routing_teacher": routing,
                "probe_teachers": probe,
                "record": str(d / "eval.json"),
            }
        )
    if concurrent == 1:
        for job in jobs:
            score(job)
        _free_device_cache()
        return
    paths = []
    for job in jobs:
        path = Path(job["record"]).with_name("score-job.json")
        write_json_atomic(path, job)
        paths.append(str(path))
    # `concurrent` children, each scoring its share of the runs (one start-up per child, not per run); no
    # estimate of a scoring child's memory: the gate admits one while any is free
    (out / "logs").mkdir(exist_ok=True)
    commands = [
        Job(
            [sys.executable, "-m", "kvdistill.experiments.score", *paths[k::concurrent]],
            out / "logs" / f"score-{k}.log",
            f"scoring {len(paths[k::concurrent])} runs",
        )
        for k in range(min(concurrent, len(paths)))
    ]
    run_pool(commands, concurrent, "scoring", ramp_s=spec.memory_ramp_s)


def _only(spec: ExperimentSpec, only: list[str]) -> list[str]:
    unknown = [n for n in only if n not in spec.conditions]
    if unknown:
        raise KvdistillError(
            f"--only {unknown}: not conditions of '{spec.name}'", f"use some of {', '.join(spec.conditions)}"
        )
    # the baseline is always run (comparisons need it), and what a wall-time-matched condition is measured on
    wall = [
        c
        for n in only
        if spec.conditions[n].match_wall_of
        for c in (spec.conditions[n].match_wall_of, spec.conditions[n].wall_rate_of or spec.baseline)
    ]
    return list(dict.fromkeys([spec.baseline, *wall, *only]))
