"""Digit-sorting problems: a golden record, answers that are the sorted digits, each selection step right,
exact match reads the whole answer, deterministic and prefix-stable."""

from __future__ import annotations

import re

import pytest

from kvdistill.data.answers import exact_match, extract_answer
from kvdistill.data.sorting import MAX_DIGITS, MIN_DIGITS, sorting_records
from kvdistill.errors import KvdistillError

_QUESTION = re.compile(
    r"^(?:Sort the digits|Put|Arrange the digits) ([1-9](?: [1-9])+) in (ascending|descending) "
    r"order\.$"
)
_STEP = re.compile(r"^(min|max) of ([1-9](?: [1-9])+) is ([1-9])\.$")


def test_golden_record():
    r = sorting_records(1, seed=0)[0]
    assert r["id"] == "sorting:0:0"
    assert r["text"] == f"Question: {r['question']}\nReasoning: {r['cot']}\nAnswer: {r['answer']}\n"
    assert r["text"][r["answer_start"] :].startswith(r["answer"])


def test_answers_are_the_sorted_digits_and_every_step_picks_right():
    records = sorting_records(300, seed=3)
    orders = set()
    for r in records:
        m = _QUESTION.match(r["question"])
        assert m, r["question"]
        digits, order = [int(d) for d in m.group(1).split()], m.group(2)
        orders.add(order)
        assert MIN_DIGITS <= len(digits) <= MAX_DIGITS
        assert r["answer"] == "".join(map(str, sorted(digits, reverse=order == "descending")))
        *steps, last = re.findall(r"[^.]+\.", r["cot"])
        rest = list(digits)
        for step in steps:
            word, shown, picked = _STEP.match(step.strip()).groups()
            assert word == ("min" if order == "ascending" else "max")
            assert [int(d) for d in shown.split()] == rest
            assert int(picked) == (min(rest) if word == "min" else max(rest))
            rest.remove(int(picked))
        assert last.strip() == f"{rest[0]} is left."
        # the exact-match reader takes the first number after "Answer:": the whole sorted answer
        assert extract_answer(f"Answer: {r['answer']}") == str(int(r["answer"]))
        assert exact_match(extract_answer(f"Answer: {r['answer']}"), r["answer"])
    assert orders == {"ascending", "descending"}
    assert len({r["question"] for r in records}) == 300


def test_deterministic_prefix_stable_and_seeded():
    assert sorting_records(40, seed=1) == sorting_records(40, seed=1)
    assert sorting_records(80, seed=1)[:40] == sorting_records(40, seed=1)
    assert {r["question"] for r in sorting_records(40, seed=1)} != {
        r["question"] for r in sorting_records(40, seed=2)
    }


def test_bad_size():
    with pytest.raises(KvdistillError, match="must be positive"):
        sorting_records(0, seed=0)
