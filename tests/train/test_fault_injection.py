"""Fault injection: `kvdistill train` is SIGKILLed at several points (inside an optimizer step, while a
checkpoint is being written, before it is renamed, around the metrics), resumed after each kill, and ends with
the weights, metrics and token count of an uninterrupted run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys

import pytest

RUN = ["train.steps=6", "train.batch_size=2", "train.warmup_steps=1", "train.save_every=2"]

KILL_AT = """
import os, signal, sys, importlib
from kvdistill.config import load_config
from kvdistill.train.trainer import train

module, name, nth = sys.argv[3], sys.argv[4], int(sys.argv[5])
mod = importlib.import_module(module)
real = getattr(mod, name)
calls = [0]
def wrapped(*args, **kwargs):
    calls[0] += 1
    if calls[0] == nth:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
setattr(mod, name, wrapped)
train(load_config(sys.argv[1], sys.argv[6:]), sys.argv[2],
      resume=os.path.isfile(os.path.join(sys.argv[2], "config.yaml")), progress=False)
"""

# (module, function, which call kills): inside a step, inside a checkpoint's fsync (written, not renamed), at
# the start of a checkpoint, inside the atomic directory helper
POINTS = [
    ("kvdistill.train.trainer", "optimizer_step", 1),
    ("kvdistill.train.trainer", "optimizer_step", 3),
    ("kvdistill.train.checkpoint", "_fsync_tree", 1),
    ("kvdistill.train.checkpoint", "_fsync_tree", 2),
    ("kvdistill.train.trainer", "save_checkpoint", 2),
    ("kvdistill.train.checkpoint", "atomic_dir", 2),
]


@pytest.mark.slow
def test_killed_at_random_points_then_resumed_equals_an_uninterrupted_run(
    tiny_config, tiny_yaml, tmp_path, files
):
    from kvdistill.train.trainer import train

    full = tmp_path / "full"
    train(tiny_config(*RUN), full, progress=False)
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    plan = random.Random(0).sample(POINTS, 4)
    killed = 0
    for module, name, nth in plan:
        proc = subprocess.run(
            [sys.executable, "-c", KILL_AT, str(tiny_yaml), str(out), module, name, str(nth), *RUN],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert proc.returncode in (0, -signal.SIGKILL), proc.stderr[-3000:]
        killed += proc.returncode == -signal.SIGKILL
    assert killed >= 3, plan  # the points were really reached
    train(tiny_config(*RUN), out, resume=True, progress=False)
    a, b = files.metrics(full), files.metrics(out)
    assert [r["step"] for r in b] == [r["step"] for r in a] == list(range(1, 7))
    for ra, rb in zip(a, b, strict=True):
        assert rb["lr"] == ra["lr"] and rb["tokens"] == ra["tokens"]
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-6)
    assert files.max_diff(files.weights(full / "final"), files.weights(out / "final")) < 1e-6
