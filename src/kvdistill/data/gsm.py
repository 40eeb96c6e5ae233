"""GSM-Symbolic word problems generated offline by reasoning_gym (no download).

Each reasoning_gym item has `question`, `answer` (a number as a string) and `metadata["answer_cot"]`, a
worked solution ending in a GSM8K-style `#### <answer>` line; that line is dropped and the rest becomes the
record's `cot`.

Item i of a reasoning_gym dataset is drawn from `Random(seed + i)`, so datasets built with neighbouring seeds
share problems. Train and eval therefore come from one dataset (one seed), split by position, never from two
seeds; repeated questions are dropped so the two splits cannot share a problem. Generation is prefix-stable:
the first k problems are the same whatever `size` is. 256 problems take about 0.15 s (4096: 0.2 s), after
~1.3 s to import reasoning_gym once.

Generated items are kept on disk, one JSON line per item in generation order, under
``$KVDISTILL_HOME/data/gsm_symbolic-rg<reasoning_gym version>-<seed>.jsonl`` (default home
``~/.cache/kvdistill``): 40,000 items take about 40 s to generate on a laptop core and a second to read back,
and a machine without reasoning_gym (a GPU node) can use a file copied from one that has it. A file is only
ever extended, written under a temporary name and renamed; a damaged one is ignored and rewritten.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
from pathlib import Path

from kvdistill.data.problems import Problem, distinct_records
from kvdistill.errors import KvdistillError

# The line break after the answer ends it: a model trained on texts that stop right after the answer never
# learns what follows its last digit, and greedy decoding goes on ("Answer: 1080" for 108), which exact match
# counts wrong.
DEFAULT_TEMPLATE = "Question: {question}\nReasoning: {cot}\nAnswer: {answer}\n"
_FINAL_LINE = re.compile(r"\n*####[^\n]*\s*$")
# the version pinned by the `offline` extra: the file a machine without reasoning_gym reads
PINNED_VERSION = "0.1.25"


def cache_file(seed: int) -> Path:
    """Where the generated items of `seed` are kept (see the module docstring)."""
    try:
        version = md.version("reasoning_gym")
    except md.PackageNotFoundError:
        version = PINNED_VERSION
    home = Path(os.environ.get("KVDISTILL_HOME", Path.home() / ".cache" / "kvdistill"))
    return home / "data" / f"gsm_symbolic-rg{version}-{seed}.jsonl"


def _read_items(path: Path) -> list[dict]:
    """The items stored in `path` ({question, answer, cot} in generation order); [] when absent or damaged."""
    try:
        items = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, ValueError):
        return []
    if not all(isinstance(i, dict) and {"question", "answer", "cot"} <= i.keys() for i in items):
        return []
    return items


def generated_items(seed: int, count: int) -> list[dict]:
    """The first `count` reasoning_gym GSM-Symbolic items of `seed` as {question, answer, cot}, from the disk
    file when it holds enough, else generated (and the file extended)."""
    path = cache_file(seed)
    items = _read_items(path)
    if len(items) >= count:
        return items[:count]
    try:
        import reasoning_gym
    except ImportError:
        raise KvdistillError(
            f"data.source 'gsm_symbolic' needs the reasoning_gym package, which is not installed, or {path} "
            f"holding at least {count} items (it holds {len(items)})",
            "pip install 'kvdistill[offline]', copy that file from a machine that has it, or set "
            "data.source/data.path to a file",
        ) from None
    dataset = reasoning_gym.create_dataset("gsm_symbolic", size=count, seed=seed)
    items = [
        {
            "question": item["question"],
            "answer": str(item["answer"]),
            "cot": item["metadata"].get("answer_cot") or "",
        }
        for item in (dataset[i] for i in range(count))
    ]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text("".join(json.dumps(i) + "\n" for i in items), encoding="utf-8")
        tmp.replace(path)
    except OSError:
        pass  # a read-only home: generate again next time
    return items


def gsm_symbolic_records(size: int, seed: int, template: str = DEFAULT_TEMPLATE) -> list[dict]:
    """`size` distinct GSM-Symbolic problems as records, in generation order.

    Ids are `gsm_symbolic:<seed>:<index>`; `template` as in `data.template`.
    """
    # Spare items cover dropped repeats; generation is prefix-stable, so spares never change the first ones.
    items: list[dict] = []

    def draw(index: int) -> Problem:
        nonlocal items
        if index == len(items):  # read (or generate) the items on the first draw, twice as many when used up
            items = generated_items(seed, 2 * index if items else size + max(16, size // 8))
        item = items[index]
        question = item["question"].strip()
        return (
            question,
            question,
            _FINAL_LINE.sub("", item["cot"]).strip() or None,
            str(item["answer"]).strip(),
        )

    return distinct_records("gsm_symbolic", size, seed, template, draw)
