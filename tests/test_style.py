"""The repository's style is checked, not hoped for: `ruff check` (lint, import order, line length 110) and
`ruff format --check` (one formatting style) are clean on src, tests and benchmarks. ruff is pinned in the dev
extra, which `scripts/setup.sh` installs, because another release may format differently."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATHS = ["src", "tests", "benchmarks"]


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args, *PATHS], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("args", [("check",), ("format", "--check")], ids=["check", "format"])
def test_ruff_is_clean(args):
    version = subprocess.run([sys.executable, "-m", "ruff", "--version"], capture_output=True, text=True)
    assert version.returncode == 0, "ruff is missing: run `bash scripts/setup.sh` (it installs the dev extra)"
    result = _ruff(*args)
    assert result.returncode == 0, (
        f"`ruff {' '.join(args)}` found problems (fix with `ruff check --fix` / `ruff format`):\n"
        f"{result.stdout[-4000:]}{result.stderr[-2000:]}"
    )
