"""The pool of child processes: `train_all` with `concurrent: 2` gives the students in-process training gives;
`run_pool` waits for the memory gate, runs every job in order, never deadlocks on a job larger than the free
memory, and without CUDA is bounded by `concurrent` only; a child that dies of CUDA out of memory beside
another is requeued (need doubled, then alone) at most twice, resuming, and any other failure is not."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

from kvdistill.errors import KvdistillError
from kvdistill.experiments.memory import GIB, Started
from kvdistill.experiments.pool import (
    Job,
    admits_job,
    out_of_memory,
    requeued,
    run_pool,
    train_all,
    train_job,
    with_resume,
)


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


def test_one_at_a_time_on_cuda_trains_children_through_the_gate(tiny_config, tmp_path, monkeypatch):
    """On a CUDA device `concurrent: 1` still trains each run as a `kvdistill train` child through
    `run_pool` (gated, its memory freed when it ends); without CUDA it trains in this process."""
    from kvdistill.experiments import pool

    calls = []
    monkeypatch.setattr(pool, "run_pool", lambda jobs, concurrent, *a, **kw: calls.append((jobs, concurrent)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    pending = [(tmp_path / f"seed-{s}", tiny_config("train.steps=2", f"train.seed={s}")) for s in (0, 1)]
    train_all(pending, concurrent=1, estimate=lambda cfg: 3 * GIB)
    [(jobs, concurrent)] = calls
    assert concurrent == 1 and [j.need for j in jobs] == [3 * GIB, 3 * GIB]
    assert [j.command[2:4] for j in jobs] == [["kvdistill.cli", "train"]] * 2
    assert not (tmp_path / "seed-0" / "final").exists()  # nothing trained in this process


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


# ------------------------------------------------------------------------ out-of-memory deaths: requeued
# A child that counts its attempts in argv[1] (one line each: its start time and argv[3:]), then exits by
# its attempt's entry of argv[2] ("oom": prints torch's out-of-memory error, exits 1; "bad": another error,
# exits 1; "ok": exits 0); it writes argv[3] (a run's config.yaml, when given) as a started run does.
FLAKY = """
import sys, time
from pathlib import Path
count, plan = Path(sys.argv[1]), sys.argv[2].split(",")
attempt = len(count.read_text().splitlines()) if count.exists() else 0
with count.open("a") as f:
    f.write(f"{time.time()} {' '.join(sys.argv[3:])}\\n")
if len(sys.argv) > 3 and sys.argv[3] != "--resume":
    Path(sys.argv[3]).write_text("started")
time.sleep(0.2)
outcome = plan[min(attempt, len(plan) - 1)]
if outcome == "oom":
    print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    sys.exit(1)
if outcome == "bad":
    print("ValueError: not a memory problem")
    sys.exit(1)
"""


def flaky_job(tmp_path, name: str, plan: str, need: int | None = None, *extra: str, **fields) -> Job:
    return Job(
        [sys.executable, "-c", FLAKY, str(tmp_path / f"{name}.attempts"), plan, *extra],
        tmp_path / f"{name}.log",
        name,
        need,
        **fields,
    )


def attempts(tmp_path, name: str) -> list[list[str]]:
    """Each attempt's line: [start time, its extra arguments...]."""
    return [line.split() for line in (tmp_path / f"{name}.attempts").read_text().splitlines()]


def companion(tmp_path, sleep_s: float) -> Job:
    """A child that runs `sleep_s` seconds beside the others (job-0 of `pool_jobs`)."""
    return pool_jobs(tmp_path, 1, None, sleep_s)[0]


@pytest.fixture
def no_cuda(monkeypatch):
    from kvdistill.experiments import memory

    monkeypatch.setattr(memory, "cuda_free_bytes", lambda: None)


def test_an_oom_beside_another_child_is_requeued_and_the_pool_succeeds(tmp_path, no_cuda, caplog):
    """The first attempt dies of out of memory while job-0 runs: requeued at the head, alone (no estimate),
    so its second attempt waits for job-0 to end and succeeds; run_pool succeeds and says why."""
    caplog.set_level(logging.INFO, logger="kvdistill.experiments.pool")
    run_pool(
        [companion(tmp_path, 1.2), flaky_job(tmp_path, "flaky", "oom,ok")],
        2,
        "training",
        ramp_s=600.0,
        poll_s=0.1,
    )
    tries = attempts(tmp_path, "flaky")
    assert len(tries) == 2  # run twice
    ((_, companion_end),) = spans(tmp_path, 1)
    assert float(tries[0][0]) < companion_end <= float(tries[1][0])  # the retry ran alone, after job-0
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == [
        "training flaky: CUDA out of memory beside other children on attempt 1; requeued at the head of the "
        "queue as attempt 2, to run alone"
    ]
    log = (tmp_path / "flaky.log").read_text()
    assert log.count("OutOfMemoryError") == 1  # both attempts appended to the one log


