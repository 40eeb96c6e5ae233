"""Files written atomically, and the fsync and hash they need: the bottom floor every writer uses (the cache's
manifests, training's run files and checkpoints, an experiment's records, `kvdistill eval`'s eval.json).

A file is written under the temporary sibling `NAME.tmp` (opened without following a symlink planted there,
`kvdistill.paths.open_new`), flushed and fsynced, renamed over `NAME` and its directory fsynced: a reader sees
the old file or the new one, never half of one, also after a crash.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from kvdistill.paths import open_new

__all__ = ["fsync_dir", "sha256_file", "write_json_atomic", "write_text_atomic"]


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically (module docstring)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open_new(tmp) as f:  # never through a symlink planted at the temporary name
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write `data` as JSON (indent 1, a final newline) to `path` atomically."""
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory (its entries: a rename or a new file in it); a file system that cannot is let be."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The sha256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
