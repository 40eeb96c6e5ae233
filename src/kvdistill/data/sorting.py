"""Digit-sorting problems with a worked selection-sort solution, generated offline from a seed.

A problem is a list of 4-7 digits (1-9, repeats allowed) to sort in ascending or descending order; its chain
of thought picks the smallest (largest) remaining digit once per position, and its answer is the sorted digits
written as one number (the exact-match reader takes the first number after "Answer:", so the digits are not
separated)::

    question: "Sort the digits 8 3 5 1 in ascending order."
    cot:      "min of 8 3 5 1 is 1. min of 8 3 5 is 3. min of 8 5 is 5. 8 is left."
    answer:   "1358"

The reasoning is a selection (compare, pick, carry the rest), not a calculation, and the answer is gathered
from the whole chain rather than read off its last step: a skill that arithmetic does not teach.

Problem i is drawn from its own `random.Random("kvdistill-sorting:<seed>:<i>")`: generation is deterministic
and prefix-stable, and a repeated question is skipped, so the problems of one call are distinct.
"""

from __future__ import annotations

import random

from kvdistill.data.gsm import DEFAULT_TEMPLATE
from kvdistill.data.problems import Problem, distinct_records

MIN_DIGITS, MAX_DIGITS = 4, 7
_ORDERS = {"ascending": ("min", min), "descending": ("max", max)}
_PHRASES = ("Sort the digits {} in {} order.", "Put {} in {} order.", "Arrange the digits {} in {} order.")


def sorting_problem(rng: random.Random) -> tuple[str, str, str]:
    """One (question, cot, answer) drawn from `rng`; the answer is the sorted digits as one number."""
    digits = [rng.randint(1, 9) for _ in range(rng.randint(MIN_DIGITS, MAX_DIGITS))]
    order = rng.choice(sorted(_ORDERS))
    word, pick = _ORDERS[order]
    rest, steps, chosen = list(digits), [], []
    while len(rest) > 1:
        best = pick(rest)
        steps.append(f"{word} of {' '.join(map(str, rest))} is {best}.")
        rest.remove(best)  # the first occurrence: a repeated digit stays for the next step
        chosen.append(best)
    steps.append(f"{rest[0]} is left.")
    chosen.append(rest[0])
    question = rng.choice(_PHRASES).format(" ".join(map(str, digits)), order)
    return question, " ".join(steps), "".join(map(str, chosen))


def sorting_records(size: int, seed: int, template: str = DEFAULT_TEMPLATE) -> list[dict]:
    """`size` distinct digit-sorting problems as records, in generation order; ids
    `sorting:<seed>:<index>`."""

    def draw(index: int) -> Problem:
        question, cot, answer = sorting_problem(random.Random(f"kvdistill-sorting:{seed}:{index}"))
        return question, question, cot, answer

    return distinct_records("sorting", size, seed, template, draw)
