"""What a training run directory holds, as its readers find it (`kvdistill.train.checkpoint` writes it and
states the layout): the newest complete checkpoint, the student's directory in RUN/final or a checkpoint, and
which student a path given on the command line means (`resolve_checkpoint`, for `kvdistill eval` and
`generate`).

    RUN/config.yaml                   the run's config, every default spelled out
    RUN/final/                        the trained student (config.json; runs written before: final/student/)
    RUN/checkpoints/step-N/           student/, state/, trainer_state.json ({"step": N, ...}), files.json
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from kvdistill.errors import KvdistillError

__all__ = [
    "checkpoint_path",
    "latest_checkpoint",
    "list_checkpoints",
    "resolve_checkpoint",
    "run_of",
    "step_of",
    "student_dir",
]


def checkpoint_path(out_dir: str | os.PathLike, step: int) -> Path:
    """DIR/checkpoints/step-N."""
    return Path(out_dir) / "checkpoints" / f"step-{step}"


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """The complete `step-N` directories of a run, oldest first (`step-N.tmp` / `step-N.old` never count)."""
    ckpts = [
        c
        for c in (Path(out_dir) / "checkpoints").glob("step-*")
        if c.name.split("-", 1)[1].isdigit() and (c / "trainer_state.json").is_file()
    ]
    return sorted(ckpts, key=lambda c: int(c.name.split("-", 1)[1]))


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest complete `step-N` of a run, or None."""
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


def student_dir(path: str | os.PathLike) -> Path:
    """The student's Hugging Face directory in RUN/final or a checkpoint: PATH/student where it exists (every
    checkpoint, and final/ of runs written before final/ held the student itself), else PATH."""
    path = Path(path)
    return path / "student" if (path / "student" / "config.json").is_file() else path


def resolve_checkpoint(checkpoint: str | os.PathLike) -> tuple[str, Path | None]:
    """(what `load_model` gets, the run directory or None) for
    - a run directory (it holds config.yaml): its final student, else the student of its latest checkpoint;
    - a checkpoint directory, RUN/final or RUN/checkpoints/step-N (it holds student/);
    - a student directory (it holds config.json), or any name `load_model` accepts (zoo name, hub id)."""
    path = Path(checkpoint).expanduser()
    if not path.is_dir():
        return str(checkpoint), None  # a zoo name or hub id; load_model explains a bad path
    if (path / "config.yaml").is_file() and not (path / "config.json").is_file():  # a run directory
        final = student_dir(path / "final")
        if (final / "config.json").is_file():
            return str(final), path
        ckpt = latest_checkpoint(path)
        if ckpt is None or not (ckpt / "student" / "config.json").is_file():
            raise KvdistillError(
                f"run directory '{path}' has neither final/ nor a complete checkpoint",
                "let training save a checkpoint (train.save_every, or run to the end)",
            )
        return str(ckpt / "student"), path
    if (path / "student" / "config.json").is_file():  # RUN/checkpoints/step-N, or RUN/final of an older run
        return str(path / "student"), run_of(path)
    if (path / "config.json").is_file():  # a student directory: RUN/final, RUN/final/student of an older run
        return str(path), run_of(path) if path.name == "final" else run_of(path.parent)
    raise KvdistillError(
        f"'{checkpoint}' is not a run, checkpoint or student directory",
        "pass RUN, RUN/final, RUN/checkpoints/step-N, or a directory holding config.json",
    )


def run_of(ckpt: Path) -> Path | None:
    """The run directory of RUN/final or RUN/checkpoints/step-N when it holds config.yaml."""
    if ckpt.name == "final":
        run = ckpt.parent
    elif ckpt.parent.name == "checkpoints":
        run = ckpt.parent.parent
    else:
        return None
    return run if (run / "config.yaml").is_file() else None


def step_of(student: Path) -> int | None:
    """The optimizer step of the student in RUN/final (its trainer_state) or RUN/checkpoints/step-N, else
    None."""
    for state in (
        student / "kvdistill" / "trainer_state.json",
        student.parent / "trainer_state.json",
        student.parent / "kvdistill" / "trainer_state.json",
    ):
        try:
            step = json.loads(state.read_text()).get("step")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(step, int):
            return step
    return None
