"""GGUF files as Hugging Face model directories: dequantized once into float16 safetensors, then cached.

`convert` is the one conversion, used by the offline zoo (``$KVDISTILL_HOME/zoo/<name>``) and by local files.
A local ``.gguf`` file (or a directory holding exactly one) converts into ``<root>/<sha256[:16]>``, keyed by
the file's content; its stamp (``kvdistill_zoo.json``) records the source path, size, sha256 and conversion
version. The sha256 of a path is remembered with its size and mtime (``<root>/by-path/``), so an unchanged
file is not hashed again and loads in about a second; a changed file gets a new hash and converts again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock

from kvdistill.errors import KvdistillError

log = logging.getLogger(__name__)

CONVERSION_VERSION = 1  # bump when the converted layout changes, so stale caches are rebuilt
STAMP = "kvdistill_zoo.json"
MAGIC = b"GGUF"
_CHUNK = 1 << 22  # sha256 read size (4 MiB)


# ---------------------------------------------------------------------------------------------- finding
def is_gguf_file(path: Path) -> bool:
    """A file named *.gguf, or any file that starts with the GGUF magic bytes."""
    if not path.is_file():
        return False
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with path.open("rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def find_gguf(path: Path) -> Path | None:
    """The GGUF file that `path` names: the file itself, or the only *.gguf of a directory without
    config.json.

    None when `path` is neither (a Hugging Face directory, another file, a missing path). A directory with
    several *.gguf files raises, listing them."""
    if path.is_file():
        return path if is_gguf_file(path) else None
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    if len(found) > 1:
        raise KvdistillError(
            f"'{path}' holds {len(found)} GGUF files: {', '.join(p.name for p in found)}",
            f"pass one of them as a file path, e.g. '{found[0]}'",
        )
    return found[0] if found else None


# ---------------------------------------------------------------------------------------------- checking
def _bad_file(source: Path, what: str) -> KvdistillError:
    size = source.stat().st_size if source.exists() else 0
    return KvdistillError(
        f"'{source}' ({size:,} bytes) is not a readable GGUF file: {what}",
        "the file is truncated or corrupt: download it again (compare its size and sha256 with the "
        "original), "
        "or pass a Hugging Face model directory",
    )


def check_gguf(source: Path) -> None:
    """Raise a KvdistillError naming the file when it is not a whole GGUF file (bad magic, cut-off header or
    tensor data): the reader maps every tensor, so a truncated file fails here, before any conversion."""
    from gguf import GGUFReader

    try:
        with source.open("rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise KvdistillError(f"cannot read '{source}': {err}", "check the path and its permissions") from err
    if magic != MAGIC:
        raise _bad_file(source, f"it starts with {magic!r}, not the GGUF magic {MAGIC!r}")
    try:
        GGUFReader(str(source))
    except Exception as err:  # noqa: BLE001 - numpy/struct errors of a cut-off file; all mean "unreadable"
        raise _bad_file(source, f"{type(err).__name__}: {str(err).splitlines()[0][:200]}") from err


# ---------------------------------------------------------------------------------------------- converting
def convert(source: Path, target: Path, stamp: dict) -> None:
    """Dequantize the GGUF file `source` and save config, float16 safetensors and tokenizer into `target`.

    Atomic: the directory is built next to `target` and renamed into place, so a reader sees the whole of it
    or none. `stamp` (plus the conversion version) is written into it as ``kvdistill_zoo.json``."""
    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf(source)
    log.info(
        "converting %s (%.0f MB) into %s; this happens once", source, source.stat().st_size / 1e6, target
    )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(source.parent), gguf_file=source.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise KvdistillError(
            f"could not convert '{source}': {str(err).splitlines()[0][:300]}",
            f"transformers {transformers.__version__} converts GGUF files of these architectures: "
            f"{', '.join(_supported_architectures())}; for another, pass a Hugging Face model directory",
        ) from err
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
        # tied weights share storage; safetensors wants each tensor once
        if getattr(config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        (tmp / STAMP).write_text(json.dumps({**stamp, "conversion_version": CONVERSION_VERSION}))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _supported_architectures() -> list[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted(GGUF_SUPPORTED_ARCHITECTURES)


def read_stamp(target: Path) -> dict | None:
    """The stamp of a converted directory, or None when it has none or was converted by another version."""
    try:
        stamp = json.loads((target / STAMP).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(stamp, dict) or stamp.get("conversion_version") != CONVERSION_VERSION:
        return None
    return stamp


# ---------------------------------------------------------------------------------------------- local files
def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks (never whole into memory)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (a concurrent reader sees the old file or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def content_hash(source: Path, root: Path) -> str:
    """sha256 of `source`, hashed again only when its size or mtime changed since the last time."""
    resolved = source.resolve()
    memo = root / "by-path" / f"{hashlib.sha256(str(resolved).encode()).hexdigest()[:16]}.json"
    before = resolved.stat()
    seen = {"path": str(resolved), "size": before.st_size, "mtime_ns": before.st_mtime_ns}
    try:
        known = json.loads(memo.read_text())
    except (OSError, json.JSONDecodeError):
        known = {}
    if isinstance(known, dict) and {k: known.get(k) for k in seen} == seen and "sha256" in known:
        return known["sha256"]
    log.info("hashing %s (%.0f MB)", source, before.st_size / 1e6)
    digest = sha256_of(resolved)
    after = resolved.stat()
    if (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns):  # not written while hashed
        _write_json(memo, {**seen, "sha256": digest})
    return digest


def converted_dir(source: Path, root: Path) -> Path:
    """The Hugging Face directory of the local GGUF file `source` under `root`, converting it on first use.

    Keyed by content: ``<root>/<sha256[:16]>``. A file lock makes concurrent callers convert once."""
    digest = content_hash(source, root)
    target = root / digest[:16]
    stamp = read_stamp(target)
    if stamp is not None and stamp.get("sha256") == digest:
        return target
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        stamp = read_stamp(target)
        if stamp is None or stamp.get("sha256") != digest:
            convert(
                source,
                target,
                {"source": str(source.resolve()), "size": source.stat().st_size, "sha256": digest},
            )
    return target
