"""Checkpoints: the atomic directory writer (rename, replace, exception, fsync of every file, SIGKILL), the
listing of complete checkpoints, an exact save/load round trip, damaged checkpoints found by sizes and
formats, setting one aside, and a run killed while saving its last checkpoint that resumes to the
uninterrupted result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from kvdistill.train import checkpoint
from kvdistill.train.checkpoint import (
    atomic_dir,
    checkpoint_path,
    checkpoint_problem,
    intact_checkpoints,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    set_aside,
)


def _tree(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- atomic_dir
def test_atomic_dir_writes_under_a_temporary_name_then_renames(tmp_path):
    target = tmp_path / "ckpt" / "step-3"
    with atomic_dir(target) as tmp:
        assert tmp == tmp_path / "ckpt" / "step-3.tmp" and tmp.is_dir() and not any(tmp.iterdir())
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.bin").write_bytes(b"abc")
        (tmp / "b.json").write_text("{}")
        assert not target.exists()  # nothing visible until the body is done
    assert _tree(target) == {"b.json": b"{}", "sub/a.bin": b"abc"}
    assert sorted(p.name for p in target.parent.iterdir()) == ["step-3"]


def test_atomic_dir_replaces_a_complete_directory_and_clears_a_crashed_one(tmp_path):
    target = tmp_path / "final"
    target.mkdir()
    (target / "old-only.txt").write_text("old")
    (tmp_path / "final.tmp").mkdir()
    (tmp_path / "final.tmp" / "half.bin").write_bytes(b"\0" * 10)  # left by a crash
    with atomic_dir(target) as tmp:
        assert not (tmp / "half.bin").exists()
        (tmp / "new.txt").write_text("new")
    assert _tree(target) == {"new.txt": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_an_exception_keeps_the_previous_directory(tmp_path):
    target = tmp_path / "step-2"
    with atomic_dir(target) as tmp:
        (tmp / "w.bin").write_bytes(b"good")
    with pytest.raises(RuntimeError, match="disk full"), atomic_dir(target) as tmp:
        (tmp / "w.bin").write_bytes(b"ha")
        raise RuntimeError("disk full")
    assert _tree(target) == {"w.bin": b"good"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-2"]


def test_every_file_and_directory_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    target = tmp_path / "step-1"
    synced_files, synced_dirs = [], []
    real_fsync = os.fsync

    def fsync(fd):
        synced_files.append((os.readlink(f"/proc/self/fd/{fd}"), target.exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(checkpoint, "fsync_dir", lambda p: synced_dirs.append((str(p), target.exists())))
    with atomic_dir(target) as tmp:
        (tmp / "state").mkdir()
        for name in ("state/model.safetensors", "state/random_states_0.pkl", "trainer_state.json"):
            (tmp / name).write_text(name)
    tmp = str(tmp_path / "step-1.tmp")
    assert sorted(synced_files) == [
        (f"{tmp}/{n}", False)
        for n in ("state/model.safetensors", "state/random_states_0.pkl", "trainer_state.json")
    ]
    # bottom-up: the subdirectory, the directory itself, then (after the rename) the parent
    assert synced_dirs == [(f"{tmp}/state", False), (tmp, False), (str(tmp_path), True)]


KILLED_WHILE_WRITING = """
import os, signal, sys
from kvdistill.train.checkpoint import atomic_dir
with atomic_dir(sys.argv[1]) as tmp:
    (tmp / "student").mkdir()
    (tmp / "student" / "model.safetensors").write_bytes(b"half of a model")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_kill_while_writing_leaves_the_previous_checkpoint(tmp_path):
    target = checkpoint_path(tmp_path, 2)
    with atomic_dir(target) as tmp:
        (tmp / "trainer_state.json").write_text('{"step": 2}')
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_WHILE_WRITING, str(target)], capture_output=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert _tree(target) == {"trainer_state.json": b'{"step": 2}'}
    assert _tree(target.with_name("step-2.tmp")) == {"student/model.safetensors": b"half of a model"}
    assert list_checkpoints(tmp_path) == [target]


# ---------------------------------------------------------------------------------------------- listing
def test_only_complete_checkpoints_count_newest_by_number(tmp_path):
    for name, complete in [
        ("step-2", True),
        ("step-10", True),
        ("step-9", False),
        ("step-11.tmp", True),
        ("step-12.old", True),
        ("step-x", True),
    ]:
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
        if complete:
            (tmp_path / "checkpoints" / name / "trainer_state.json").write_text("{}")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-2", "step-10"]
    assert latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 10)
    assert latest_checkpoint(tmp_path / "nothing") is None and list_checkpoints(tmp_path / "nothing") == []


# ---------------------------------------------------------------------------------------------- round trip
class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.student = torch.nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)

    def save_student(self, out_dir) -> None:
        os.makedirs(out_dir)
        torch.save(self.student.state_dict(), os.path.join(out_dir, "student.pt"))


