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
estimate (`run_pool`, the gate of `kvdistill.experiments.memory`), whatever `concurrent` says.

Where the base config sets train.early_stopping, a run is scored with its best validation checkpoint
(DIR/.../best/student), else with its final student.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import yaml

from kvdistill.atomic import write_json_atomic, write_text_atomic
from kvdistill.config import load_config
from kvdistill.config.schema import RunConfig
from kvdistill.data import load_records
from kvdistill.errors import KvdistillError
from kvdistill.experiments import memory
from kvdistill.experiments.conditions import base_raw, check_splits, condition_config, teacher_config
from kvdistill.experiments.score import evaluate_run, score
from kvdistill.experiments.spec import ExperimentSpec
from kvdistill.paths import claim, dir_problem
from kvdistill.rundir import student_dir as student_of

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- teachers
def teachers_needed(spec: ExperimentSpec, names: list[str]) -> list[str]:
    """The teachers the conditions `names` read, and the one the student starts from, in the spec's order."""
    used = {spec.student_from, *(t for n in names for t in spec.conditions[n].teachers)}
    return [prep.name for prep in spec.teachers if prep.name in used]


def prepare_teachers(
    spec: ExperimentSpec, out: Path, held: list[dict], names: list[str] | None = None
) -> dict[str, dict]:
    """Train (or reuse) the teachers the conditions `names` need (None: every teacher of the spec),
    `spec.concurrent` at once; a teacher of `steps: 0` is used as given. {name: {model, exact_match, ppl,
    params}}. Stops when one is below its required exact match."""
    from kvdistill.models.load import resolve_path

    wanted = set(teachers_needed(spec, names) if names is not None else (p.name for p in spec.teachers))
    preps = [prep for prep in spec.teachers if prep.name in wanted]
    given = {prep.name for prep in preps if prep.steps == 0}
    dirs = {prep.name: out / "teachers" / prep.name for prep in preps}
    configs = {prep.name: teacher_config(spec, prep) for prep in preps if prep.name not in given}
    pending = [
        (dirs[n], cfg)
        for n, cfg in configs.items()
        if not (dirs[n] / "teacher.json").is_file()
        and not (dirs[n] / "final" / "config.json").is_file()
        and not (dirs[n] / "final" / "student").is_dir()
    ]
    estimate = memory.run_estimator({})  # a teacher's own run reads no teachers
    train_all(
        pending,
        resolve_concurrent(spec, [cfg for _, cfg in pending], {}, estimate) if pending else 1,
        estimate=estimate,
        ramp_s=spec.memory_ramp_s,
    )
    info = {}
    for prep in preps:
        run_dir = dirs[prep.name]
        record = run_dir / "teacher.json"
        model = prep.model if prep.name in given else str(student_of(run_dir / "final"))
        if not record.is_file():
            got = {"params": _param_count(Path(resolve_path(model)))}
            if prep.name not in given or prep.min_exact_match > 0:  # a given teacher is scored where asked
                cfg = configs.get(prep.name) or load_config(raw=base_raw(spec))
                ev = evaluate_run(model, held, cfg, spec)
                got.update(
                    {
                        "exact_match": ev.get("exact_match"),
                        "ppl": ev["ppl"],
                        **{k: v for k, v in ev.items() if k.startswith("exact_match_")},
                        "samples": ev.get("samples", []),
                    }
                )
            run_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(record, got)
        got = json.loads(record.read_text())
        info[prep.name] = {"model": model, **got}
        # a specialist must be competent on its own skill (its held-out exact match there), others on
        # everything
        key = f"exact_match_{prep.skill}" if prep.skill else "exact_match"
        em = got.get(key)
        if prep.min_exact_match > 0 and (em is None or em < prep.min_exact_match):
            raise KvdistillError(
                f"teacher '{prep.name}' reached held-out exact "
                f"match{f' on {prep.skill}' if prep.skill else ''} {em} "
                f"< the required {prep.min_exact_match}: "
                "without competent teachers no comparison means anything",
                f"train it longer (teachers.{prep.name}.steps, now {prep.steps}) or larger, then rerun "
                f"(delete {record} to re-evaluate), or lower min_exact_match",
            )
    return info


