"""What `--resume` continues and who writes a run directory: a changed config or other records are refused
before a byte is written; train.lr and train.steps may change and take effect in the optimizer and the
schedule; a run stopped before its first checkpoint trains again from step 0; a damaged latest checkpoint
falls back to the newest intact one; one `train` writes a directory at a time, and the lock is given back on
every exit."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch
import yaml
from filelock import FileLock
from transformers import get_scheduler

from kvdistill.train import resume, trainer
from kvdistill.train.resume import HOLDER, LOCK, RESUMABLE, RunLock
from kvdistill.train.trainer import finish, fit, setup, train

SCHEDULE = ["train.batch_size=2", "train.warmup_steps=2", "train.schedule=cosine", "train.save_every=2"]


def _listing(root) -> dict[str, tuple[int, int]]:
    """Every file and directory under root: (size, mtime in ns) (directories: size 0)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.stat(path)
            out[os.path.relpath(path, root)] = (0 if name in dirnames else st.st_size, st.st_mtime_ns)
    return out


def _lock_is_free(out) -> bool:
    lock = FileLock(str(out / LOCK), timeout=0)
    try:
        lock.acquire()
    except TimeoutError:
        return False
    lock.release()
    return not (out / HOLDER).exists()


def _schedule(lr: float, steps: int) -> list[float]:
    """The lr of every step under `SCHEDULE`'s warmup + cosine with this lr and length (transformers' own)."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=steps)
    lrs = []
    for _ in range(steps):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.fixture(scope="module")
def finished(tiny_config, tmp_path_factory):
    """A finished 2-step run with checkpoints at steps 1 and 2 (never modified: tests copy it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(tiny_config("train.save_every=1"), out, progress=False)
    return out


# ------------------------------------------------------------------------------------------ refused resumes
@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (["data.seed=1"], ["in 1 field(s)", "data.seed: 0 in config.yaml, 1 now"]),
        (
            ["student.from_config.hidden_size=96"],
            ["in 1 field(s)", "student.from_config.hidden_size: 64 in config.yaml, 96 now"],
        ),
        (
            ["data.size=16", "teachers.1.model=elsewhere", "train.warmup_steps=1", "train.lr=5e-4"],
            [
                "in 3 field(s)",
                'teachers.1.model: "{gemma3}" in config.yaml, "elsewhere" now',
                "data.size: 12 in config.yaml, 16 now",
                "train.warmup_steps: 0 in config.yaml, 1 now",
            ],
        ),
        (
            ["train.steps=1"],
            ["train.steps = 1 but the run in {out} is already at step 2", "set train.steps to 2 or more"],
        ),
    ],
    ids=["data seed", "student width", "three fields and an lr", "fewer steps than done"],
)
def test_a_resume_with_another_config_is_refused_and_changes_nothing(
    finished, tiny_yaml, teacher_dirs, cli, changes, expected
):
    """Other data or another student width used to exit 0 (or fail with a traceback) after config.yaml had
    been rewritten. Now: exit 2 naming every differing field with both values, the run directory untouched."""
    before = _listing(finished)
    code, err = cli("train", tiny_yaml, "--out", finished, "--resume", "train.save_every=1", *changes)
    assert code == 2
    for text in expected:
        assert text.format(out=finished, gemma3=teacher_dirs["gemma3"]) in err, err
    if changes != ["train.steps=1"]:
        assert "train.lr" not in err.split("fix:")[0]  # a field a resume may change is not named
        assert (
            f"fix: start a new run with a new --out (a resume of {finished} may change only "
            + ", ".join(RESUMABLE)
            + ")"
        ) in err
    assert _listing(finished) == before


