"""The pool of child processes the experiment runner trains and scores in: `Job` (a child's command, log and
memory estimate), `run_pool` (at most `concurrent` at once, each further child admitted by the memory gate of
`kvdistill.experiments.memory` on a CUDA device), `train_all` (runs trained in this process or as
`kvdistill train` children) and `resolve_concurrent` (`spec.concurrent`, or for auto how many runs the free
memory holds).

Out-of-memory retries: the gate's estimate can be too low (children that share the card hold more than it
said), and then one child dies of CUDA out of memory while the others run. Such a death is not a failure of
the run, only of the sharing, so `run_pool` puts the job back at the head of its queue (`requeued`) where

    the child exited non-zero, the tail of its log written by this attempt (`out_of_memory`: at most the last
    `OOM_TAIL` bytes from the log's size when it started) names CUDA out of memory (`OOM_MARKS`), and
    another child ran at some time during its life (shared: one of this pool's, or another pool's start
    that the `memory.Ledger` showed in its ramp when this child started or ended, or, when it ended, other
    processes holding memory on the card, `memory.others_hold_memory`; the ledger and the card only on CUDA),

at most `MAX_OOM_RETRIES` (2) times per job: the first retry with its `need` doubled (a job without an
estimate instead runs alone), the second alone. Alone (`Job.alone`, `admits_job`): admitted only where no
child runs, none of this pool's (with or without CUDA) and none of the other pools' in their ramp (on CUDA),
and no further child of this pool starts while it runs. A third out-of-memory death, one of a child that ran
with nothing else running, and every other non-zero exit fail as before. A requeued job resumes:
`with_resume` appends `--resume` to its command where `Job.resume_if` (a training run's config.yaml, set by
`train_job`) exists by then. Each requeue is logged as a warning naming the job, the attempt and its rule.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from kvdistill.config.schema import RunConfig
from kvdistill.errors import KvdistillError
from kvdistill.experiments import memory
from kvdistill.experiments.spec import ExperimentSpec

log = logging.getLogger(__name__)

MAX_OOM_RETRIES = 2  # requeues per job after dying of CUDA out of memory beside other children
OOM_TAIL = 64 * 1024  # bytes of this attempt's log tail searched for OOM_MARKS
OOM_MARKS = ("CUDA out of memory", "torch.OutOfMemoryError", "CUDA error: out of memory")


class Job(NamedTuple):
    """A child process of `run_pool`: its command, log file, label, estimated device memory (bytes; None:
    not known), `resume_if` (a file whose existence makes the command carry `--resume`, `with_resume`; None:
    the command runs as it is), `alone` (admitted only where no other child runs, and none starts beside it)
    and `retries` (times it was requeued after dying of CUDA out of memory, `requeued`)."""

    command: list[str]
    log: Path
    label: str
    need: int | None = None
    resume_if: Path | None = None
    alone: bool = False
    retries: int = 0


def with_resume(job: Job) -> Job:
    """`job` whose command ends in `--resume` where `job.resume_if` is a file now and the command lacks it;
    otherwise `job` itself."""
    if job.resume_if is None or not job.resume_if.is_file() or "--resume" in job.command:
        return job
    return job._replace(command=[*job.command, "--resume"])


def requeued(job: Job) -> Job | None:
    """What goes back at the head of the queue after `job` died of CUDA out of memory beside other children:
    on its first retry its need doubled (alone where need is None), on its second alone, resumed
    (`with_resume`) either way; None after `MAX_OOM_RETRIES` retries (it fails)."""
    if job.retries >= MAX_OOM_RETRIES:
        return None
    if job.retries == 0 and job.need is not None:
        return with_resume(job._replace(need=2 * job.need, retries=1))
    return with_resume(job._replace(alone=True, retries=job.retries + 1))


def out_of_memory(logpath: Path, offset: int, tail: int = OOM_TAIL) -> bool:
    """Whether the log written since byte `offset` (the log's size when the child started) names CUDA out
    of memory (any of `OOM_MARKS`) in its last `tail` bytes."""
    try:
        with logpath.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(offset, size - tail))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return False
    return any(mark in text for mark in OOM_MARKS)


def admits_job(
    job: Job,
    free: int | None,
    started: list[memory.Started],
    now: float,
    ramp_s: float,
    *,
    alone_running: bool = False,
) -> bool:
    """Whether `job` may start now: never while a child of this pool that runs alone is running
    (`alone_running`); a job with `alone` only where `started` (this pool's running children and, on CUDA,
    the other pools' starts in their ramp) is empty; any other by `memory.admits` on its `need` (`free`
    bytes free, None without CUDA: admitted)."""
    if alone_running:
        return False
    if job.alone:
        return not started
    return memory.admits(job.need, free, started, now, ramp_s)


def _wait_note(
    job: Job, free: int | None, started: list[memory.Started], now: float, ramp_s: float, alone: str | None
) -> str:
    """Why `admits_job` keeps `job` waiting; `alone`: the label of this pool's child running alone."""
    if alone is not None:
        return f"waiting for {alone} to end: it runs alone"
    if job.alone:
        return f"waiting to run alone: {len(started)} children running (or other pools' in their ramp)"
    return memory.wait_note(job.need, free, started, now, ramp_s)


def train_job(d: Path, cfg: RunConfig, need: int | None = None) -> Job:
    """The `kvdistill train` child of the run in `d`: its config written beside it (d.yaml), its log d.log,
    `need` its estimate; `--resume` where the run has started (d/config.yaml exists), now and again at each
    requeue (`with_resume`)."""
    from kvdistill.config import dump_config

    d.parent.mkdir(parents=True, exist_ok=True)
    config = d.parent / f"{d.name}.yaml"
    config.write_text(dump_config(cfg))
    cmd = [sys.executable, "-m", "kvdistill.cli", "train", str(config), "--out", str(d)]
    return with_resume(Job(cmd, d.parent / f"{d.name}.log", str(d), need, resume_if=d / "config.yaml"))


def train_all(
    pending: list[tuple[Path, RunConfig]],
    concurrent: int,
    *,
    more=None,
    estimate: Callable[[RunConfig], int] | None = None,
    ramp_s: float = memory.RAMP_S,
) -> None:
    """Train the pending runs: `concurrent` at once as separate `kvdistill train` processes (they share the
    GPU; `train_job`), or, with `concurrent` 1 and no CUDA device, in this process one after the other. On a
    CUDA device one at a time also runs as children, so the memory gate applies to them as to any run and
    this process keeps none of a run's memory after it (on 2026-12-08 a teacher trained in the runner's
    process, ungated, died of out of memory beside another spec's runs). A killed run resumes from its last
    checkpoint, and so does one that `run_pool` requeues after dying of CUDA out of memory. `more()`, asked
    whenever a run ends (and once at the end), gives further runs to train. `estimate(cfg)`: a run's bytes
    (`memory.run_estimator`), what `run_pool`'s memory gate admits it on (asked only on a CUDA device);
    None: the gate knows no estimate."""
    import torch

    from kvdistill.train.trainer import train

    if concurrent == 1 and not torch.cuda.is_available():
        queue = list(pending) + (more() if more is not None else [])
        while queue:
            d, cfg = queue.pop(0)
            log.info("training %s (%d steps)", d, cfg.train.steps)
            train(cfg, d, resume=(d / "config.yaml").is_file())  # a started run resumes (or restarts cleanly)
            queue += more() if more is not None else []
        return
    gated = estimate is not None and torch.cuda.is_available()  # the gate does nothing without CUDA

    def command(d: Path, cfg: RunConfig) -> Job:
        return train_job(d, cfg, estimate(cfg) if gated else None)

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
    of the children started in the last `ramp_s` seconds (this pool's, and other experiments' on this machine
    through `memory.Ledger`) must cover its `need` (be > 0 where need is None); with no child running (none
    of its own, none of the others' in their ramp) it starts regardless. Without CUDA the gate does
    nothing.

    A child that dies of CUDA out of memory while another child ran goes back at the head of the queue, at
    most twice (the module docstring): first with its need doubled (alone where need is None), then alone
    (`admits_job`: where nothing else runs, and nothing of this pool starts beside it, with or without
    CUDA); each requeue is logged as a warning, and the requeued command resumes (`with_resume`)."""
    queue = list(jobs)
    running: list[_Child] = []
    failed: list[str] = []
    ledger = memory.Ledger()
    if more is not None:
        queue += more()  # resumed experiments: what it waits for may be finished already
    try:
        _drain(queue, running, failed, concurrent, what, more, ledger, ramp_s, poll_s)
    finally:
        ledger.close()
    if failed:
        raise KvdistillError(
            f"{what} failed for {', '.join(failed)}",
            "read the logs; rerun the same command to resume the missing runs",
        )


@dataclass
class _Child:
    """A running child of `run_pool`: its process, its job, its log's size when it started (this attempt's
    output follows it), its entry for the gate, and whether another child ran at some time during its life
    (`shared`, the module docstring)."""

    proc: subprocess.Popen
    job: Job
    offset: int
    started: memory.Started
    shared: bool


def _drain(queue, running, failed, concurrent, what, more, ledger, ramp_s, poll_s) -> None:
    """`run_pool`'s loop: start what the count and the gate admit, reap what ended (requeueing a child that
    died of out of memory beside others, `requeued`), until nothing is left."""
    reading: tuple[int | None, float] | None = None  # (free bytes, when read): None once stale
    cuda = False  # the last reading had a CUDA device: the ledger is read and written
    waits_for = None  # the job whose wait was logged
    while queue or running:
        while queue and len(running) < concurrent:
            now = time.monotonic()
            if reading is None or now - reading[1] >= poll_s:
                reading = (memory.cuda_free_bytes(), now)
            free = reading[0]
            cuda = free is not None
            started = [c.started for c in running]
            if cuda:  # the other experiments' children in their ramp (memory.Ledger)
                started += ledger.others(now, ramp_s)
            job = queue[0]
            alone = next((c.job.label for c in running if c.job.alone), None)
            if not admits_job(job, free, started, now, ramp_s, alone_running=alone is not None):
                if waits_for is not job:
                    log.info("%s %s: %s", what, job.label, _wait_note(job, free, started, now, ramp_s, alone))
                    waits_for = job
                break
            if not running and cuda and (free <= 0 if job.need is None else job.need > free):
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
                offset = logfile.seek(0, os.SEEK_END)  # this attempt's output starts here
                proc = subprocess.Popen(job.command, stdout=logfile, stderr=subprocess.STDOUT)
            if started:  # it shares the card with these: each of this pool's now ran beside another
                for c in running:
                    c.shared = True
            running.append(
                _Child(proc, job, offset, memory.Started(job.need, time.monotonic()), bool(started))
            )
            if cuda:
                ledger.record(job.need, ramp_s)
        time.sleep(0.5)
        retries: list[Job] = []  # requeued in the order their children ended
        for child in list(running):
            proc, job = child.proc, child.job
            if proc.poll() is None:
                continue
            running.remove(child)
            reading = None  # memory came free: read it again
            if proc.returncode == 0:
                if more is not None:
                    queue += more()
                continue
            oom = out_of_memory(job.log, child.offset)
            shared = oom and (
                child.shared
                or bool(running)
                or (cuda and (bool(ledger.others(time.monotonic(), ramp_s)) or memory.others_hold_memory()))
            )  # the ledger and the card are read only for a child that died of out of memory
            retry = requeued(job) if shared else None
            if retry is None:
                note = f", CUDA out of memory on attempt {job.retries + 1}" if oom else ""
                failed.append(f"{job.label} (exit {proc.returncode}{note}, log {job.log})")
                continue
            log.warning(
                "%s %s: CUDA out of memory beside other children on attempt %d; requeued at the head of the "
                "queue as attempt %d, %s%s",
                what,
                job.label,
                job.retries + 1,
                retry.retries + 1,
                "to run alone" if retry.alone else f"its need doubled to {retry.need / memory.GIB:.1f} GiB",
                ", resuming" if "--resume" in retry.command else "",
            )
            retries.append(retry)
        queue[:0] = retries


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
