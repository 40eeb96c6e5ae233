"""Arithmetic problems: golden records, answers Python agrees with, each reasoning step right,
prefix-stable."""

from __future__ import annotations

import random
import re

import pytest

from kvdistill.config import DataConfig
from kvdistill.data import arithmetic_problem, arithmetic_records, load_records
from kvdistill.data.answers import exact_match, extract_answer
from kvdistill.data.arith import MAX_OPS, MAX_VALUE, MIN_OPS
from kvdistill.errors import KvdistillError

_QUESTION = re.compile(r"^(?:Compute|What is|Evaluate|Calculate) ([\d()+\-* ]+)[.?]$")
_STEP = re.compile(r"^(\d+) ([+\-*]) (\d+) = (\d+)\.$")


def expression_of(record: dict) -> str:
    m = _QUESTION.match(record["question"])
    assert m, record["question"]
    return m.group(1)


def steps_of(record: dict) -> list[tuple[int, str, int, int]]:
    steps = re.findall(r"[^.]+\.", record["cot"])
    assert " ".join(s.strip() for s in steps) == record["cot"]
    out = []
    for step in steps:
        m = _STEP.match(step.strip())
        assert m, step
        out.append((int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))))
    return out


def test_golden_first_records():
    records = arithmetic_records(3, seed=7)
    assert [(r["id"], r["text"], r["answer"], r["answer_start"]) for r in records] == [
        (
            "arithmetic:7:0",
            "Question: Compute 4 * (14 - 1) + 4 - 1.\n"
            "Reasoning: 14 - 1 = 13. 4 * 13 = 52. 52 + 4 = 56. 56 - 1 = 55.\nAnswer: 55\n",
            "55",
            111,
        ),
        (
            "arithmetic:7:1",
            "Question: Compute 18 + 10 + 3 + 14 - 10.\n"
            "Reasoning: 18 + 10 = 28. 28 + 3 = 31. 31 + 14 = 45. 45 - 10 = 35.\nAnswer: 35\n",
            "35",
            115,
        ),
        (
            "arithmetic:7:2",
            "Question: Calculate 6 + 17 - 19.\nReasoning: 6 + 17 = 23. 23 - 19 = 4.\nAnswer: 4\n",
            "4",
            78,
        ),
    ]
    assert records[0]["question"] == "Compute 4 * (14 - 1) + 4 - 1."
    assert records[0]["cot"] == "14 - 1 = 13. 4 * 13 = 52. 52 + 4 = 56. 56 - 1 = 55."


def test_answers_are_python_evaluation_and_every_step_is_right():
    records = arithmetic_records(2000, seed=3)
    assert len({expression_of(r) for r in records}) == 2000  # distinct problems
    n_ops = set()
    for r in records:
        expression = expression_of(r)
        assert eval(expression) == int(r["answer"]), r  # noqa: S307 - digits, + - * and parentheses only
        steps = steps_of(r)
        n_ops.add(len(steps))
        assert len(steps) == sum(expression.count(op) for op in "+-*")
        prev = None
        for a, op, b, c in steps:
            assert c == {"+": a + b, "-": a - b, "*": a * b}[op], r["cot"]
            assert 1 <= c <= MAX_VALUE
            if prev is None:  # the start value (2-20) and the first operand, in either order
                operands = [x for x in (a, b) if x <= 20]
            else:  # each later step uses the previous result, as either operand
                assert prev in (a, b)
                operands = [b if a == prev else a]
            assert any(1 <= x <= 20 if op != "*" else 2 <= x <= 9 for x in operands), r["cot"]
            prev = c
        assert prev == int(r["answer"])
        assert r["text"] == f"Question: {r['question']}\nReasoning: {r['cot']}\nAnswer: {r['answer']}\n"
        assert r["text"][r["answer_start"] :] == r["answer"] + "\n"  # the template ends the answer line
        assert exact_match(extract_answer(r["text"]), r["answer"])
    assert n_ops == set(range(MIN_OPS, MAX_OPS + 1))
    assert {op for r in records for _, op, _, _ in steps_of(r)} == {"+", "-", "*"}


def test_problem_is_consistent_for_any_rng():
    for i in range(500):
        expression, cot, value = arithmetic_problem(random.Random(i))
        assert eval(expression) == value and cot.endswith(f"= {value}.")  # noqa: S307


def test_deterministic_prefix_stable_and_seeded():
    first = arithmetic_records(50, seed=11)
    assert arithmetic_records(50, seed=11) == first
    assert arithmetic_records(300, seed=11)[:50] == first
    assert arithmetic_records(20, seed=11) == first[:20]
    other = arithmetic_records(50, seed=12)
    assert {r["question"] for r in other}.isdisjoint(r["question"] for r in first[:10])
    assert {r["id"].rsplit(":", 1)[0] for r in other} == {"arithmetic:12"}


def test_template_applies_and_bad_size():
    for r in arithmetic_records(5, seed=0, template="Q: {question}\nA: {answer}"):
        assert (
            r["text"] == f"Q: {r['question']}\nA: {r['answer']}"
            and r["text"][r["answer_start"] :] == r["answer"]
        )
    with pytest.raises(KvdistillError, match=r"arithmetic size \(0\)"):
        arithmetic_records(0, seed=0)


def test_load_records_needs_no_path_and_splits_disjoint():
    config = DataConfig(source="arithmetic", size=400, eval_size=40, seed=5, template="{question} = {answer}")
    train, evals = load_records(config, "train"), load_records(config, "eval")
    assert len(evals) == 40 and len(train) == 360  # generated problems are distinct: nothing to drop
    assert evals == arithmetic_records(40, seed=5, template="{question} = {answer}")
    assert {r["question"] for r in train}.isdisjoint(r["question"] for r in evals)
    assert train[0]["text"] == f"{train[0]['question']} = {train[0]['answer']}"
    bigger = config.model_copy(update={"size": 1000})
    assert load_records(bigger, "eval") == evals
