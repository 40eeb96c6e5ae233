"""Per-skill figures of a held-out set that mixes skills (`data.source: skills`): exact match per skill.

Notation: N held-out records (those exact match scored), each with a 0/1 result and a skill label.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvdistill.errors import KvdistillError

__all__ = ["exact_match_by_skill", "skill_items"]


def skill_items(per_item: Sequence[float], skills: Sequence[str | None], skill: str) -> list[float]:
    """The results (N,) of the records labelled `skill`, in order."""
    if len(per_item) != len(skills):
        raise KvdistillError(
            f"{len(per_item)} results but {len(skills)} skill labels",
            "pass one skill per scored record (records without an answer are not scored)",
        )
    return [float(x) for x, s in zip(per_item, skills, strict=True) if s == skill]


def exact_match_by_skill(per_item: Sequence[float], skills: Sequence[str | None]) -> dict[str, float]:
    """{"exact_match_<skill>": mean of that skill's results} for every skill label that occurs (None:
    unlabelled, skipped), in sorted order."""
    out = {}
    for skill in sorted({s for s in skills if s is not None}):
        values = skill_items(per_item, skills, skill)
        out[f"exact_match_{skill}"] = sum(values) / len(values)
    return out
