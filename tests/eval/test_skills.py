"""Exact match per skill against a hand-made example."""

from __future__ import annotations

import pytest

from kvdistill.errors import KvdistillError
from kvdistill.eval.skills import exact_match_by_skill, skill_items


def test_hand_made_example():
    per_item = [1, 0, 1, 1, 0, 1, 0]  # the last record has no skill label: in no skill
    skills = ["arithmetic", "arithmetic", "sorting", "gsm_symbolic", "sorting", "arithmetic", None]
    assert exact_match_by_skill(per_item, skills) == pytest.approx(
        {"exact_match_arithmetic": 2 / 3, "exact_match_gsm_symbolic": 1.0, "exact_match_sorting": 0.5}
    )
    assert skill_items(per_item, skills, "sorting") == [1.0, 0.0]


def test_lengths_must_match():
    with pytest.raises(KvdistillError, match="3 results but 2 skill labels"):
        exact_match_by_skill([1, 0, 1], ["a", "b"])