def test_an_oom_every_time_is_retried_twice_then_fails(tmp_path, no_cuda, caplog):
    """4 GiB estimate: attempt 1 (beside job-0) OOMs, attempt 2 with 8 GiB (still beside job-0, no CUDA
    here) OOMs, attempt 3 alone OOMs: three attempts, then the job is named in the error."""
    caplog.set_level(logging.WARNING, logger="kvdistill.experiments.pool")
    flaky = flaky_job(tmp_path, "flaky", "oom", 4 * GIB)
    with pytest.raises(KvdistillError) as err:
        run_pool([companion(tmp_path, 2.0), flaky], 2, "training", ramp_s=600.0, poll_s=0.1)
    assert len(attempts(tmp_path, "flaky")) == 3  # retried exactly twice
    assert "training failed for flaky (exit 1, CUDA out of memory on attempt 3, log " in str(err.value)
    assert "job-0" not in str(err.value)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2
    assert (
        "attempt 1; requeued at the head of the queue as attempt 2, its need doubled to 8.0 GiB" in warned[0]
    )
    assert "attempt 2; requeued at the head of the queue as attempt 3, to run alone" in warned[1]
    ((_, companion_end),) = spans(tmp_path, 1)
    assert float(attempts(tmp_path, "flaky")[2][0]) >= companion_end  # the third ran alone


def test_a_failure_that_is_not_out_of_memory_is_not_retried(tmp_path, no_cuda):
    with pytest.raises(KvdistillError, match=r"training failed for flaky \(exit 1, log "):
        run_pool(
            [companion(tmp_path, 1.0), flaky_job(tmp_path, "flaky", "bad,ok")], 2, "training", poll_s=0.1
        )
    assert len(attempts(tmp_path, "flaky")) == 1


def test_an_oom_with_nothing_else_running_is_not_retried(tmp_path, no_cuda):
    with pytest.raises(KvdistillError, match="flaky .exit 1, CUDA out of memory on attempt 1"):
        run_pool([flaky_job(tmp_path, "flaky", "oom,ok")], 2, "training", poll_s=0.1)
    assert len(attempts(tmp_path, "flaky")) == 1


@pytest.mark.parametrize("others", [True, False])
def test_an_oom_beside_another_processs_memory_is_requeued(tmp_path, monkeypatch, others):
    """On CUDA, nothing else of this pool running and no other pool's start in its ramp: a child that died of
    out of memory is requeued where other processes hold memory on the card (another experiment's runs past
    their ramp), and fails as before where they do not."""
    from kvdistill.experiments import memory

    monkeypatch.setattr(memory, "cuda_free_bytes", lambda: 10 * GIB)
    monkeypatch.setattr(memory, "others_hold_memory", lambda: others)
    jobs = [flaky_job(tmp_path, "flaky", "oom,ok")]
    if others:
        run_pool(jobs, 2, "training", poll_s=0.1)
        assert len(attempts(tmp_path, "flaky")) == 2
    else:
        with pytest.raises(KvdistillError, match="flaky .exit 1, CUDA out of memory on attempt 1"):
            run_pool(jobs, 2, "training", poll_s=0.1)
        assert len(attempts(tmp_path, "flaky")) == 1


def test_others_hold_memory_reads_the_card_less_this_process(monkeypatch):
    from kvdistill.experiments import memory

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    for free, total, expected in [(60, 80, True), (79, 80, False), (77.9, 80, True), (78.1, 80, False)]:
        monkeypatch.setattr(memory, "cuda_memory", lambda f=free, t=total: (int(f * GIB), int(t * GIB)))
        assert memory.others_hold_memory() is expected
    monkeypatch.setattr(memory, "cuda_memory", lambda: None)
    assert memory.others_hold_memory() is False  # no CUDA


