"""Names that become paths, the directories a command owns, and writes that stay inside them.

- `segment_problem`: a name that becomes one path component (a run, curriculum stage, experiment condition,
  teacher) is one safe segment: no separator, not `.`/`..`, no control character, at most `MAX_SEGMENT` bytes.
- `dir_problem` / `claim`: a directory a command writes (`train --out`, a curriculum's, an experiment's) holds
  the marker file `.kvdistill-run` naming its kind. A command writes only into a directory that does not
  exist, is empty, or carries the marker of its own kind: never into a folder of the user's own files.
- `open_new` / `open_append`: files opened without following a symlink planted at their name, so no write of a
  run lands outside its directory; `escapes` finds an entry of a directory that leads out of it.
- `is_disk_full`: an error (of the OS, torch or safetensors) that means no space was left on the device.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

from kvdistill.errors import KvdistillError

__all__ = [
    "MARKER",
    "MAX_SEGMENT",
    "check_segment",
    "claim",
    "dir_problem",
    "escapes",
    "is_disk_full",
    "marker_kind",
    "not_a_dir_problem",
    "open_append",
    "open_new",
    "segment_problem",
]

MAX_SEGMENT = (
    100  # bytes of UTF-8; file systems allow 255, and names get prefixes and suffixes (.tmp, _files)
)
MARKER = (
    ".kvdistill-run"  # {"kind": "run" | "curriculum" | "experiment" | ...}: written by the command itself
)
OWN = (MARKER, ".train.lock", ".train.holder.json")  # files an unfinished start may leave, all of them ours


# ---------------------------------------------------------------------------------------------- names
def segment_problem(name: object, key: str) -> str | None:
    """Why `name` (the value of config key `key`) cannot be one path component, or None."""
    if not isinstance(name, str) or not name:
        return f"{key} {name!r} must be a non-empty name"
    shown = repr(name) if len(name) <= 60 else repr(name[:60] + "...")
    if name in (".", ".."):
        return (
            f"{key} {shown} names a directory itself, not a new one inside --out; give a plain name, "
            "e.g. 'run1'"
        )
    bad = sorted({c for c in name if c in "/\\" or ord(c) < 32 or ord(c) == 127})
    if bad:
        return (
            f"{key} {shown} contains {', '.join(repr(c) for c in bad)}: it becomes a folder name inside "
            f"--out, so it must be one path segment; e.g. {_suggest(name)!r}"
        )
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return f"{key} {shown} is not valid UTF-8 text"
    if size > MAX_SEGMENT:
        return (
            f"{key} is {size} bytes long; a name that becomes a folder or file name may have at most "
            f"{MAX_SEGMENT}"
        )
    return None


def check_segment(name: object, key: str) -> str:
    """`name` if it is one safe path segment, else a KvdistillError naming `key`."""
    problem = segment_problem(name, key)
    if problem:
        raise KvdistillError(problem, f"rename it (letters, digits, '-', '_'; at most {MAX_SEGMENT} bytes)")
    return name  # type: ignore[return-value]


def _suggest(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_" else "_" for c in name).strip("_")
    return cleaned[:MAX_SEGMENT] or "run1"


# ---------------------------------------------------------------------------------------------- owned dirs
def marker_kind(directory: str | os.PathLike) -> str | None:
    """The kind in DIR/.kvdistill-run ("unknown" when unreadable), or None without a marker."""
    path = Path(directory) / MARKER
    if not path.is_file() or path.is_symlink():
        return None
    try:
        return str(json.loads(path.read_text())["kind"])
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown"


def dir_problem(
    directory: str | os.PathLike, kind: str, *, flag: str = "--out", legacy: tuple[str, ...] = ()
) -> KvdistillError | None:
    """Why a command making a `kind` directory may not write `directory`, or None; only reads.

    Allowed: a path that does not exist (its parent may be created), an empty directory, or one with the
    marker of `kind`; `legacy`: file names that together identify a `kind` directory written before markers.
    """
    d = Path(directory)
    fix = f"give {flag} a new or empty directory (kvdistill writes only into folders it made itself)"
    problem = not_a_dir_problem(d, flag, fix)
    if problem or not d.exists():
        return problem
    found = marker_kind(d)
    if found == kind:
        return None
    if found is not None:
        return KvdistillError(f"{flag} {d} is a kvdistill {found} directory, not {_a(kind)} directory", fix)
    try:
        entries = sorted(e for e in os.listdir(d) if e not in OWN)
    except OSError as err:
        return KvdistillError(f"{flag} {d} cannot be read ({err.strerror})", fix)
    if not entries or (legacy and all((d / name).exists() for name in legacy)):
        return None
    shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
    return KvdistillError(
        f"{flag} {d} holds files that kvdistill did not write ({shown}); they would be overwritten", fix
    )


def _a(noun: str) -> str:
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"


def not_a_dir_problem(
    directory: str | os.PathLike, flag: str = "--out", fix: str | None = None
) -> KvdistillError | None:
    """Why `directory` can never be a directory to write into (a file, a dangling symlink, a path under a
    file), or None (it is a directory, or does not exist yet)."""
    d = Path(directory)
    fix = fix or f"give {flag} a directory path (a new one is created)"
    if d.is_symlink() and not d.exists():
        return KvdistillError(f"{flag} {d} is a symlink to {os.readlink(d)}, which does not exist", fix)
    if not d.exists():
        parent = next((p for p in d.parents if p.exists() or p.is_symlink()), None)
        if parent is not None and not parent.is_dir():
            return KvdistillError(f"{flag} {d} lies under {parent}, which is a file, not a directory", fix)
        return None
    if not d.is_dir():
        return KvdistillError(f"{flag} {d} is a file, not a directory", fix)
    return None


def claim(directory: str | os.PathLike, kind: str) -> Path:
    """Create `directory` (and parents) and mark it as a `kind` directory; call after `dir_problem` is
    None."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if marker_kind(d) != kind:
        try:
            with open_new(d / MARKER) as f:
                f.write(json.dumps({"kind": kind, "tool": "kvdistill"}) + "\n")
        except FileExistsError:  # another process (a part of a split job) marked it at the same time
            if marker_kind(d) != kind:
                raise
    return d


