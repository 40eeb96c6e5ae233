"""The README's newcomer walkthrough, run as written: its files written, its commands and its Python run in
order.

The walkthrough is the part of README.md between `<!-- walkthrough:start -->` and `<!-- walkthrough:end -->`.
A code block after `<!-- file: NAME -->` is written to NAME; every `kvdistill ...` line of a bash block is run
(in this process, as `kvdistill.cli.main`) and must exit 0; a python block is executed. The one change: the
training step counts are made tiny (`TINY`), so that the walkthrough takes seconds on a CPU.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
TINY = [
    "train.steps=2",
    "train.eval_every=1",
    "train.save_every=1",
    "train.batch_size=2",
    "data.max_length=48",
]
BLOCK = re.compile(
    r"(?:<!-- file: (?P<file>[^ ]+) -->\s*\n)?```(?P<lang>\w+)[^\n]*\n(?P<body>.*?)\n```", re.S
)


def walkthrough() -> list[tuple[str, str | None, str]]:
    """(language, file name or None, body) of every code block of the walkthrough, in order."""
    text = README.read_text()
    start, end = text.index("<!-- walkthrough:start -->"), text.index("<!-- walkthrough:end -->")
    return [(m["lang"], m["file"], m["body"]) for m in BLOCK.finditer(text[start:end])]


def run_cli(args: list[str]) -> int:
    from kvdistill.cli import main

    argv, sys.argv = sys.argv, ["kvdistill", *args]
    try:
        main()
    except SystemExit as exit_:
        return int(exit_.code or 0)
    finally:
        sys.argv = argv
    return 0


def commands(body: str) -> list[list[str]]:
    """The `kvdistill ...` lines of a bash block (comments dropped, `\\` continuations joined)."""
    joined = body.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words and words[0] == "kvdistill":
            out.append(words[1:])
    return out


def tiny(args: list[str]) -> list[str]:
    """`train` gets the tiny step counts (after the README's own overrides, so they win)."""
    return [*args, *TINY] if args and args[0] == "train" else args


@pytest.mark.slow
def test_the_readme_walkthrough_runs_as_written(tmp_path, monkeypatch, capsys):
    blocks = walkthrough()
    assert {lang for lang, _, _ in blocks} >= {"yaml", "bash", "python"}
    monkeypatch.chdir(tmp_path)
    ran = []
    for lang, name, body in blocks:
        if name is not None:
            Path(name).write_text(body + "\n")
        elif lang == "bash":
            for args in commands(body):
                code = run_cli(tiny(args))
                assert code == 0, (args, capsys.readouterr().err[-2000:])
                ran.append(args[0])
        elif lang == "python":
            source = body
            for key in ("train.steps", "train.eval_every", "train.save_every"):
                source = re.sub(
                    rf"{re.escape(key)}=\d+", f"{key}=1" if key != "train.steps" else f"{key}=2", source
                )
            exec(compile(source, "README walkthrough", "exec"), {"__name__": "walkthrough"})
            ran.append("python")
    assert {"validate", "train", "eval", "generate", "report", "python"} <= set(ran)