def _adam_steps(model, optimizer, scheduler, n: int) -> None:
    for _ in range(n):
        model(torch.randn(4, 3)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()


def _tiny_run():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = _Tiny()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer, scheduler


def _saved(root, step: int = 2):
    accelerator, model, optimizer, scheduler = _tiny_run()
    _adam_steps(model, optimizer, scheduler, step)
    return save_checkpoint(
        checkpoint_path(root, step),
        accelerator=accelerator,
        objective=model,
        scheduler=scheduler,
        trainer_state={"step": step, "tokens": 64, "config_name": "t"},
    )


def test_save_then_load_restores_weights_optimizer_scheduler_and_rng(tmp_path):
    accelerator, model, optimizer, scheduler = _tiny_run()
    _adam_steps(model, optimizer, scheduler, 2)
    path = save_checkpoint(
        checkpoint_path(tmp_path, 2),
        accelerator=accelerator,
        objective=model,
        scheduler=scheduler,
        trainer_state={"step": 2, "tokens": 64, "config_name": "t"},
    )
    assert sorted(p.name for p in path.iterdir()) == [
        "files.json",
        "scheduler.pt",
        "state",
        "student",
        "trainer_state.json",
    ]
    sizes = json.loads((path / "files.json").read_text())["files"]
    assert sizes == {
        f.relative_to(path).as_posix(): f.stat().st_size
        for f in path.rglob("*")
        if f.is_file() and f.name != "files.json"
    }
    assert "state/model.safetensors" in sizes and "state/optimizer.bin" in sizes
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = optimizer.state_dict()["state"][0]["exp_avg"].clone()
    lr, draw = scheduler.get_last_lr(), torch.rand(5)
    _adam_steps(model, optimizer, scheduler, 3)  # move everything on
    assert load_checkpoint(path, accelerator=accelerator, scheduler=scheduler) == {
        "step": 2,
        "tokens": 64,
        "config_name": "t",
    }
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], moments)
    assert scheduler.get_last_lr() == lr == pytest.approx([1e-2 / 3], rel=1e-15)
    assert torch.equal(torch.rand(5), draw)  # the RNG continues exactly where the checkpoint left it
    saved = torch.load(path / "student" / "student.pt", weights_only=True)
    assert all(torch.equal(saved[k], weights[f"student.{k}"]) for k in saved)


# ---------------------------------------------------------------------------------------------- damage
def _cut(path, keep: int | None = None) -> int:
    """Truncate a file to `keep` bytes (default: all but the last 8); its size before."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 8 if keep is None else keep)
    return size


def test_an_intact_checkpoint_has_no_problem(tmp_path):
    path = _saved(tmp_path)
    assert checkpoint_problem(path) is None
    assert intact_checkpoints(tmp_path) == ([path], [])


@pytest.mark.parametrize("listed", [True, False], ids=["files.json", "formats only"])
def test_damaged_checkpoints_are_named_with_why(tmp_path, listed):
    """Sizes against files.json when it is there; without it (checkpoints of older versions) the formats:
    a safetensors header against its file size, a torch.save zip's end record, JSON that parses."""
    damaged = {}
    for step, name in enumerate(
        [
            "state/model.safetensors",
            "state/optimizer.bin",
            "scheduler.pt",
            "state/random_states_0.pkl",
            "student/student.pt",
        ],
        start=1,
    ):
        path = _saved(tmp_path / name.replace("/", "_"), step)
        if not listed:
            (path / "files.json").unlink()
        size = _cut(path / name)
        damaged[name] = (path, size)
    for name, (path, size) in damaged.items():
        if listed:
            assert checkpoint_problem(path) == f"{name} is {size - 8} bytes, {size} when saved"
        elif name.endswith(".safetensors"):
            assert checkpoint_problem(path) == f"{name} is {size - 8} bytes, its header says {size}"
        else:
            assert checkpoint_problem(path) == f"{name} is truncated ({size - 8} bytes, no zip end record)"


def test_checkpoints_with_unreadable_or_missing_parts(tmp_path):
    path = _saved(tmp_path)
    _cut(path / "trainer_state.json", 7)
    assert checkpoint_problem(path).startswith("trainer_state.json is unreadable (JSONDecodeError: ")
    path = _saved(tmp_path / "b")
    (path / "trainer_state.json").write_text('{"step": 3, "tokens": 0}')
    assert checkpoint_problem(path) == "trainer_state.json says step 3"
    path = _saved(tmp_path / "c")
    (path / "scheduler.pt").unlink()
    assert checkpoint_problem(path) == "scheduler.pt is missing"
    path = _saved(tmp_path / "d")
    _cut(path / "state/model.safetensors", 5)
    (path / "files.json").unlink()
    assert checkpoint_problem(path) == "state/model.safetensors is truncated (5 bytes)"
    path = _saved(tmp_path / "e")
    (path / "student/student.pt").unlink()
    assert checkpoint_problem(path) == "student/student.pt is missing"
    intact, damaged = intact_checkpoints(tmp_path / "e")
    assert intact == [] and damaged == [(path, "student/student.pt is missing")]


