"""Final answers out of generated text, and exact match that treats numbers as numbers.

`extract_answer` looks for an explicit final-answer marker (`Answer:`, GSM8K's `####`, LaTeX `\\boxed{}`);
after it, the first number if there is one, else the rest of that line. Without a marker it takes the last
number in the text.
Numbers are normalised: `$1,234.50` -> `1234.5`, `42.0` -> `42`, `30%` -> `30`.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# A number: optional sign, optional $, digits with thousands commas (1,234) or plain, optional decimals.
_NUMBER = re.compile(r"(?<![\w.])(-?)(?:\$\s?)?(-?)((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?![\d])")
_MARKER = re.compile(r"answer\s*(?:is)?\s*:|####", re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def normalize_number(text: str) -> str | None:
    """Canonical form of a number written in `text` ("$1,200.00" -> "1200", "-0.50" -> "-0.5"), else None."""
    s = text.strip().rstrip(".").strip().replace("$", "").replace(",", "").replace(" ", "").removesuffix("%")
    try:
        value = Decimal(s)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def normalize_answer(text: str) -> str:
    """A number in canonical form; other text with whitespace collapsed and a trailing full stop dropped."""
    number = normalize_number(text)
    if number is not None:
        return number
    return " ".join(text.split()).rstrip(".").strip()


def _numbers(text: str) -> list[str]:
    out = []
    for m in _NUMBER.finditer(text):
        sign = "-" if (m.group(1) or m.group(2)) else ""
        out.append(normalize_number(sign + m.group(3)))
    return [n for n in out if n is not None]


def extract_answer(generated: str | None) -> str | None:
    """The final answer in `generated`, normalised; None when there is none."""
    if not generated or not generated.strip():
        return None
    boxed = _BOXED.findall(generated)
    if boxed:
        return normalize_answer(boxed[-1]) or None
    marker = _MARKER.search(generated)
    if marker:
        tail = generated[marker.end() :].strip()
        line = tail.split("\n", 1)[0].strip() if tail else ""
        numbers = _numbers(line)
        if numbers:
            return numbers[0]
        return normalize_answer(line) or None
    numbers = _numbers(generated)
    return numbers[-1] if numbers else None


def exact_match(pred: str | float | None, gold: str | float | None) -> bool:
    """Whether `pred` and `gold` are the same answer: equal as numbers when both are numbers
    ("1,000" == "1000.0" == "$1000"), else equal after whitespace/case normalisation."""
    if pred is None or gold is None:
        return False
    p, g = normalize_answer(str(pred)), normalize_answer(str(gold))
    if not p or not g:
        return False
    p_num, g_num = normalize_number(p), normalize_number(g)
    if p_num is not None and g_num is not None:
        return Decimal(p_num) == Decimal(g_num)
    return p.casefold() == g.casefold()