def test_a_resume_on_other_records_of_the_same_config_is_refused(tiny_yaml, tmp_path, cli):
    """The data file was edited under the run: same config, other records (DIR/data.json holds their
    sha256)."""
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": f"{i} plus {i} is {2 * i}."}) + "\n" for i in range(10)))
    out = tmp_path / "run"
    args = ["data.source=jsonl", "~data.size", f"data.path={data}", "data.eval_size=2", "train.save_every=1"]
    assert cli("train", tiny_yaml, "--out", out, *args, "train.steps=1")[0] == 0
    data.write_text(data.read_text().replace("7 plus 7 is 14.", "7 plus 7 is 15."))
    before = _listing(out)
    code, err = cli("train", tiny_yaml, "--out", out, "--resume", *args, "train.steps=2")
    assert code == 2
    assert f"--resume: the records of data.path {data} differ from those the run in {out} started with" in err
    assert re.search(
        r"(train|eval): (\d+) records \(sha256 \w{12}\) then, \2 \(sha256 \w{12}\) now fix:", err
    ), err
    assert "restore the data the run was trained on, or start a new run with a new --out" in err
    assert _listing(out) == before


def test_a_checkpoint_without_the_runs_config_is_not_resumed(finished, tiny_yaml, tmp_path, cli):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / "config.yaml").unlink()
    code, err = cli("train", tiny_yaml, "--out", out, "--resume", "train.save_every=1")
    assert (
        code == 2
        and f"--resume: {out} has checkpoints but no config.yaml to check this config against" in err
    )


