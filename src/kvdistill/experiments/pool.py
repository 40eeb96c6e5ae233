"""The pool of child processes the experiment runner trains and scores in: `Job` (a child's command, log and
memory estimate), `run_pool` (at most `concurrent` at once, each further child admitted by the memory gate of
`kvdistill.experiments.memory` on a CUDA device), `train_all` (runs trained in this process or as
`kvdistill train` children) and `resolve_concurrent` (`spec.concurrent`, or for auto how many runs the free
memory holds)."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from kvdistill.config.schema import RunConfig
from kvdistill.errors import KvdistillError
from kvdistill.experiments import memory
from kvdistill.experiments.spec import ExperimentSpec

log = logging.getLogger(__name__)


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
    of the children started in the last `ramp_s` seconds (this pool's, and other experiments' on this machine
    through `memory.Ledger`) must cover its `need` (be > 0 where need is None); with no child running (none
    of its own, none of the others' in their ramp) it starts regardless. Without CUDA the gate does
    nothing."""
    queue = list(jobs)
    running: list[tuple[subprocess.Popen, Path, str, memory.Started]] = []
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


def _drain(queue, running, failed, concurrent, what, more, ledger, ramp_s, poll_s) -> None:
    """`run_pool`'s loop: start what the count and the gate admit, reap what ended, until nothing is left."""
    reading: tuple[int | None, float] | None = None  # (free bytes, when read): None once stale
    waits_for = None  # the job whose wait was logged
    while queue or running:
        while queue and len(running) < concurrent:
            now = time.monotonic()
            if reading is None or now - reading[1] >= poll_s:
                reading = (memory.cuda_free_bytes(), now)
            free = reading[0]
            started = [r[3] for r in running]
            if free is not None:  # the other experiments' children in their ramp (memory.Ledger)
                started += ledger.others(now, ramp_s)
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
            if free is not None:
                ledger.record(job.need, ramp_s)
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
