"""Shared fixtures: the real offline models (loaded once per session) and tiny random configs.

Tiny run: two saved teachers (3 layers, width 64, random): `qwen2` with SmolLM2's byte-level BPE (GQA 4/2,
head dim 16) and `gemma3` (gemma3_text, MQA 4/1, head dim 32, sliding window 8) with the Llama-2 SentencePiece
tokenizer. The student is a 2-layer llama built from SmolLM2's config with the GPT-2 tokenizer: three
tokenizers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from kvdistill.config import RunConfig, load_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm2():
    from kvdistill import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3():
    from kvdistill import load_model

    return load_model("gemma3-270m")


@pytest.fixture(scope="session")
def minilm():
    from kvdistill import load_model

    return load_model("minilm-l6")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


STUDENT = {
    "from_config": {
        "base": "smollm2-135m",
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
    },
    "tokenizer": "gpt2-tokenizer",
}


def save_tiny_teacher(path: Path, family: str, tokenizer: str, **overrides) -> Path:
    """A random 3-layer model of `family` sized for `tokenizer`, saved with it as a model directory."""
    from kvdistill.models.load import load_tokenizer

    tok = load_tokenizer(tokenizer)
    kwargs = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    kwargs.update(overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(family, **kwargs), attn_implementation="eager"
    )
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def teacher_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("teachers")
    return {
        "qwen2": save_tiny_teacher(root / "qwen2", "qwen2", "smollm2-135m", num_key_value_heads=2),
        "gemma3": save_tiny_teacher(
            root / "gemma3",
            "gemma3_text",
            "llama2-tokenizer",
            num_key_value_heads=1,
            head_dim=32,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_local_base_freq=10000.0,
            rope_theta=1e6,
        ),
    }


def tiny_raw(teacher_dirs: dict[str, Path]) -> dict:
    """A 2-step run: the tiny student, both tiny teachers, 12 generated samples of at most 32 tokens."""
    return {
        "name": "tiny",
        "student": json.loads(json.dumps(STUDENT)),
        "teachers": [{"name": name, "model": str(path)} for name, path in teacher_dirs.items()],
        "data": {"source": "gsm_symbolic", "size": 12, "eval_size": 0, "max_length": 32},
        "train": {"steps": 2, "batch_size": 4, "lr": 1.0e-3, "warmup_steps": 0, "tensorboard": False},
    }


@pytest.fixture(scope="session")
def tiny_config(teacher_dirs):
    """tiny_config(*overrides) -> RunConfig of `tiny_raw` with dotted overrides applied."""

    def make(*overrides: str) -> RunConfig:
        return load_config(raw=tiny_raw(teacher_dirs), overrides=list(overrides))

    return make


@pytest.fixture(scope="session")
def tiny_yaml(teacher_dirs, tmp_path_factory) -> Path:
    """`tiny_raw` as a YAML file, for the command line."""
    import yaml

    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_raw(teacher_dirs), sort_keys=False))
    return path


def tree_snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under `root`, links not followed: {relative path: ("file", sha256) | ("dir",) |
    ("link", target)}; compare two to prove what a command wrote, changed or deleted."""
    import hashlib

    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
    return out


class Tree:
    """`tree.snap(root)` and `tree.changes(before, after)`: what a command did to a directory tree."""

    snap = staticmethod(tree_snapshot)

    @staticmethod
    def changes(before: dict[str, tuple], after: dict[str, tuple]) -> dict[str, list[str]]:
        """{"added": [...], "removed": [...], "changed": [...]} between two snapshots."""
        return {
            "added": sorted(set(after) - set(before)),
            "removed": sorted(set(before) - set(after)),
            "changed": sorted(k for k in set(before) & set(after) if before[k] != after[k]),
        }

    @classmethod
    def only_inside(cls, before: dict[str, tuple], after: dict[str, tuple], out: str) -> None:
        """Assert nothing pre-existing was changed or removed, and nothing was added outside `out`
        (relative)."""
        diff = cls.changes(before, after)
        assert diff["removed"] == [] and diff["changed"] == [], diff
        outside = [p for p in diff["added"] if p != out and not p.startswith(out.rstrip("/") + "/")]
        assert outside == [], outside


@pytest.fixture(scope="session")
def tree() -> type[Tree]:
    return Tree