def escapes(directory: str | os.PathLike, names: list[str] | None = None) -> list[str]:
    """Entries of `directory` (those in `names`, or all) that are symlinks resolving outside it, as
    'NAME -> TARGET' (a dangling symlink counts: a write through it lands wherever it points)."""
    d = Path(directory)
    try:
        root = d.resolve()
        candidates = sorted(names if names is not None else os.listdir(d))
    except OSError:
        return []
    out = []
    for name in candidates:
        p = d / name
        if p.is_symlink():
            target = p.resolve()
            if not target.is_relative_to(root):
                out.append(f"{name} -> {os.readlink(p)}")
    return out


# ---------------------------------------------------------------------------------------------- writes
def _nofollow_error(path: Path, err: OSError) -> OSError:
    if err.errno == errno.ELOOP:
        return KvdistillError(
            f"{path} is a symlink (to {os.readlink(path)}): kvdistill does not write through "
            "symlinks in its directories",
            f"remove the symlink {path}, then rerun",
        )
    return err


def open_new(path: str | os.PathLike, mode: str = "w"):
    """Open `path` for writing as a new file: an existing file or symlink at the name is removed first (a
    symlink itself, never what it points to), then the file is created exclusively, not following links."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as err:
        raise _nofollow_error(path, err) from None
    return os.fdopen(fd, mode)


def open_append(path: str | os.PathLike):
    """Open `path` for appending text (created if absent), refusing a symlink at the name."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as err:
        raise _nofollow_error(path, err) from None
    return os.fdopen(fd, "a")


def is_disk_full(err: BaseException, where: str | os.PathLike | None = None) -> bool:
    """Whether `err` (or an error it was raised from) means the device ran out of space: ENOSPC/EDQUOT, the
    text safetensors and torch give it, or torch's bare "write failed" while `where`'s disk is (nearly)
    full."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(err)
        if any(
            s in text
            for s in ("No space left on device", "StorageFull", "os error 28", "Disk quota exceeded")
        ):
            return True
        if "write failed" in text and where is not None:
            try:
                if shutil.disk_usage(Path(where)).free < 64 << 20:
                    return True
            except OSError:
                pass
        err = err.__cause__ or err.__context__
    return False
