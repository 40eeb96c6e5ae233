"""`kvdistill eval`, `kvdistill generate` and `kvdistill report`: thin commands over `kvdistill.eval`,
registered on the app by `kvdistill.cli` (which prints their errors).

    kvdistill eval RUN [--data FILE] [--no-probe] [--json]    perplexity, exact match, KV probe; RUN/eval.json
    kvdistill generate RUN --prompt TEXT [--temperature T]    continue a prompt, with tokens/s
    kvdistill report RUN [RUN ...] [--html] [--out FILE]      one page comparing runs
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from kvdistill.config import config_path

console = Console(stderr=True)


def evaluate(
    checkpoint: str = typer.Argument(
        ..., help="A run dir, RUN/final, RUN/checkpoints/step-N, a student dir or a model."
    ),
    data: str | None = typer.Option(
        None,
        "--data",
        help="gsm_symbolic or a .jsonl/.csv/.parquet/.txt file (default: the run's data, else gsm_symbolic).",
    ),
    config: str | None = typer.Option(
        None, "--config", help="Take data settings and teachers from this config."
    ),
    teachers: list[str] | None = typer.Option(
        None, "--teacher", help="Teacher(s) for the KV probe (default: the run's teachers)."
    ),
    size: int | None = typer.Option(
        None, help="Held-out samples (default: the run's data.eval_size, else 32)."
    ),
    max_length: int | None = typer.Option(
        None, help="Token limit per sample (default: the run's, else 256)."
    ),
    em: bool = typer.Option(True, help="Exact match by greedy generation (needs (question, answer) data)."),
    max_new_tokens: int | None = typer.Option(
        None, "--max-new-tokens", min=1, help="Exact match: tokens generated per answer (default 16)."
    ),
    batch_size: int | None = typer.Option(
        None, "--batch-size", min=1, help="Evaluation batch (default 8; latent students 32)."
    ),
    probe: bool = typer.Option(
        True,
        help="The KV probe against the teachers (most of the time: their forwards "
        "and a ridge fit per layer).",
    ),
    save: bool = typer.Option(True, help="Save the result as RUN/eval.json (shown by `kvdistill report`)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Held-out perplexity, exact match and the KV probe 1-R² per layer against teachers; saved as
    RUN/eval.json.

    A latent student: latent-mode exact match (tokens and latency per answer) and the answer CE after its
    latents.

    Examples:

        kvdistill eval runs/a                  # its final student, its held-out split

        kvdistill eval runs/a --no-probe --json

        kvdistill eval runs/a/checkpoints/step-200 --data my.jsonl --size 64
    """
    from kvdistill.eval.run import EVAL_FILE, evaluate_checkpoint, markdown_table

    result = evaluate_checkpoint(
        checkpoint,
        data=data,
        config=config_path(config) if config else None,
        teachers=teachers or [],
        size=size,
        max_length=max_length,
        em=em,
        probe=probe,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=True,
        save=save,
    )
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
    else:
        sys.stdout.write(markdown_table(result) + "\n")
    if save and result["run_dir"]:
        console.print(f"[green]saved[/green] {escape(str(Path(result['run_dir']) / EVAL_FILE))}")


def generate(
    checkpoint: str = typer.Argument(
        ..., help="A run dir, RUN/final, RUN/checkpoints/step-N, a student dir or a model."
    ),
    prompt: str = typer.Option(..., "--prompt", "-p", help="The text to continue."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Tokens to generate."),
    temperature: float = typer.Option(
        0.0, "--temperature", help="0: greedy; > 0: sample at this temperature."
    ),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (with --temperature > 0)."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    latent: bool = typer.Option(
        False,
        "--latent",
        help="A latent student: PROMPT is the question part, then the "
        "latents, then --answer-prompt (greedy).",
    ),
    answer_prompt: str = typer.Option(
        "Answer:", "--answer-prompt", help="With --latent: text after the latents."
    ),
) -> None:
    """Continue a prompt with a saved student (a plain Hugging Face model), printing the text and tokens/s.

    Examples:

        kvdistill generate runs/a --prompt "Question: Compute 3 + 4." --max-new-tokens 32

        kvdistill generate runs/a/final --prompt "Once" --temperature 0.8 --top-p 0.9 --seed 1
    """
    from kvdistill.eval.generate import generate as run_generate

    gen = run_generate(
        checkpoint,
        prompt,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        latent=latent,
        answer_prompt=answer_prompt,
    )
    if as_json:
        sys.stdout.write(json.dumps(gen.to_dict(), indent=2, default=str) + "\n")
        return
    sys.stdout.write(gen.continuation + "\n")
    console.print(
        f"[dim]{gen.new_tokens} tokens in {gen.seconds:.2f} s ({gen.tokens_per_s:.1f} tokens/s)[/dim]"
    )
    if gen.latent_reads is not None:
        console.print(f"[dim]latents read as tokens: {escape(repr(gen.latent_reads))}[/dim]")


def report(
    run_dirs: list[str] = typer.Argument(..., help="Run directories to put on one page."),
    out: str | None = typer.Option(None, "--out", "-o", help="Output file (default: FIRST_RUN/report.md)."),
    html: bool = typer.Option(False, "--html", help="Write HTML instead of markdown."),
) -> None:
    """One page comparing runs: tables, eval.json, training and held-out curves, layer maps, alignment.

    Examples:

        kvdistill report runs/a                # writes runs/a/report.md

        kvdistill report runs/kd runs/ce --html --out compare.html
    """
    from pathlib import Path

    from kvdistill.eval.report import write_report

    target = Path(out) if out else Path(run_dirs[0]) / ("report.html" if html else "report.md")
    path = write_report(run_dirs, target, fmt="html" if html else "md")
    console.print(f"[green]wrote[/green] {escape(str(path))}")