# ----------------------------------------------------------------------------------- changes that take effect
def test_a_resume_with_a_new_lr_and_more_steps_uses_them(tiny_config, tmp_path, files, caplog):
    """lr 1e-3 for 4 steps, stopped after 2; resumed with lr 5e-4 for 6 steps: from step 3 on the optimizer's
    lr (every group's) is the new schedule's. Before, the optimizer state restored the old lr and schedule."""
    out = tmp_path / "run"
    train(tiny_config(*SCHEDULE, "train.steps=4"), out, stop_after=2, progress=False)
    new = tiny_config(*SCHEDULE, "train.steps=6", "train.lr=5e-4")
    with caplog.at_level(logging.INFO, logger="kvdistill.train.resume"):
        run = setup(new, out, resume=True)
    try:
        assert run.start == 2
        expected = _schedule(5e-4, 6)
        groups = run.optimizer.param_groups
        assert [g["name"] for g in groups] == ["student", "maps"]
        assert [g["lr"] for g in groups] == [expected[2]] * 2 and [g["initial_lr"] for g in groups] == [
            5e-4
        ] * 2
        assert run.scheduler.get_last_lr() == [expected[2]] * 2
        fit(run, progress=False)
        finish(run)
    finally:
        run.close()
    assert (
        f"resuming {out} at step 2 with train.lr 0.0005 (0.001 in its config.yaml): the optimizer and the "
        "schedule use the new lr from this step on"
    ) in caplog.text
    assert f"resuming {out} with train.steps: 4 in config.yaml, 6 now" in caplog.text
    rows = files.metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["lr"] for r in rows] == _schedule(1e-3, 4)[:2] + expected[2:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4", "step-6"]
    stored = yaml.safe_load((out / "config.yaml").read_text())["train"]
    assert stored["lr"] == 5e-4 and stored["steps"] == 6
    assert json.loads((out / "summary.json").read_text())["steps"] == 6


# ---------------------------------------------------------------------------------------- restarts and damage
def test_a_run_stopped_before_its_first_checkpoint_trains_again_under_resume(
    finished, tiny_yaml, tmp_path, cli, files, monkeypatch, caplog
):
    """Interrupted (Ctrl-C) in step 2 with no checkpoint yet, and a half-written step-1.tmp: a plain start is
    refused (the directory holds a run); --resume used to be refused too ("start without --resume"). Now it
    trains the run from step 0, to exactly the uninterrupted result."""
    step = trainer.optimizer_step

    def interrupted(run, i):
        if i == 1:
            raise KeyboardInterrupt
        return step(run, i)

    monkeypatch.setattr(trainer, "optimizer_step", interrupted)
    out = tmp_path / "run"
    code, err = cli("train", tiny_yaml, "--out", out)
    assert code == 130  # Ctrl-C: 128 + SIGINT
    monkeypatch.setattr(trainer, "optimizer_step", step)
    assert _lock_is_free(out)
    assert [r["step"] for r in files.metrics(out)] == [1] and not (out / "checkpoints").exists()
    (out / "checkpoints/step-1.tmp/state").mkdir(parents=True)
    code, err = cli("train", tiny_yaml, "--out", out)
    assert code == 2 and "already holds a run (metrics.jsonl, checkpoints)" in err
    code, err = cli("train", tiny_yaml, "--out", out, "--resume")
    assert code == 0, err
    assert f"{out} has no checkpoint yet (the run stopped before its first one): training it from step 0" in (
        caplog.text
    )
    a, b = files.metrics(finished), files.metrics(out)
    assert [r["step"] for r in b] == [1, 2]
    assert [(r["loss"], r["lr"]) for r in b] == [(r["loss"], r["lr"]) for r in a]
    assert files.max_diff(files.weights(finished / "final"), files.weights(out / "final")) == 0.0


def _truncate(path) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


@pytest.fixture(scope="module")
def six_steps(tiny_config, tmp_path_factory):
    """6 steps under SCHEDULE, uninterrupted."""
    out = tmp_path_factory.mktemp("six") / "run"
    train(tiny_config(*SCHEDULE, "train.steps=6"), out, progress=False)
    return out


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        ("state/model.safetensors", "state/model.safetensors is {half} bytes, {size} when saved"),
        ("trainer_state.json", "trainer_state.json is unreadable (JSONDecodeError"),
        ("load", "did not load (RuntimeError: disk read error)"),
    ],
    ids=["model.safetensors truncated", "trainer_state.json truncated", "loader fails"],
)
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(
    six_steps, tiny_config, tiny_yaml, tmp_path, cli, files, monkeypatch, caplog, damage, why
):
    """Checkpoints 2 and 4 of 6 steps (stopped after 4); step-4 damaged: the resume logs which checkpoint it
    skips and why, continues from step-2 and ends where the uninterrupted run ends."""
    args = [*SCHEDULE, "train.steps=6"]
    full = six_steps
    out = tmp_path / "run"
    train(tiny_config(*args), out, stop_after=4, progress=False)
    step4 = out / "checkpoints" / "step-4"
    if damage == "load":  # intact to every check, but the loader fails on it
        load = resume.load_checkpoint

        def failing(path, **kwargs):
            if path == step4:
                raise RuntimeError("disk read error")
            return load(path, **kwargs)

        monkeypatch.setattr(resume, "load_checkpoint", failing)
    else:
        size = os.path.getsize(step4 / damage)
        _truncate(step4 / damage)
        why = why.format(half=size // 2, size=size)
    code, err = cli("train", tiny_yaml, "--out", out, "--resume", *args)
    assert code == 0, err
    assert f"checkpoint {step4} " in caplog.text and why in caplog.text, caplog.text
    assert (
        f"resuming {out} from {out / 'checkpoints' / 'step-2'}, the newest intact checkpoint" in caplog.text
    )
    a, b = files.metrics(full), files.metrics(out)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b, strict=True):
        assert rb["lr"] == ra["lr"]
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-6)
    for sub in ("final", "checkpoints/step-6/state", "checkpoints/step-4/state"):  # step-4 written again
        assert files.max_diff(files.weights(full / sub), files.weights(out / sub)) < 1e-6, sub


def test_no_intact_checkpoint_is_a_clear_error(finished, tiny_yaml, tmp_path, cli):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    _truncate(out / "checkpoints/step-2/state/optimizer.bin")
    (out / "checkpoints/step-1/files.json").unlink()  # an older checkpoint: judged by the files' formats
    size = os.path.getsize(out / "checkpoints/step-1/student/model.safetensors")
    _truncate(out / "checkpoints/step-1/student/model.safetensors")
    before = _listing(out)
    code, err = cli("train", tiny_yaml, "--out", out, "--resume", "train.save_every=1")
    assert code == 2
    assert f"--resume: no intact checkpoint in {out / 'checkpoints'}: step-2: state/optimizer.bin is " in err
    assert f"; step-1: student/model.safetensors is {size // 2} bytes, its header says {size} fix:" in err
    assert (
        f"or move {out / 'checkpoints'} aside and rerun with --resume to train this run again from step 0"
        in err
    )
    assert _listing(out) == before


