"""The loop every seeded problem generator shares (`kvdistill.data.arith`, `.sorting`, `.gsm`).

Problem i is drawn by its index alone (so generation is deterministic and prefix-stable); a problem whose key
(the expression, or the question) was drawn before is skipped and its index left unused, so the records of one
call are distinct, in generation order, with ids `<source>:<seed>:<index>`.
"""

from __future__ import annotations

from collections.abc import Callable

from kvdistill.data.template import check_template, make_record
from kvdistill.errors import KvdistillError

Problem = tuple[str, str, str | None, str]  # (key two problems are the same by, question, cot, answer)


def distinct_records(
    source: str, size: int, seed: int, template: str, draw: Callable[[int], Problem]
) -> list[dict]:
    """`size` records of the problems `draw(0)`, `draw(1)`, ... less repeats (module docstring), rendered with
    `template` as in `data.template`."""
    if size <= 0:
        raise KvdistillError(f"{source} size ({size}) must be positive", "set data.size to 1 or more")
    check_template(template)
    records: list[dict] = []
    seen: set[str] = set()
    index = 0
    while len(records) < size:
        key, question, cot, answer = draw(index)
        index += 1
        if key in seen:
            continue
        seen.add(key)
        records.append(make_record(f"{source}:{seed}:{index - 1}", question, cot, answer, template))
    return records
