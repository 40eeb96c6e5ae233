"""The skill mixture (`data.source: skills`): proportions, labels, each record the generator's own problem (so
its answer is exact), prefix-stable, and a specialist's train split (`data.train_skills`) holds only its skill
while the held-out split stays the whole mixture's."""

from __future__ import annotations

from collections import Counter

import pytest
from pydantic import ValidationError

from kvdistill.config import DataConfig
from kvdistill.data import load_records
from kvdistill.data.arith import arithmetic_records
from kvdistill.data.gsm import gsm_symbolic_records
from kvdistill.data.skills import skill_records
from kvdistill.data.sorting import sorting_records
from kvdistill.errors import KvdistillError

GENERATORS = {
    "arithmetic": arithmetic_records,
    "gsm_symbolic": gsm_symbolic_records,
    "sorting": sorting_records,
}


def test_proportions_and_labels():
    records = skill_records(["arithmetic", "sorting"], 4000, seed=0, mix=[1, 3])
    counts = Counter(r["skill"] for r in records)
    assert counts["arithmetic"] + counts["sorting"] == 4000
    assert abs(counts["sorting"] / 4000 - 0.75) < 0.03  # binomial std 0.007
    assert all(r["id"].startswith(r["skill"] + ":") for r in records)
    assert len({r["id"] for r in records}) == 4000


def test_each_record_is_its_generators_problem_in_order():
    skills = ["arithmetic", "gsm_symbolic", "sorting"]
    records = skill_records(skills, 120, seed=5)
    counts = Counter(r["skill"] for r in records)
    assert set(counts) == set(skills)
    for skill in skills:
        mine = [{k: v for k, v in r.items() if k != "skill"} for r in records if r["skill"] == skill]
        assert mine == GENERATORS[skill](
            counts[skill], 5
        )  # the generators' answers are exact (their own tests)


def test_prefix_stable_so_the_held_out_split_does_not_depend_on_size():
    small = skill_records(["arithmetic", "sorting"], 50, seed=2)
    assert skill_records(["arithmetic", "sorting"], 200, seed=2)[:50] == small


def test_specialist_train_split_holds_only_its_skill():
    base = {"source": "skills", "skills": ["arithmetic", "sorting"], "size": 300, "eval_size": 30}
    everything = load_records(DataConfig(**base))
    special = DataConfig(**base, train_skills=["sorting"])
    train, held = load_records(special), load_records(special, "eval")
    assert train == [r for r in everything if r["skill"] == "sorting"]
    assert {r["skill"] for r in train} == {"sorting"}
    assert held == load_records(DataConfig(**base), "eval")  # the same held-out set as the student's
    assert {r["skill"] for r in held} == {"arithmetic", "sorting"}
    assert not {r["question"] for r in train} & {r["question"] for r in held}


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"source": "skills"}, "needs distinct skills"),
        ({"source": "skills", "skills": ["sorting", "sorting"]}, "needs distinct skills"),
        ({"source": "skills", "skills": ["sorting"], "mix": [1, 2]}, "one positive proportion per skill"),
        ({"source": "skills", "skills": ["sorting"], "mix": [0]}, "one positive proportion per skill"),
        (
            {"source": "skills", "skills": ["sorting"], "train_skills": ["arithmetic"]},
            "must be some of data.skills",
        ),
        ({"source": "arithmetic", "skills": ["sorting"]}, "apply only to data.source 'skills'"),
        ({"source": "skills", "skills": ["chess"]}, "skills"),
    ],
)
def test_bad_config_is_refused_with_the_key(data, problem):
    with pytest.raises(ValidationError, match=problem):
        DataConfig(**data)


def test_bad_direct_call():
    with pytest.raises(KvdistillError, match="one positive proportion"):
        skill_records(["arithmetic"], 10, seed=0, mix=[1, 1])
    with pytest.raises(KvdistillError, match="distinct names"):
        skill_records(["arithmetic", "chess"], 10, seed=0)