# ------------------------------------------------------------------------------------------ one writer
HOLDS_THE_LOCK = """
import pathlib, sys, time
from kvdistill.config import load_config
from kvdistill.train import resume, trainer

config, out, started, release = sys.argv[1:5]
step = trainer.optimizer_step
def waiting(run, i):
    if i == 1:  # in the middle of the run: step 1 is logged
        pathlib.Path(started).write_text("step 2")
        while not pathlib.Path(release).exists():
            time.sleep(0.05)
    return step(run, i)
trainer.optimizer_step = waiting
trainer.train(load_config(config), out, progress=False)
"""


def test_a_second_train_into_a_directory_being_written_is_refused(tiny_yaml, tmp_path, cli, files):
    """Two trains into one --out both ran (interleaved metrics, checkpoints overwriting each other)."""
    out = tmp_path / "run"
    started, release = tmp_path / "started", tmp_path / "release"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    log = tmp_path / "first.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLDS_THE_LOCK, str(tiny_yaml), str(out), str(started), str(release)],
            env=env,
            stderr=stderr,
        )
    try:
        deadline = time.time() + 300
        while not started.exists():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline
            time.sleep(0.1)
        before = _listing(out)
        for extra in ([], ["--resume"]):
            code, err = cli("train", tiny_yaml, "--out", out, *extra)
            assert code == 2
            assert f"another `kvdistill train` is writing {out} (pid {proc.pid} on " in err, err
            assert f"lock file {out / LOCK}" in err
            assert "fix: wait for that run to finish (or stop it), or choose another --out" in err
        assert _listing(out) == before
    finally:
        release.write_text("go")
        proc.wait(timeout=300)
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert [r["step"] for r in files.metrics(out)] == [1, 2]
    assert _lock_is_free(out)


@pytest.mark.parametrize("error", [RuntimeError("out of memory"), KeyboardInterrupt()])
def test_the_lock_is_given_back_when_a_run_fails(tiny_config, tmp_path, monkeypatch, error):
    step = trainer.optimizer_step

    def failing(run, i):
        assert not _lock_is_free(run.out_dir)  # held while the run runs
        raise error

    monkeypatch.setattr(trainer, "optimizer_step", failing)
    out = tmp_path / "run"
    with pytest.raises(type(error)):
        train(tiny_config(), out, progress=False)
    assert _lock_is_free(out)
    monkeypatch.setattr(trainer, "optimizer_step", step)
    train(tiny_config(), out, resume=True, progress=False)  # the directory is free to continue
    assert _lock_is_free(out)


@pytest.mark.slow
def test_under_ddp_a_busy_directory_stops_every_process(tiny_yaml, tmp_path):
    """torchrun, 2 processes, into a directory another run holds: the main process finds the holder and every
    process stops with its name (none is left waiting for the others)."""
    out = tmp_path / "ddp"
    busy = RunLock(out)
    busy.acquire()
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "10000"}
    try:
        proc = subprocess.run(
            [
                torchrun,
                "--standalone",
                "--nproc_per_node",
                "2",
                "-m",
                "kvdistill.cli",
                "train",
                str(tiny_yaml),
                "--out",
                str(out),
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
    finally:
        busy.release()
    assert proc.returncode != 0
    stderr = " ".join(proc.stderr.split())
    assert stderr.count(f"error: another `kvdistill train` is writing {out} (pid {os.getpid()} on ") == 2, (
        stderr
    )
    assert sorted(p.name for p in out.iterdir()) == [LOCK]