def test_newest_intact_first_and_damaged_listed(tmp_path):
    for step in (1, 2, 3):
        _saved(tmp_path, step)
    _cut(checkpoint_path(tmp_path, 3) / "state/model.safetensors")
    intact, damaged = intact_checkpoints(tmp_path)
    assert intact == [checkpoint_path(tmp_path, 2), checkpoint_path(tmp_path, 1)]
    assert [p.name for p, _ in damaged] == ["step-3"]


def test_set_aside_keeps_the_checkpoint_out_of_every_listing(tmp_path):
    path = _saved(tmp_path)
    tree = _tree(path)
    assert set_aside(path, "diverged") == tmp_path / "checkpoints/step-2.diverged"
    assert list_checkpoints(tmp_path) == [] and latest_checkpoint(tmp_path) is None
    assert _tree(tmp_path / "checkpoints/step-2.diverged") == tree
    _saved(tmp_path)
    assert set_aside(path, "diverged") == tmp_path / "checkpoints/step-2.diverged-2"  # the first one is kept
    assert _tree(tmp_path / "checkpoints/step-2.diverged") == tree


# ---------------------------------------------------------------------------------------------- kill a run
RESUMABLE = ["train.steps=4", "train.batch_size=2", "train.warmup_steps=1", "train.save_every=2"]

KILLED_WHILE_SAVING = """
import os, signal, sys
from kvdistill.config import load_config
from kvdistill.train import checkpoint
from kvdistill.train.trainer import train

real = checkpoint._fsync_tree
def fsync_tree(root):
    if root.name == "step-4.tmp":  # the last checkpoint is written, not yet renamed: the worst moment
        os.kill(os.getpid(), signal.SIGKILL)
    real(root)
checkpoint._fsync_tree = fsync_tree
train(load_config(sys.argv[1], sys.argv[3:]), sys.argv[2], progress=False)
"""


@pytest.mark.slow
def test_a_run_killed_while_saving_resumes_to_the_uninterrupted_result(
    tiny_config, tiny_yaml, tmp_path, files
):
    from kvdistill.train.trainer import train

    full = tmp_path / "full"
    train(tiny_config(*RESUMABLE), full, progress=False)
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_WHILE_SAVING, str(tiny_yaml), str(out), *RESUMABLE],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert latest_checkpoint(out) == checkpoint_path(out, 2)
    assert (out / "checkpoints/step-4.tmp/trainer_state.json").is_file()  # complete but never renamed
    assert not (out / "final").exists() and not (out / "summary.json").exists()
    summary = train(tiny_config(*RESUMABLE), out, resume=True, progress=False)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]
    a, b = files.metrics(full), files.metrics(out)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        assert rb["lr"] == ra["lr"] and rb["tokens"] == ra["tokens"]
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-6)
    for sub in ("final", "checkpoints/step-4/state"):
        assert files.max_diff(files.weights(full / sub), files.weights(out / sub)) < 1e-6, sub
    assert (
        summary["tokens"]
        == json.loads((full / "summary.json").read_text())["tokens"]
        == sum(r["tokens"] for r in a)
    )


# ---------------------------------------------------------------------------------------------- pruning
def _fake_checkpoints(out, eval_ce: dict[int, float | None]):
    for step, ce in eval_ce.items():
        path = checkpoint_path(out, step)
        path.mkdir(parents=True)
        state = {"step": step, "tokens": 0} | ({"eval_ce": ce} if ce is not None else {})
        (path / "trainer_state.json").write_text(json.dumps(state))


def test_prune_keeps_the_newest_n_and_the_best(tmp_path):
    from kvdistill.train.checkpoint import prune_checkpoints

    _fake_checkpoints(tmp_path, {1: 3.0, 2: 1.0, 3: 2.0, 4: None, 5: 2.5, 6: 2.4, 7: 0.5})
    (tmp_path / "checkpoints" / "step-3.pruned").mkdir()  # left by a crash while pruning
    removed = prune_checkpoints(tmp_path, 2, step=6)  # step-7: left from before a resume at 6, not counted
    assert [p.name for p in removed] == ["step-1", "step-3", "step-4"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-2",
        "step-5",
        "step-6",
        "step-7",
    ]
    assert prune_checkpoints(tmp_path, 1, step=7) == [
        checkpoint_path(tmp_path, 2),
        checkpoint_path(tmp_path, 5),
        checkpoint_path(tmp_path, 6),
    ]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-7"]  # the newest is also the best


def test_prune_without_evaluations_keeps_the_newest_n(tmp_path):
    from kvdistill.train.checkpoint import prune_checkpoints

    _fake_checkpoints(tmp_path, dict.fromkeys(range(1, 5)))
    prune_checkpoints(tmp_path, 3, step=4)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-2", "step-3", "step-4"]
