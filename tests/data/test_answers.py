"""Answer extraction and numeric-aware exact match on golden cases."""

from __future__ import annotations

import pytest

from kvdistill.data.answers import exact_match, extract_answer, normalize_number


@pytest.mark.parametrize(
    "generated,expected",
    [
        ("Answer: 42", "42"),
        ("Answer: $1,234.50 dollars", "1234.5"),
        ("answer: 7.0\nQuestion: next one 9", "7"),
        ("The answer is: 8 apples", "8"),
        ("Reasoning: 3 + 4 = 7.\nAnswer: 7", "7"),
        ("Reasoning: 12 * 3 = 36, plus 4 is 40.", "40"),
        ("so he owes -15 in total", "-15"),
        ("#### 1,000", "1000"),
        (r"hence \boxed{12.50}", "12.5"),
        ("Answer: 30%", "30"),
        ("Answer: Paris.", "Paris"),
        ("1, 2, 3", "3"),
        ("10-4=6", "6"),
        ("Answer:", None),
        ("no number here", None),
        ("   ", None),
        ("", None),
        (None, None),
    ],
)
def test_extract_answer(generated, expected):
    assert extract_answer(generated) == expected


@pytest.mark.parametrize(
    "text,expected",
    [
        ("1,200", "1200"),
        ("$3.00", "3"),
        (" 42.0 ", "42"),
        ("-0.50", "-0.5"),
        ("100", "100"),
        ("1e3", "1000"),
        ("7.", "7"),
        ("abc", None),
        ("nan", None),
    ],
)
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


@pytest.mark.parametrize(
    "pred,gold,same",
    [
        ("1000", "1,000", True),
        ("42.0", "42", True),
        ("$42", "42", True),
        (42, "42", True),
        ("0.5", ".50", True),
        ("Paris", "paris.", True),
        ("new  york", "New York", True),
        ("42", "43", False),
        ("4.2", "42", False),
        ("-5", "5", False),
        (None, "1", False),
        ("", "", False),
        ("1", None, False),
    ],
)
def test_exact_match(pred, gold, same):
    assert exact_match(pred, gold) is same
