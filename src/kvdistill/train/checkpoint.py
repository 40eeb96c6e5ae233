"""Checkpoints of a training run, and the one way the trainer writes a directory: atomically.

Layout of a run directory DIR:

    DIR/checkpoints/step-N/   student/ (Hugging Face format), state/ (Accelerate: model with projectors and
                              routers, optimizer, RNG of every process), scheduler.pt, trainer_state.json
                              ({"step": N, "tokens": int, "config_name": str})
    DIR/final/student/        the trained student (Hugging Face format)

Every such directory is written by `atomic_dir`: into the sibling `NAME.tmp`, every file and directory
fsynced, then renamed into place. A crash (even SIGKILL) leaves the previous complete directory and at most a
`NAME.tmp` (or, between two renames, `NAME.old`), neither of which ever counts as a checkpoint; the next
write of NAME clears them.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from kvdistill.cache.manifest import fsync_dir

__all__ = ["atomic_dir", "checkpoint_path", "list_checkpoints", "latest_checkpoint", "load_checkpoint",
           "save_checkpoint", "save_final_student"]


# ---------------------------------------------------------------------------------------------- atomic dir
@contextmanager
def atomic_dir(path: str | os.PathLike, *, main: bool = True,
               barrier: Callable[[], None] | None = None) -> Iterator[Path]:
    """Write the directory `path` atomically: yields the empty temporary sibling `path.tmp` to write into.

    On a clean exit every file and directory under it is fsynced and it is renamed to `path` (a `path` that
    already exists is replaced; the parent directory is fsynced). On an exception nothing is renamed and the
    temporary directory is removed. Several processes: every one enters; only `main` clears, fsyncs and
    renames, and `barrier` (e.g. accelerator.wait_for_everyone) runs after the clearing, before the rename
    (every process has written its part) and after it (every process sees `path`).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    wait = barrier or (lambda: None)
    if main:
        if tmp.exists():  # left by a crash
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    wait()
    try:
        yield tmp
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    wait()
    if main:
        _fsync_tree(tmp)
        _replace_dir(tmp, path)
    wait()


def _fsync_tree(root: Path) -> None:
    """fsync every file, then every directory bottom-up, under root (root included)."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def _replace_dir(tmp: Path, path: Path) -> None:
    """Rename tmp to path; an existing path is moved aside to `path.old` first and removed after."""
    old = path.with_name(path.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    fsync_dir(path.parent)
    if old.exists():
        shutil.rmtree(old)


# ---------------------------------------------------------------------------------------------- checkpoints
def checkpoint_path(out_dir: str | os.PathLike, step: int) -> Path:
    """DIR/checkpoints/step-N."""
    return Path(out_dir) / "checkpoints" / f"step-{step}"


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """The complete `step-N` directories of a run, oldest first (`step-N.tmp` / `step-N.old` never count)."""
    ckpts = [
        c for c in (Path(out_dir) / "checkpoints").glob("step-*")
        if c.name.split("-", 1)[1].isdigit() and (c / "trainer_state.json").is_file()
    ]
    return sorted(ckpts, key=lambda c: int(c.name.split("-", 1)[1]))


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest complete `step-N` of a run, or None."""
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


def save_checkpoint(path: str | os.PathLike, *, accelerator, objective, scheduler, trainer_state: dict) -> Path:
    """Write a checkpoint to `path` atomically; every process calls it (each saves its RNG state).

    objective: the unwrapped objective (its `save_student(dir)` writes the student); trainer_state: the JSON
    that `load_checkpoint` returns.
    """
    path = Path(path)
    main = accelerator.is_main_process
    with atomic_dir(path, main=main, barrier=accelerator.wait_for_everyone) as tmp:
        accelerator.save_state(str(tmp / "state"))
        if main:
            objective.save_student(tmp / "student")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state))
    return path


def load_checkpoint(path: str | os.PathLike, *, accelerator, scheduler) -> dict:
    """Restore model, optimizer and RNG (Accelerate) and the scheduler from `path`; returns trainer_state."""
    path = Path(path)
    accelerator.load_state(str(path / "state"))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    return json.loads((path / "trainer_state.json").read_text())


def save_final_student(out_dir: str | os.PathLike, objective) -> Path:
    """DIR/final/student, written atomically (main process only). Returns DIR/final."""
    final = Path(out_dir) / "final"
    with atomic_dir(final) as tmp:
        objective.save_student(tmp / "student")
    return final