def prepare_caches(
    spec: ExperimentSpec, out: Path, configs: dict[tuple[str, int], RunConfig], teachers: dict[str, dict]
) -> dict[str, dict]:
    """Extract (or reuse) the cache of every teacher a `cache: true` run of `configs` reads, holding exactly
    the records those runs read (`budget.records_read`), each in a child process: DIR/caches/NAME, its cost in
    DIR/caches/NAME.json; sets teachers[NAME]["cache_dir"]. Returns {NAME: {seconds, tokens, records, flops,
    readers, runs, seconds_per_reader, flops_per_reader}} (`budget.amortise`)."""
    from kvdistill.config.schema import TeacherConfig
    from kvdistill.experiments.budget import amortise, extract_in_child, records_read

    readers: dict[str, list[str]] = {}
    ids: dict[str, set[str]] = {}
    data_cfg = {}
    for (n, s), cfg in configs.items():
        if not spec.conditions[n].cache:
            continue
        read = records_read(cfg)
        for t in spec.conditions[n].teachers:
            readers.setdefault(t, []).append(f"{n}/seed-{s}")
            ids.setdefault(t, set()).update(read)
            pool = cfg.data.model_copy(update={"eval_size": 0, "val_size": 0, "train_size": None})
            if data_cfg.setdefault(t, pool) != pool:
                raise KvdistillError(
                    f"the cached runs of teacher '{t}' read different data pools ({n}: {pool})",
                    "give the cached conditions one data pool (they may differ in "
                    "data.train_size / eval_size / val_size only)",
                )
    costs = {}
    for t in sorted(readers):
        d = out / "caches" / t
        record = out / "caches" / f"{t}.json"
        if record.is_file() and json.loads(record.read_text()).get("ids") != _digest(ids[t]):
            raise KvdistillError(
                f"the cache of teacher '{t}' in {d} holds other records than these runs read",
                f"delete {d} and {record} (the runs changed), then rerun",
            )
        if not record.is_file():
            log.info("extracting the %d records of teacher %s the cached runs read", len(ids[t]), t)
            d.parent.mkdir(parents=True, exist_ok=True)
            res = extract_in_child(
                TeacherConfig(name=t, model=teachers[t]["model"]),
                data_cfg[t],
                d,
                ids[t],
                record.with_suffix(".part.json"),
            )
            write_json_atomic(record, {**res, "ids": _digest(ids[t])})
        teachers[t]["cache_dir"] = str(d)
        costs[t] = {k: v for k, v in json.loads(record.read_text()).items() if k != "ids"}
    return amortise(costs, readers, {t: teachers[t]["params"] for t in costs})


