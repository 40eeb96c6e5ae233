"""Multi-step integer arithmetic problems with a worked solution, generated offline from a seed.

A problem is an expression of 2-4 operations (+, -, *) on small integers, asked in one of a few phrasings;
its chain of thought is one `a op b = c.` step per operation, innermost first, and its answer the value::

    question: "Compute (17 + 5) * 3 - 8."
    cot:      "17 + 5 = 22. 22 * 3 = 66. 66 - 8 = 58."
    answer:   "58"

Operands of + and - are 1-20, factors 2-9; every intermediate value is a positive integer of at most 200
(a subtraction never goes below 1, a product never above 200), so a tiny model can learn the task in a few
hundred steps. Parentheses are written exactly where Python's precedence needs them (and around a
sum on the right of `+`), so `eval` of the expression gives the answer.

Problem i is drawn from its own `random.Random("kvdistill-arithmetic:<seed>:<i>")`: generation is
deterministic and prefix-stable (the first k problems are the same whatever `size` is), and neighbouring
seeds do not share problems. A repeated expression is skipped (its index is not used), so the problems of
one call are distinct. 4096 problems take about 0.1 s (40,000: 1.6 s).
"""

from __future__ import annotations

import random

from kvdistill.data.gsm import DEFAULT_TEMPLATE
from kvdistill.data.problems import Problem, distinct_records

MIN_OPS, MAX_OPS = 2, 4
MAX_VALUE = 200
_TERMS = (1, 20)  # operands of + and -
_FACTORS = (2, 9)  # operands of *
_PHRASES = ("Compute {}.", "What is {}?", "Evaluate {}.", "Calculate {}.")
_SUM, _PRODUCT = 1, 2  # precedence of an expression's outermost operator (None: a bare number)


def arithmetic_problem(rng: random.Random) -> tuple[str, str, int]:
    """One (expression, cot, value) drawn from `rng`; `eval(expression) == value`."""
    value = rng.randint(2, 20)
    expression, outer = str(value), None
    steps = []
    for _ in range(rng.randint(MIN_OPS, MAX_OPS)):
        ops = ["+"] + (["-"] if value > 1 else []) + (["*"] if value * _FACTORS[0] <= MAX_VALUE else [])
        op = rng.choice(ops)
        if op == "+":
            operand = rng.randint(*_TERMS)
            result = value + operand
        elif op == "-":
            operand = rng.randint(_TERMS[0], min(_TERMS[1], value - 1))
            result = value - operand
        else:
            operand = rng.randint(_FACTORS[0], min(_FACTORS[1], MAX_VALUE // value))
            result = value * operand
        if result > MAX_VALUE:  # a sum past the cap: subtract instead (value > MAX_VALUE - 20 > 1)
            op, operand = "-", rng.randint(_TERMS[0], min(_TERMS[1], value - 1))
            result = value - operand
        left = op != "-" and rng.random() < 0.3  # `b + (...)`, `b * (...)`: the operand on the left
        inner = f"({expression})" if outer == _SUM and (op == "*" or left) else expression
        if left:
            expression, step = f"{operand} {op} {inner}", f"{operand} {op} {value} = {result}."
        else:
            expression, step = f"{inner} {op} {operand}", f"{value} {op} {operand} = {result}."
        outer = _PRODUCT if op == "*" else _SUM
        steps.append(step)
        value = result
    return expression, " ".join(steps), value


def arithmetic_records(size: int, seed: int, template: str = DEFAULT_TEMPLATE) -> list[dict]:
    """`size` distinct arithmetic problems as records, in generation order.

    Ids are `arithmetic:<seed>:<index>` (index: the problem's generator, see the module docstring);
    `template` as in `data.template`.
    """

    def draw(index: int) -> Problem:  # repeats are told by the expression (phrasings differ)
        rng = random.Random(f"kvdistill-arithmetic:{seed}:{index}")
        expression, cot, value = arithmetic_problem(rng)
        return expression, rng.choice(_PHRASES).format(expression), cot, str(value)

    return distinct_records("arithmetic", size, seed, template, draw)
