"""`concurrent: auto`: the per-run memory estimate and how many runs fit."""

from __future__ import annotations

from kvdistill.experiments.memory import CONTEXT, GIB, SLACK, auto_concurrent, run_bytes

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
