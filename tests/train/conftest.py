"""Fixtures for the training tests: the command line run in-process and readers of a run's files (the tiny
teachers and configs are in tests/conftest.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kvdistill.cli import main


def run_cli(args: list[str]) -> int:
    """`kvdistill ARGS` in this process; the exit code."""
    argv = sys.argv
    sys.argv = ["kvdistill", *map(str, args)]
    try:
        main()
    except SystemExit as exit_:
        return int(exit_.code or 0)
    finally:
        sys.argv = argv
    return 0


@pytest.fixture
def cli(capsys, monkeypatch):
    """cli(*args) -> (exit code, stderr on one line: rich's wrapping undone, paths kept whole)."""
    from kvdistill import cli as cli_module

    monkeypatch.setattr(cli_module.console, "width", 10_000)

    def call(*args) -> tuple[int, str]:
        code = run_cli(list(args))
        return code, " ".join(capsys.readouterr().err.split())

    return call


class RunFiles:
    """Readers for what a run leaves on disk (a fixture: test modules cannot import conftest)."""

    @staticmethod
    def weights(directory: Path, prefix: str = "") -> dict[str, torch.Tensor]:
        """The tensors of DIR/model.safetensors whose names start with `prefix` (prefix stripped)."""
        state = load_file(str(Path(directory) / "model.safetensors"))
        return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}

    @staticmethod
    def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
        """Largest absolute difference between two state dicts with the same keys."""
        assert a.keys() == b.keys()
        return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)

    @staticmethod
    def metrics(run_dir: Path) -> list[dict]:
        """Training rows of RUN/metrics.jsonl (eval rows left out)."""
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        return [r for r in rows if r.get("split") != "eval"]


@pytest.fixture(scope="session")
def files() -> type[RunFiles]:
    return RunFiles
