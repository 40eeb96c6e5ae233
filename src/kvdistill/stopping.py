"""A writing command (train, extract, experiment, quickstart) stopped by Ctrl-C or SIGTERM: it unwinds as
after Ctrl-C (locks released, temporary files removed), says how to continue, and exits 128 + the signal."""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.markup import escape

RERUN = "to continue, run the same command again: what was finished is kept, the rest resumes"


class Stopped(KeyboardInterrupt):
    """SIGTERM, raised wherever the main thread is."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextmanager
def stoppable(console: Console, how_to_continue: str) -> Iterator[None]:
    """Run the body so that Ctrl-C or SIGTERM ends it with `how_to_continue` (printed once, by rank 0) and
    exit code 128 + signal."""

    def on_term(signum, _frame):
        raise Stopped(signum)

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_term) if main_thread else None
    try:
        yield
    except KeyboardInterrupt as stop:
        signum = getattr(stop, "signum", signal.SIGINT)
        if os.environ.get("RANK", "0") == "0":
            console.print(
                f"[yellow]stopped[/yellow] by {signal.Signals(signum).name}; {escape(how_to_continue)}"
            )
        raise typer.Exit(128 + signum) from None
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def resume_hint() -> str:
    """How to continue the `kvdistill train` command line being run: the same with --resume."""
    args = list(sys.argv[1:])
    if "--resume" not in args:
        args.append("--resume")
    return "to continue from the last checkpoint, run: kvdistill " + shlex.join(args)
