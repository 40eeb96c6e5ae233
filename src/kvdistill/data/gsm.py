"""GSM-Symbolic word problems generated offline by reasoning_gym (no download).

Each reasoning_gym item has `question`, `answer` (a number as a string) and `metadata["answer_cot"]`, a
worked solution ending in a GSM8K-style `#### <answer>` line; that line is dropped and the rest becomes the
record's `cot`.

Item i of a reasoning_gym dataset is drawn from `Random(seed + i)`, so datasets built with neighbouring seeds
share problems. Train and eval therefore come from one dataset (one seed), split by position, never from two
seeds; repeated questions are dropped so the two splits cannot share a problem. Generation is prefix-stable:
the first k problems are the same whatever `size` is. 256 problems take about 0.15 s (4096: 0.2 s), after
~1.3 s to import reasoning_gym once.
"""

from __future__ import annotations

import re

from kvdistill.data.template import check_template, make_record
from kvdistill.errors import KvdistillError

# The line break after the answer ends it: a model trained on texts that stop right after the answer never learns
# what follows its last digit, and greedy decoding goes on ("Answer: 1080" for 108), which exact match counts wrong.
DEFAULT_TEMPLATE = "Question: {question}\nReasoning: {cot}\nAnswer: {answer}\n"
_FINAL_LINE = re.compile(r"\n*####[^\n]*\s*$")


def gsm_symbolic_records(size: int, seed: int, template: str = DEFAULT_TEMPLATE) -> list[dict]:
    """`size` distinct GSM-Symbolic problems as records, in generation order.

    Ids are `gsm_symbolic:<seed>:<index>`; `template` as in `data.template`.
    """
    if size <= 0:
        raise KvdistillError(f"gsm_symbolic size ({size}) must be positive", "set data.size to 1 or more")
    check_template(template)
    try:
        import reasoning_gym
    except ImportError:
        raise KvdistillError(
            "data.source 'gsm_symbolic' needs the reasoning_gym package, which is not installed",
            "pip install 'kvdistill[offline]', or set data.source/data.path to a file",
        ) from None

    # Spare items cover dropped repeats; generation is prefix-stable, so spares never change the first ones.
    pool = size + max(16, size // 8)
    dataset = reasoning_gym.create_dataset("gsm_symbolic", size=pool, seed=seed)
    records: list[dict] = []
    seen: set[str] = set()
    index = 0
    while len(records) < size:
        if index == pool:
            pool *= 2
            dataset = reasoning_gym.create_dataset("gsm_symbolic", size=pool, seed=seed)
        item = dataset[index]
        index += 1
        question = item["question"].strip()
        if question in seen:
            continue
        seen.add(question)
        cot = _FINAL_LINE.sub("", item["metadata"].get("answer_cot") or "").strip() or None
        records.append(
            make_record(
                f"gsm_symbolic:{seed}:{index - 1}", question, cot, str(item["answer"]).strip(), template
            )
        )
    return records
