"""The pool of child processes: `train_all` with `concurrent: 2` gives the students in-process training gives;
`run_pool` waits for the memory gate, runs every job in order, never deadlocks on a job larger than the free
memory, and without CUDA is bounded by `concurrent` only."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

from kvdistill.experiments.memory import GIB
from kvdistill.experiments.pool import Job, run_pool, train_all


def test_concurrent_runs_in_subprocesses_equal_in_process_training(tiny_config, tmp_path):
    """`concurrent: 2` trains each run as its own `kvdistill train` process; the students equal the ones the
    same configs give when trained in this process, one after the other."""
    from safetensors.torch import load_file

    configs = [tiny_config("train.steps=2", f"train.seed={s}") for s in (0, 1)]
    train_all(
        [(tmp_path / "sub" / f"seed-{s}", c) for s, c in zip((0, 1), configs, strict=True)], concurrent=2
    )
    train_all(
        [(tmp_path / "inproc" / f"seed-{s}", c) for s, c in zip((0, 1), configs, strict=True)], concurrent=1
    )
    for s in (0, 1):
        a = load_file(str(tmp_path / "sub" / f"seed-{s}" / "final" / "model.safetensors"))
        b = load_file(str(tmp_path / "inproc" / f"seed-{s}" / "final" / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "sub" / "seed-0.log").is_file()


# -------------------------------------------------------------------------------------- the pool's gate
SLEEPER = (
    "import sys, time; t0 = time.time(); time.sleep(float(sys.argv[2])); "
    "open(sys.argv[1], 'w').write(f'{t0} {time.time()}')"
)


def pool_jobs(tmp_path, n: int, need: int | None, sleep_s: float):
    """n children that each sleep `sleep_s` and write their (start, end) time to tmp_path/job-i."""
    return [
        Job(
            [sys.executable, "-c", SLEEPER, str(tmp_path / f"job-{i}"), str(sleep_s)],
            tmp_path / f"job-{i}.log",
            f"job-{i}",
            need,
        )
        for i in range(n)
    ]


def spans(tmp_path, n: int) -> list[tuple[float, float]]:
    return [tuple(map(float, (tmp_path / f"job-{i}").read_text().split())) for i in range(n)]


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    return max(sum(1 for s, e in intervals if s <= t < e) for t, _ in intervals)


def test_the_pool_waits_for_memory_and_runs_every_job_in_order(tmp_path, monkeypatch, caplog):
    """10 GiB free, 4 GiB per job, children inside the ramp: two at once although concurrent allows five;
    every job runs, in order, and each waiting job says once why it waits."""
    import subprocess

    from kvdistill.experiments import memory

    popen, started = subprocess.Popen, []  # (label, children of the pool still alive when it started)

    def recording_popen(cmd, **kw):
        alive = sum(1 for _, p in started if p.poll() is None)
        proc = popen(cmd, **kw)
        started.append((Path(cmd[-2]).name, proc))
        alive_at_start.append(alive)
        return proc

    alive_at_start: list[int] = []
    monkeypatch.setattr(subprocess, "Popen", recording_popen)
    monkeypatch.setattr(memory, "cuda_free_bytes", lambda: 10 * GIB)
    caplog.set_level(logging.INFO, logger="kvdistill.experiments.pool")
    run_pool(pool_jobs(tmp_path, 6, 4 * GIB, 0.5), 5, "training", ramp_s=600.0, poll_s=0.1)
    assert [label for label, _ in started] == [f"job-{i}" for i in range(6)]  # every job, in order
    assert max(alive_at_start) <= 1  # never a third beside two
    assert most_at_once(spans(tmp_path, 6)) <= 2
    waits = [r.getMessage() for r in caplog.records if "waiting for" in r.getMessage()]
    assert waits and all("waiting for 4.0 GiB of GPU memory: 10.0 GiB free, 8.0 GiB" in m for m in waits)
    assert len(waits) == len({m.split(":")[0] for m in waits}) <= 4  # once per waiting job (jobs 2-5)


def test_a_job_larger_than_the_free_memory_runs_alone_never_deadlocks(tmp_path, monkeypatch, caplog):
    from kvdistill.experiments import memory

    monkeypatch.setattr(memory, "cuda_free_bytes", lambda: 10 * GIB)
    caplog.set_level(logging.INFO, logger="kvdistill.experiments.pool")
    run_pool(pool_jobs(tmp_path, 2, 20 * GIB, 0.2), 2, "training", ramp_s=600.0, poll_s=0.1)
    (s0, e0), (s1, _) = spans(tmp_path, 2)
    assert e0 <= s1  # one after the other
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "exceeds" in r.getMessage()]
    assert len(warned) == 2


def test_without_cuda_the_pool_is_bounded_by_concurrent_only(tmp_path, monkeypatch):
    from kvdistill.experiments import memory

    monkeypatch.setattr(memory, "cuda_free_bytes", lambda: None)
    run_pool(pool_jobs(tmp_path, 3, 100 * GIB, 1.5), 3, "training", ramp_s=600.0, poll_s=0.1)
    times = spans(tmp_path, 3)
    assert max(s for s, _ in times) < min(e for _, e in times)  # all three at once


def test_the_pool_counts_another_experiments_recent_starts(tmp_path, monkeypatch):
    """Another pool on the machine (another pid in the ledger) started a 8 GiB child a moment ago: with 10 GiB
    free this pool's first 4 GiB job waits until that start leaves the ramp, then runs; nothing stays
    behind."""
    import time

    from kvdistill.experiments import memory

    monkeypatch.setattr(memory, "cuda_free_bytes", lambda: 10 * GIB)
    other = memory.Ledger(pid=1)  # the ledger path comes from KVDISTILL_GPU_LEDGER (conftest): tmp
    other.record(8 * GIB, ramp_s=1.5)
    t0 = time.time()
    run_pool(pool_jobs(tmp_path, 1, 4 * GIB, 0.1), 2, "training", ramp_s=1.5, poll_s=0.1)
    ((start, _),) = spans(tmp_path, 1)
    assert start - t0 >= 1.2  # waited for the other pool's child to leave its ramp
    # this pool's start was recorded, then removed at its end with the other's expired one: no file is left
    assert not other.path.exists()


def test_without_cuda_the_pool_writes_no_ledger(tmp_path, monkeypatch):
    import os

    from kvdistill.experiments import memory

    monkeypatch.setattr(memory, "cuda_free_bytes", lambda: None)
    run_pool(pool_jobs(tmp_path, 2, 4 * GIB, 0.1), 2, "training", ramp_s=600.0, poll_s=0.1)
    assert not Path(os.environ["KVDISTILL_GPU_LEDGER"]).exists()
