"""`concurrent: auto`: the per-run memory estimate and how many runs fit; the gate before a start."""

from __future__ import annotations

from kvdistill.experiments.memory import (
    CONTEXT,
    GIB,
    SLACK,
    Started,
    admits,
    auto_concurrent,
    cuda_free_bytes,
    free_device_bytes,
    run_bytes,
    unallocated,
    wait_note,
)

STUDENT = {"params": 16_000_000, "hidden": 256, "layers": 4, "vocab": 50_257}
GEMMA = {"params": 73_000_000, "hidden": 256, "layers": 6, "vocab": 262_144}


def test_run_bytes_by_hand():
    ce = run_bytes(batch=32, length=96, student=STUDENT, teachers=[], ahead=False)
    acts = 32 * 96 * (34 * 256 * 4 + 12 * 50_257)
    assert ce == int(SLACK * (16 * 16_000_000 + acts) + CONTEXT)
    kd = run_bytes(batch=32, length=96, student=STUDENT, teachers=[GEMMA], ahead=True)
    teacher = 2 * 73_000_000 + 2 * (2 * 32 * 96 * (2 * 256 * 6 + 8 * 256))
    assert kd - ce == int(SLACK * (16 * 16_000_000 + acts + teacher) + CONTEXT) - ce
    # logits only where logit KD reads them: the Gemma vocabulary dominates then
    assert (
        run_bytes(batch=32, length=96, student=STUDENT, teachers=[GEMMA], ahead=True, teacher_logits=True)
        > kd + GIB
    )


def test_auto_concurrent_is_bounded_by_memory_cores_and_runs():
    est = [4 * GIB] * 30
    assert auto_concurrent(est, free=80 * GIB, cores=16) == 16  # cores
    assert auto_concurrent(est, free=20 * GIB, cores=16) == 4  # 0.9 · 20 / 4
    assert auto_concurrent(est[:3], free=80 * GIB, cores=16) == 3  # runs
    assert auto_concurrent([100 * GIB], free=80 * GIB, cores=16) == 1  # never 0


# ---------------------------------------------------------------------------------------------- the gate
def test_the_gate_admits_while_the_free_memory_covers_the_estimate():
    old = [Started(need=4 * GIB, at=0.0)]  # started 100 s ago: allocated by now
    assert admits(4 * GIB, free=10 * GIB, running=old, now=100.0, ramp_s=60.0)
    assert admits(10 * GIB, free=10 * GIB, running=old, now=100.0, ramp_s=60.0)
    assert not admits(10 * GIB + 1, free=10 * GIB, running=old, now=100.0, ramp_s=60.0)


def test_a_recently_started_child_still_needs_its_whole_estimate():
    running = [Started(need=4 * GIB, at=0.0), Started(need=3 * GIB, at=90.0), Started(need=None, at=95.0)]
    # at 100 s only the child of 90 s is inside the ramp; one without an estimate counts nothing
    assert unallocated(running, now=100.0, ramp_s=60.0) == 3 * GIB
    assert unallocated(running, now=100.0, ramp_s=120.0) == 7 * GIB
    assert unallocated(running, now=150.0, ramp_s=60.0) == 0
    assert not admits(4 * GIB, free=6 * GIB, running=running, now=100.0, ramp_s=60.0)  # 6 - 3 < 4
    assert admits(3 * GIB, free=6 * GIB, running=running, now=100.0, ramp_s=60.0)  # 6 - 3 = 3
    assert admits(4 * GIB, free=6 * GIB, running=running, now=150.0, ramp_s=60.0)  # ramp over
    note = wait_note(4 * GIB, 6 * GIB, running, now=100.0, ramp_s=60.0)
    assert note == (
        "waiting for 4.0 GiB of GPU memory: 6.0 GiB free, 3.0 GiB of it not yet allocated by the 2 "
        "children started in the last 60 s (3 running)"
    )


def test_the_gate_always_admits_where_nothing_runs_or_without_cuda():
    assert admits(100 * GIB, free=1 * GIB, running=[], now=0.0, ramp_s=60.0)
    assert admits(None, free=0, running=[], now=0.0, ramp_s=60.0)
    busy = [Started(need=50 * GIB, at=0.0)]
    assert admits(100 * GIB, free=None, running=busy, now=1.0, ramp_s=60.0)  # no CUDA: no gate


def test_a_job_without_an_estimate_needs_only_some_free_memory():
    running = [Started(need=None, at=0.0)]
    assert admits(None, free=1, running=running, now=1.0, ramp_s=60.0)
    assert not admits(None, free=0, running=running, now=1.0, ramp_s=60.0)
    recent = [Started(need=8 * GIB, at=0.0)]  # free, but all of it the recent child's
    assert not admits(None, free=8 * GIB, running=recent, now=1.0, ramp_s=60.0)


def test_without_cuda_the_gate_reads_nothing_and_auto_reads_the_host(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cuda_free_bytes() is None
    assert free_device_bytes() > 0  # the host's available memory


def test_the_ledger_shows_each_pool_the_others_recent_starts_and_cleans_up(tmp_path):
    from kvdistill.experiments.memory import Ledger

    path = tmp_path / "starts.jsonl"
    a, b = Ledger(path, pid=10), Ledger(path, pid=20)
    a.record(4 * GIB, ramp_s=60.0)
    b.record(6 * GIB, ramp_s=60.0)
    assert [s.need for s in a.others(100.0, ramp_s=60.0)] == [6 * GIB]  # not its own
    assert [s.need for s in b.others(100.0, ramp_s=60.0)] == [4 * GIB]
    (seen,) = a.others(100.0, ramp_s=60.0)
    assert 99.0 < seen.at <= 100.0  # just now, on the caller's monotonic clock
    assert a.others(100.0, ramp_s=0.0) == []  # out of the ramp
    path.write_text(path.read_text() + '{"pid": 30, "ne')  # a line torn by a killed writer
    assert [s.need for s in a.others(100.0, ramp_s=60.0)] == [6 * GIB]
    a.close()
    assert [s.need for s in Ledger(path, pid=99).others(0.0, ramp_s=60.0)] == [6 * GIB]
    b.close()
    assert not path.exists()  # nothing stays behind


def test_the_kava_latent_run_is_estimated_in_its_measured_range():
    """kava's E4 (llama 6 × 384, vocabulary 49,152, B 64, T 96, 12 latents, 3 Jacobi passes): its latent runs'
    processes measured 8.4-17.4 GiB on an H100 (nvidia-smi, reserved memory included), 6.3 GiB estimated
    without the latent passes; nocot_ft (0 latents) is estimated as a text student."""
    from kvdistill.config import load_config
    from kvdistill.experiments.conditions import base_raw
    from kvdistill.experiments.memory import run_estimator
    from kvdistill.experiments.spec import load_spec
    from kvdistill.train.memory import estimate_note

    spec = load_spec("kava")

    def config(name):
        overrides = spec.budget_overrides() + list(spec.conditions[name].overrides)
        return load_config(raw=base_raw(spec), overrides=overrides)  # the base student (from_config)

    e4, nocot = config("E4"), config("nocot_ft")
    estimate = run_estimator({})
    latent, text = estimate(e4), estimate(nocot)
    assert round(text / GIB, 2) == 6.27  # the estimate before the latent term, for E4 too
    assert 8.4 * GIB < latent < 17.4 * GIB and round(latent / GIB, 2) == 12.89
    line = estimate_note(e4, 1, None, "GPU")[0]  # validate's estimate passes the latent geometry too
    assert line.startswith("estimated peak memory per process: 12.89 GiB") and "latent 5.10" in line