def _digest(ids: set[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]


def _param_count(student_dir: Path) -> int:
    """Parameters of a saved model, from its safetensors headers (no weights loaded)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(student_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():  # noqa: SIM118 (safe_open is not iterable)
                n = 1
                for d in st.get_slice(key).get_shape():
                    n *= int(d)
                total += n
    return total


def student_params(cfg: RunConfig) -> int:
    """Parameters of the run's student as built (from its checkpoint or config)."""
    from kvdistill.student import build_student

    model, _ = build_student(cfg.student, seed=cfg.train.seed)
    return sum(p.numel() for p in model.parameters())


def flops_steps(spec: ExperimentSpec, name: str, teachers: dict[str, dict], n_student: int) -> int | None:
    """Steps of a `match_flops_of` condition: the reference's steps times its per-token training FLOPs
    (6·N_s + 2·Σ N_t) over this condition's; None for a condition without it."""
    ref = spec.conditions[name].match_flops_of
    if ref is None:
        return None
    ref_steps = condition_config(spec, ref, spec.seeds[0], teachers).train.steps
    return max(
        1,
        round(
            ref_steps
            * flops_per_token(spec, ref, teachers, n_student)
            / flops_per_token(spec, name, teachers, n_student)
        ),
    )


def flops_per_token(spec: ExperimentSpec, name: str, teachers: dict[str, dict], n_student: int) -> int:
    """Training FLOPs per student token of condition `name`: 6·N_s + 2·Σ N_t over its online teachers (a
    cached teacher's forward is paid once, at extraction: `budget.amortise`)."""
    cond = spec.conditions[name]
    return 6 * n_student + (0 if cond.cache else 2 * sum(teachers[t]["params"] for t in cond.teachers))


def wall_steps(spec: ExperimentSpec, name: str, measured: dict[str, list[dict]]) -> int:
    """Steps of a `match_wall_of` condition: the median training seconds of the reference's runs (with their
    amortised extraction seconds) over the median seconds per step of `wall_rate_of`'s runs; `measured`:
    condition -> its runs' eval.json records (train_s, steps_trained, amortised_s)."""
    import statistics

    cond = spec.conditions[name]
    ref, rate = measured[cond.match_wall_of], measured[cond.wall_rate_of or spec.baseline]
    budget = statistics.median(r["train_s"] + r.get("amortised_s", 0.0) for r in ref)
    per_step = statistics.median(r["train_s"] / r["steps_trained"] for r in rate)
    return max(1, round(budget / per_step))


# ---------------------------------------------------------------------------------------------- runs
def run_dir(out: Path, name: str, seed: int) -> Path:
    return out / "runs" / name / f"seed-{seed}"


class Job(NamedTuple):
    """A child process of `run_pool`: its command, log file, label, and estimated device memory (bytes; None:
    not known)."""

    command: list[str]
    log: Path
    label: str
    need: int | None = None


def train_all(
    pending: list[tuple[Path, RunConfig]],
    concurrent: int,
    *,
    more=None,
    estimate: Callable[[RunConfig], int] | None = None,
    ramp_s: float = memory.RAMP_S,
) -> None:
    """Train the pending runs: in this process one after the other, or `concurrent` at once as separate
    `kvdistill train` processes (they share the GPU); a killed run resumes from its last checkpoint. `more()`,
    asked whenever a run ends (and once at the end), gives further runs to train. `estimate(cfg)`: a run's
    bytes (`memory.run_estimator`), what `run_pool`'s memory gate admits it on (asked only on a CUDA device);
    None: the gate knows no estimate."""
    import torch

    from kvdistill.config import dump_config
    from kvdistill.train.trainer import train

    if concurrent == 1:
        queue = list(pending) + (more() if more is not None else [])
        while queue:
            d, cfg = queue.pop(0)
            log.info("training %s (%d steps)", d, cfg.train.steps)
            train(cfg, d, resume=(d / "config.yaml").is_file())  # a started run resumes (or restarts cleanly)
            queue += more() if more is not None else []
        return
    gated = estimate is not None and torch.cuda.is_available()  # the gate does nothing without CUDA

    def command(d: Path, cfg: RunConfig) -> Job:
        d.parent.mkdir(parents=True, exist_ok=True)
        config = d.parent / f"{d.name}.yaml"
        config.write_text(dump_config(cfg))
        cmd = [sys.executable, "-m", "kvdistill.cli", "train", str(config), "--out", str(d)]
        if (d / "config.yaml").is_file():
            cmd.append("--resume")
        return Job(cmd, d.parent / f"{d.name}.log", str(d), estimate(cfg) if gated else None)

    run_pool(
        [command(d, cfg) for d, cfg in pending],
        concurrent,
        "training",
        more=None if more is None else lambda: [command(d, cfg) for d, cfg in more()],
        ramp_s=ramp_s,
    )


def run_pool(
    jobs: list[Job],
    concurrent: int,
    what: str,
    *,
    more=None,
    ramp_s: float = memory.RAMP_S,
    poll_s: float = memory.POLL_S,
) -> None:
    """Run the commands of `jobs` as child processes, in order, at most `concurrent` at once; `more()`, asked
    whenever one ends and once when none is left, gives further jobs. A KvdistillError names every one that
    failed.

    On a CUDA device the next job also waits until the memory gate admits it (`memory.admits`): the free
    device memory (read at most every `poll_s` seconds, and again whenever a child ends) less the estimates
    of the children started in the last `ramp_s` seconds must cover its `need` (be > 0 where need is None);
    with no child running it starts regardless. Without CUDA the gate does nothing."""
    queue = list(jobs)
    running: list[tuple[subprocess.Popen, Path, str, memory.Started]] = []
    failed = []
    reading: tuple[int | None, float] | None = None  # (free bytes, when read): None once stale
    waits_for = None  # the job whose wait was logged
    if more is not None:
        queue += more()  # resumed experiments: what it waits for may be finished already
    while queue or running:
        while queue and len(running) < concurrent:
            now = time.monotonic()
            if reading is None or now - reading[1] >= poll_s:
                reading = (memory.cuda_free_bytes(), now)
            free = reading[0]
            started = [r[3] for r in running]
            job = queue[0]
            if not memory.admits(job.need, free, started, now, ramp_s):
                if waits_for is not job:
                    log.info(
                        "%s %s: %s", what, job.label, memory.wait_note(job.need, free, started, now, ramp_s)
                    )
                    waits_for = job
                break
            if not running and free is not None and (free <= 0 if job.need is None else job.need > free):
                log.warning(
                    "%s %s: its estimate (%s) exceeds the %.1f GiB of free GPU memory; starting it anyway, "
                    "nothing else runs",
                    what,
                    job.label,
                    "not known" if job.need is None else f"{job.need / memory.GIB:.1f} GiB",
                    free / memory.GIB,
                )
            queue.pop(0)
            waits_for = None
            with job.log.open("a") as logfile:
                proc = subprocess.Popen(job.command, stdout=logfile, stderr=subprocess.STDOUT)
            running.append((proc, job.log, job.label, memory.Started(job.need, time.monotonic())))
        time.sleep(0.5)
        for item in list(running):
            proc, logpath, label, _ = item
            if proc.poll() is not None:
                running.remove(item)
                reading = None  # memory came free: read it again
                if proc.returncode != 0:
                    failed.append(f"{label} (exit {proc.returncode}, log {logpath})")
                elif more is not None:
                    queue += more()
    if failed:
        raise KvdistillError(
            f"{what} failed for {', '.join(failed)}",
            "read the logs; rerun the same command to resume the missing runs",
        )


def run_experiment(
    spec: ExperimentSpec, out: str | Path, *, only: list[str] | None = None, seeds: int | None = None
) -> dict:
    """Run (or resume) the experiment; returns the results also written to DIR/results.json."""
    from kvdistill.experiments.results import collect, write_results

    out = Path(out)
    # every argument checked before the first write: a refused command leaves DIR as it was
    names = list(spec.conditions) if not only else _only(spec, only)
    if seeds is not None and seeds < 1:
        raise KvdistillError(f"--seeds {seeds}: no seed to run", "pass --seeds 1 or more")
    use_seeds = spec.seeds[:seeds] if seeds else spec.seeds
    problem = dir_problem(out, "experiment")
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
    claim(out, "experiment")  # every argument checked: the first write
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
    results["train_records"] = {n: data_sizes[f"{n}/seed-{use_seeds[0]}"] for n in names}
    results["teacher_train_records"] = {p.name: data_sizes.get(f"teacher {p.name}", 0) for p in spec.teachers}
    results["test_ids"] = [r["id"] for r in held]
    results["val_ids"] = [r["id"] for r in val]
    results["concurrent"] = concurrent
    results["flops_per_token"] = {n: flops_per_token(spec, n, teachers, n_student) for n in names}
    results["student_params"] = n_student
    write_results(results, spec, out)
    return results


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
        if (d / "eval.json").is_file() and json.loads((d / "eval.json").read_text()).get(
            "written_by"
        ) != "kvdistill eval":
            continue  # scored already (a `kvdistill eval` of the run is not the experiment's record)
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
        extra = dict(
            elapsed_s=summary.get("elapsed_s"),
            train_s=summary.get("train_s", summary.get("elapsed_s")),
            steps=cfg.train.steps,
            steps_trained=trained,
            selected_step=sel_step,
            scored="best" if selected else "final",
            stopped_early=bool(summary.get("stopped_early", False)),
            tokens=summary["tokens"],
            flops=per_token * summary["tokens"] + share_f,
            train_flops=per_token * summary["tokens"],
            flops_selected=per_token * summary["tokens"] / max(trained, 1) * sel_step + share_f,
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


def resolve_concurrent(
    spec: ExperimentSpec,
    configs: list[RunConfig],
    teachers: dict[str, dict],
    estimate: Callable[[RunConfig], int] | None = None,
) -> int:
    """`spec.concurrent`, or for auto the number of runs the device's free memory holds
    (`kvdistill.experiments.memory`), each run's bytes by `estimate` (default: `memory.run_estimator`)."""
    if spec.concurrent != "auto":
        return spec.concurrent
    if not configs:
        return 1
    estimate = estimate or memory.run_estimator(teachers)
    return memory.auto_concurrent([estimate(cfg) for cfg in configs], memory.free_device_bytes())


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
