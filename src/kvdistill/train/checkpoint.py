"""Checkpoints of a training run, and the one way the trainer writes a directory: atomically.

Layout of a run directory DIR:

    DIR/checkpoints/step-N/   student/ (Hugging Face format), state/ (Accelerate: the objective's other
                              weights (projectors, routers, latent maps), optimizer, RNG of every process),
                              scheduler.pt, trainer_state.json ({"step": N, "tokens": int, "config_name": str,
                              "eval_ce": float when the run evaluated at step N}), files.json (the size and
                              sha256 of every other file, written last)
    DIR/checkpoints/step-N.diverged/   a checkpoint whose weights gave a non-finite loss (set aside, kept)
    DIR/final/                the trained student (Hugging Face format: `from_pretrained(DIR/final)` loads it)
    DIR/final/kvdistill/      the rest of the objective: objective.safetensors (projectors, routers, latent
                              maps) and trainer_state.json; runs written before this layout hold
                              final/student/

One copy of the student per checkpoint: `state/` holds every weight of the objective except the student's,
which are in `student/` (for a LoRA student, its frozen base weights are in neither: they are the base model
the run's config builds, so a resume rebuilds them; the adapters are in `state/`). `split_student_state`
registers the Accelerate hooks that save and load this way; checkpoints of older runs, whose state/ holds the
student as well, still load.

Every such directory is written by `atomic_dir`: into the sibling `NAME.tmp`, every file and directory
fsynced, then renamed into place. A crash (even SIGKILL) leaves the previous complete directory and at most a
`NAME.tmp` (or, between two renames, `NAME.old`), neither of which ever counts as a checkpoint; the next
write of NAME clears them. A complete checkpoint damaged later (a truncated copy, a full disk while copying)
is found by `checkpoint_problem`: files.json sizes and sha256 (a same-size bit flip too), safetensors headers
against their file sizes, zip end records (torch.save files), JSON that parses.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from kvdistill.atomic import fsync_dir, sha256_file, write_text_atomic
from kvdistill.rundir import checkpoint_path, latest_checkpoint, list_checkpoints, student_dir

__all__ = [
    "FINAL_EXTRA",
    "atomic_dir",
    "checkpoint_path",
    "checkpoint_problem",
    "intact_checkpoints",
    "list_checkpoints",
    "latest_checkpoint",
    "load_checkpoint",
    "prune_checkpoints",
    "save_checkpoint",
    "save_final_student",
    "set_aside",
    "split_student_state",
    "student_dir",
    "write_text_atomic",
]

FILES = "files.json"  # {"files": {relative path: size in bytes}} of every other file of a checkpoint
FINAL_EXTRA = "kvdistill"  # DIR/final/kvdistill/: what of the objective is not the student


# ---------------------------------------------------------------------------------------------- atomic dir
@contextmanager
def atomic_dir(
    path: str | os.PathLike, *, main: bool = True, barrier: Callable[[], None] | None = None
) -> Iterator[Path]:
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
def save_checkpoint(
    path: str | os.PathLike, *, accelerator, objective, scheduler, trainer_state: dict
) -> Path:
    """Write a checkpoint to `path` atomically; every process calls it (each saves its RNG state).

    objective: the unwrapped objective (its `save_student(dir)` writes the student); trainer_state: the JSON
    that `load_checkpoint` returns. The accelerator should have `split_student_state` registered, so that
    state/ does not hold the student a second time.
    """
    path = Path(path)
    main = accelerator.is_main_process
    with atomic_dir(path, main=main, barrier=accelerator.wait_for_everyone) as tmp:
        accelerator.save_state(str(tmp / "state"))
        accelerator.wait_for_everyone()  # every process's RNG file is written before files.json lists them
        if main:
            objective.save_student(tmp / "student")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state))
            written = [f for f in sorted(tmp.rglob("*")) if f.is_file()]
            sizes = {f.relative_to(tmp).as_posix(): f.stat().st_size for f in written}
            hashes = {f.relative_to(tmp).as_posix(): sha256_file(f) for f in written}
            (tmp / FILES).write_text(json.dumps({"files": sizes, "sha256": hashes}, indent=1))
    return path


# ------------------------------------------------------------------------------------------- one student copy
def _saved_student(objective) -> tuple[str, torch.nn.Module]:
    """(prefix, module): the part of the objective that `save_student` writes as a Hugging Face model (the
    student, or a latent student's backbone) and the prefix of its keys in the objective's state dict."""
    from kvdistill.student.latent import LatentStudent

    student = objective.student
    module = student.backbone if isinstance(student, LatentStudent) else student
    # its name inside the objective (an objective may hold the student deeper, e.g. a wrapper's inner.student)
    name = next((n for n, m in objective.named_modules() if m is module), None)
    if name is None:
        name = "student.backbone" if module is not student else "student"
    return name + ".", module


def _is_peft(module: torch.nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(module, PeftModel)


def _left_out(objective) -> set[str]:
    """The keys of the objective's state dict that state/ does not hold: the saved student's (read back from
    student/), or for a LoRA student its frozen base weights (rebuilt from the run's config)."""
    prefix, module = _saved_student(objective)
    if _is_peft(module):  # student/ holds the merged model, from which the adapters cannot be recovered
        return {
            prefix + k
            for k, v in module.state_dict(keep_vars=True).items()
            if isinstance(v, torch.nn.Parameter) and not v.requires_grad
        }
    return {prefix + k for k in module.state_dict()}


def split_student_state(accelerator, objective) -> None:
    """Register Accelerate hooks so that `save_state` leaves the student out of state/model.safetensors and
    `load_state` reads it back from the checkpoint's student/ (see the module docstring). `objective`: the
    unwrapped objective, the one model prepared on `accelerator`."""
    left_out = _left_out(objective)

    def save(models, weights, output_dir):  # weights: the state dicts Accelerate is about to write
        for i, state in enumerate(weights):
            weights[i] = {k: v for k, v in state.items() if k.removeprefix("module.") not in left_out}

    def load(models, input_dir):
        if len(models) != 1:
            raise RuntimeError(f"expected the objective as the one prepared model, found {len(models)}")
        load_objective(objective, Path(input_dir).parent)
        models.clear()  # loaded: Accelerate goes on with the optimizer, scheduler and RNG

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def load_objective(objective, checkpoint: str | os.PathLike) -> None:
    """Load the objective's weights from a checkpoint: state/model.safetensors (everything but the student, or
    everything in checkpoints of older runs) and the student from student/ (Hugging Face format, read by its
    own class so that any conversion transformers applies when saving is undone). Raises RuntimeError naming
    the keys when the two do not give every weight."""
    from safetensors.torch import load_file

    checkpoint = Path(checkpoint)
    weights = {
        k.removeprefix("module."): v
        for k, v in load_file(str(checkpoint / "state" / "model.safetensors")).items()
    }
    prefix, module = _saved_student(objective)
    left_out = _left_out(objective)
    if not _is_peft(module) and not any(k.startswith(prefix) for k in weights):
        saved = type(module).from_pretrained(checkpoint / "student", dtype=next(module.parameters()).dtype)
        weights.update({prefix + k: v for k, v in saved.state_dict().items()})
        del saved
    missing, unexpected = objective.load_state_dict(weights, strict=False)
    missing = [k for k in missing if k not in left_out or not _is_peft(module)]
    # a tied weight (lm_head = embed_tokens) is stored once: it is loaded when any of its names was
    names_of: dict[int, list[str]] = {}
    for name, param in objective.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    tied_loaded = {
        n for names in names_of.values() if len(names) > 1 and any(x in weights for x in names) for n in names
    }
    missing = [k for k in missing if k not in tied_loaded]
    if missing or unexpected:
        raise RuntimeError(
            f"checkpoint {checkpoint} does not match the objective: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''}"
        )


def student_weights(objective, checkpoint: str | os.PathLike, held: set[str]) -> dict:
    """The saved student's entries of the objective's state dict, read from the checkpoint's student/, when
    the state (keys `held`) lacks them (a checkpoint written with `split_student_state`); else {}."""
    prefix, module = _saved_student(objective)
    if _is_peft(module) or any(k.startswith(prefix) for k in held):
        return {}
    saved = type(module).from_pretrained(Path(checkpoint) / "student", dtype=next(module.parameters()).dtype)
    return {prefix + k: v for k, v in saved.state_dict().items()}


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why the complete checkpoint `path` cannot be resumed from (a file truncated, missing or unreadable),
    or None. Reads sizes and headers only, never the weights."""
    path = Path(path)
    try:
        state = json.loads((path / "trainer_state.json").read_text())
        step = state["step"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"trainer_state.json is unreadable ({type(err).__name__}: {err})"
    if str(step) != path.name.split("-", 1)[1]:
        return f"trainer_state.json says step {step!r}"
    for needed in ("state", "student", "scheduler.pt"):
        if not (path / needed).exists():
            return f"{needed} is missing"
    if (path / FILES).exists():  # written by every save since files.json exists
        try:
            listed = json.loads((path / FILES).read_text())
            sizes, hashes = listed["files"], listed.get("sha256") or {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            return f"{FILES} is unreadable ({type(err).__name__}: {err})"
        for name, size in sizes.items():
            file = path / name
            if not file.is_file():
                return f"{name} is missing"
            if file.stat().st_size != size:
                return f"{name} is {file.stat().st_size} bytes, {size} when saved"
        for name, want in hashes.items():  # every save since hashes were recorded: same-size damage too
            found = _hash(path / name)
            if found != want:
                return f"{name} is damaged: its sha256 is {found[:16]}..., {str(want)[:16]}... when saved"
    for file in sorted(path.rglob("*")):
        problem = _file_problem(file) if file.is_file() else None
        if problem:
            return f"{file.relative_to(path).as_posix()} {problem}"
    return None


_HASHES: dict[tuple, str] = {}  # (path, inode, size, mtime) -> sha256: a resume checks twice, hashes once


def _hash(file: Path) -> str:
    try:
        st = file.stat()
    except OSError:
        return "missing"
    key = (str(file.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = sha256_file(file)
    return _HASHES[key]


def _file_problem(file: Path) -> str | None:
    """What is wrong with one file of a checkpoint, judged by its format (safetensors, torch.save zip,
    JSON)."""
    if file.suffix == ".safetensors":
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"is truncated ({size} bytes)"
            (n,) = struct.unpack("<Q", head)
            if 8 + n > size:
                return f"is truncated ({size} bytes, its header alone needs {8 + n})"
            try:
                header = json.loads(f.read(n))
                end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
            except (ValueError, KeyError, TypeError, IndexError):
                return "has an unreadable header"
        if 8 + n + end != size:
            return f"is {size} bytes, its header says {8 + n + end}"
        return None
    if file.suffix == ".json":
        try:
            json.loads(file.read_text())
        except (OSError, ValueError) as err:
            return f"is unreadable ({type(err).__name__}: {err})"
        return None
    with open(file, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"  # torch.save's zip format: its end record is written last
    if zipped and not zipfile.is_zipfile(file):
        return f"is truncated ({file.stat().st_size} bytes, no zip end record)"
    return None


def intact_checkpoints(out_dir: str | os.PathLike) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(the complete checkpoints with no `checkpoint_problem`, newest first; the damaged ones with why)."""
    intact, damaged = [], []
    for ckpt in reversed(list_checkpoints(out_dir)):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            intact.append(ckpt)
        else:
            damaged.append((ckpt, problem))
    return intact, damaged


def set_aside(path: str | os.PathLike, label: str) -> Path:
    """Rename the checkpoint `path` (step-N) to step-N.LABEL (or step-N.LABEL-2, ...), which no listing
    counts: kept for inspection, never resumed from. Returns the new path."""
    path = Path(path)
    target = path.with_name(f"{path.name}.{label}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.{label}-{n}")
    path.rename(target)
    fsync_dir(path.parent)
    return target


def load_checkpoint(path: str | os.PathLike, *, accelerator, scheduler) -> dict:
    """Restore model, optimizer and RNG (Accelerate) and the scheduler from `path`; returns trainer_state."""
    path = Path(path)
    accelerator.load_state(str(path / "state"))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    return json.loads((path / "trainer_state.json").read_text())


def prune_checkpoints(out_dir: str | os.PathLike, keep_last: int, *, step: int) -> list[Path]:
    """Delete the checkpoints of steps <= `step` other than the newest `keep_last` and the best (the lowest
    `eval_ce` in trainer_state.json, where the run evaluated at a checkpoint's step); returns those deleted.

    Called after the checkpoint of `step` is complete, so the newest is always one that is whole, and the one
    a run resumed from goes only once newer complete ones exist. Checkpoints of later steps (left by a run
    that was resumed from an earlier one) are left alone: the run writes them again. Each is renamed to
    step-N.pruned first (no listing counts it), then removed; a leftover of a crash in between goes next time.
    """
    root = Path(out_dir) / "checkpoints"
    for leftover in root.glob("step-*.pruned"):
        shutil.rmtree(leftover, ignore_errors=True)
    ckpts = [c for c in list_checkpoints(out_dir) if int(c.name.split("-", 1)[1]) <= step]
    kept = set(ckpts[-keep_last:])
    scored = [(ce, c) for c in ckpts if (ce := _eval_ce(c)) is not None]
    if scored:
        kept.add(min(scored, key=lambda x: (x[0], -int(x[1].name.split("-", 1)[1])))[1])
    removed = []
    for ckpt in ckpts:
        if ckpt in kept:
            continue
        doomed = ckpt.with_name(ckpt.name + ".pruned")
        ckpt.rename(doomed)
        fsync_dir(root)
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(ckpt)
    return removed


def _eval_ce(ckpt: Path) -> float | None:
    """The held-out CE recorded with a checkpoint, or None."""
    try:
        value = json.loads((ckpt / "trainer_state.json").read_text()).get("eval_ce")
    except (OSError, ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, (int, float)) and value == value else None


def save_final_student(out_dir: str | os.PathLike, objective, trainer_state: dict | None = None) -> Path:
    """DIR/final, written atomically (main process only): the student in Hugging Face format at its top, and
    DIR/final/kvdistill/ with the objective's other weights (objective.safetensors) and `trainer_state`.
    Returns DIR/final."""
    from safetensors.torch import save_file

    final = Path(out_dir) / "final"
    with atomic_dir(final) as tmp:
        objective.save_student(tmp)
        extra = tmp / FINAL_EXTRA
        extra.mkdir()
        rest = {
            k: v.detach().cpu().contiguous().clone()
            for k, v in objective.state_dict().items()
            if not k.startswith("student.")
        }
        save_file(rest, str(extra / "objective.safetensors"))
        (extra / "trainer_state.json").write_text(json.dumps(trainer_state or {}))
    return final