def test_a_requeued_job_resumes_where_its_run_started(tmp_path, no_cuda):
    """The first attempt writes the run's config.yaml (as `kvdistill train` does) and dies of out of memory
    beside job-0; the second carries --resume, the first did not."""
    run = tmp_path / "run"
    run.mkdir()
    flaky = flaky_job(
        tmp_path, "flaky", "oom,ok", None, str(run / "config.yaml"), resume_if=run / "config.yaml"
    )
    run_pool([companion(tmp_path, 0.8), flaky], 2, "training", poll_s=0.1)
    assert [a[1:] for a in attempts(tmp_path, "flaky")] == [
        [str(run / "config.yaml")],
        [str(run / "config.yaml"), "--resume"],
    ]


def test_a_requeued_train_command_carries_resume_once_config_yaml_exists(tiny_config, tmp_path):
    """`train_job`'s `kvdistill.cli train` command of a run not yet started lacks --resume; once the run's
    config.yaml exists its requeued command ends in it, exactly once however often it is requeued."""
    d = tmp_path / "runs" / "seed-0"
    job = train_job(d, tiny_config("train.steps=2"), 3 * GIB)
    assert job.command[2:] == ["kvdistill.cli", "train", str(d.parent / "seed-0.yaml"), "--out", str(d)]
    assert requeued(job).command == job.command  # nothing started yet: a fresh start
    d.mkdir()
    (d / "config.yaml").write_text("started")
    first = requeued(job)
    assert first.command == [*job.command, "--resume"]
    assert requeued(first).command == first.command  # never twice
    assert train_job(d, tiny_config("train.steps=2")).command[-1] == "--resume"  # a resumed experiment


def test_requeued_doubles_the_need_then_runs_alone_then_gives_up(tmp_path):
    job = Job(["x"], tmp_path / "log", "run", 5 * GIB)
    first = requeued(job)
    assert (first.need, first.alone, first.retries) == (10 * GIB, False, 1)
    second = requeued(first)
    assert (second.need, second.alone, second.retries) == (10 * GIB, True, 2)
    assert requeued(second) is None
    unknown = requeued(Job(["x"], tmp_path / "log", "run"))  # no estimate: alone at once
    assert (unknown.need, unknown.alone, unknown.retries) == (None, True, 1)
    assert requeued(requeued(unknown)) is None
    assert with_resume(job) is job  # no resume_if: the command as it is


def test_admits_job_with_a_doubled_need_and_alone():
    """16 GiB free, one child of 4 GiB in its ramp: 12 GiB of room. A 6.3 GiB job fits, its doubled 12.6 GiB
    does not; alone fits only where nothing runs (even without CUDA); nothing starts beside one alone."""
    now, ramp = 100.0, 60.0
    beside = [Started(4 * GIB, now - 1.0)]
    job = Job(["x"], Path("log"), "run", int(6.3 * GIB))
    doubled = job._replace(need=int(12.6 * GIB))
    assert admits_job(job, 16 * GIB, beside, now, ramp)
    assert not admits_job(doubled, 16 * GIB, beside, now, ramp)
    assert admits_job(doubled, 16 * GIB, [], now, ramp)  # nothing runs: starts regardless
    alone = job._replace(alone=True)
    assert not admits_job(alone, 80 * GIB, beside, now, ramp)
    assert not admits_job(alone, 80 * GIB, [Started(4 * GIB, now - 120.0)], now, ramp)  # past its ramp too
    assert not admits_job(alone, None, beside, now, ramp)  # without CUDA too
    assert admits_job(alone, 80 * GIB, [], now, ramp) and admits_job(alone, None, [], now, ramp)
    assert not admits_job(job, 80 * GIB, [], now, ramp, alone_running=True)
    assert not admits_job(job, None, [], now, ramp, alone_running=True)


def test_out_of_memory_reads_only_this_attempts_tail(tmp_path):
    log = tmp_path / "job.log"
    log.write_text("torch.OutOfMemoryError: CUDA out of memory (an earlier attempt)\n")
    offset = log.stat().st_size
    assert out_of_memory(log, 0) and not out_of_memory(log, offset)
    with log.open("a") as f:
        f.write("RuntimeError: CUDA error: out of memory\n" + "x" * 100)
    assert out_of_memory(log, offset)
    assert not out_of_memory(log, offset, tail=50)  # the mark lies before the last 50 bytes
    assert not out_of_memory(tmp_path / "missing.log", 0)
