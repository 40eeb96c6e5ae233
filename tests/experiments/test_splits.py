"""Teachers on their own (larger) data and conditions with other student data sizes keep one test split and
one validation split; no training set shares a record with them; wall-time matching converts measured seconds
into steps as documented."""

from __future__ import annotations

import pytest

from kvdistill.data import load_records
from kvdistill.errors import ConfigError, KvdistillError
from kvdistill.experiments.conditions import check_splits, condition_config, teacher_config
from kvdistill.experiments.matching import wall_steps
from kvdistill.experiments.spec import load_spec

TINY = {
    "num_hidden_layers": 1,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 96,
}


def spec(**changes) -> dict:
    out = {
        "name": "splits",
        "base": {
            "student": {
                "from_config": {"base": "smollm2-135m", **TINY, "head_dim": 16},
                "tokenizer": "gpt2-tokenizer",
            },
            "data": {
                "source": "arithmetic",
                "size": 300,
                "eval_size": 20,
                "val_size": 10,
                "train_size": 30,
                "max_length": 64,
            },
        },
        "teachers": [
            {
                "name": "big",
                "from_config": {"base": "smollm2-135m", **TINY, "head_dim": 16},
                "data": {"train_size": None},
            }
        ],
        "conditions": {
            "ce_only": {},
            "kd": {"teachers": ["big"]},
            "ce_small": {"overrides": ["data.train_size=12"]},
            "ce_wall": {"match_wall_of": "kd"},
        },
        "baseline": "ce_only",
        "seeds": [0, 1],
    }
    out.update(changes)
    return out


def plan(s):
    teachers = {t.name: {"model": "?", "params": 0} for t in s.teachers}
    configs = {f"teacher {p.name}": teacher_config(s, p) for p in s.teachers}
    configs.update(
        {f"{n}/seed-{seed}": condition_config(s, n, seed, teachers) for n in s.conditions for seed in s.seeds}
    )
    return configs


def test_teachers_see_more_data_and_every_run_keeps_one_test_and_validation_split():
    s = load_spec(spec())
    configs = plan(s)
    base = configs["ce_only/seed-0"].data
    test, val = load_records(base, split="eval"), load_records(base, split="val")
    sizes = check_splits(configs, test, val)
    assert sizes["teacher big"] > 200 and sizes["ce_only/seed-0"] == 30 and sizes["ce_small/seed-1"] == 12
    held = {r["id"] for r in test} | {r["id"] for r in val}
    assert not {r["id"] for r in test} & {r["id"] for r in val}  # validation disjoint from test
    for name, cfg in configs.items():
        assert [r["id"] for r in load_records(cfg.data, split="eval")] == [r["id"] for r in test], name
        assert [r["id"] for r in load_records(cfg.data, split="val")] == [r["id"] for r in val], name
        train = {r["id"] for r in load_records(cfg.data, split="train")}
        assert not train & held, name
    # the student's 30 problems are the first 30 of the teacher's pool: the teacher knows them and far more
    teacher_train = [r["id"] for r in load_records(configs["teacher big"].data, split="train")]
    assert [r["id"] for r in load_records(base, split="train")] == teacher_train[:30]


@pytest.mark.parametrize(
    "data,why",
    [
        ({"eval_size": 10}, "other test records"),
        ({"seed": 3}, "other test records"),
        ({"val_size": 0}, "other validation records"),
    ],
)
def test_a_teacher_whose_data_moves_the_held_out_splits_is_refused(data, why):
    bad = spec()
    bad["teachers"][0]["data"] = data
    s = load_spec(bad)
    configs = plan(s)
    base = configs["ce_only/seed-0"].data
    with pytest.raises(KvdistillError, match=f"teacher big: its data gives {why}"):
        check_splits(configs, load_records(base, split="eval"), load_records(base, split="val"))


def test_a_condition_moving_the_test_split_is_refused():
    bad = spec()
    bad["conditions"]["ce_small"] = {"overrides": ["data.eval_size=5", "data.val_size=0"]}
    s = load_spec(bad)
    configs = plan(s)
    base = configs["ce_only/seed-0"].data
    with pytest.raises(KvdistillError, match="ce_small/seed-0: its data gives other test records"):
        check_splits(configs, load_records(base, split="eval"), load_records(base, split="val"))


def test_a_teacher_trained_on_the_test_questions_is_refused(tmp_path):
    """A teacher on other data (a file) holding the base's test problems: both its moved splits and the shared
    questions are named."""
    import json

    s0 = load_spec(spec())
    base = plan(s0)["ce_only/seed-0"].data
    pool = load_records(base.model_copy(update={"train_size": None}), split="train")[:40]
    rows = [
        {"question": r["question"], "cot": r["cot"], "answer": r["answer"]}
        for r in load_records(base, split="eval") + pool
    ]
    path = tmp_path / "teacher.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bad = spec()
    bad["teachers"][0]["data"] = {"source": "jsonl", "path": str(path), "eval_size": 2, "val_size": 0}
    s = load_spec(bad)
    configs = plan(s)
    with pytest.raises(KvdistillError, match="teacher big: .* training records share an id or a question"):
        check_splits(configs, load_records(base, split="eval"), load_records(base, split="val"))


def test_wall_steps_from_the_measured_times():
    s = load_spec(spec())
    measured = {
        "kd": [
            {"train_s": 30.0, "steps_trained": 100},
            {"train_s": 50.0, "steps_trained": 100},
            {"train_s": 40.0, "steps_trained": 90, "amortised_s": 5.0},
        ],
        "ce_only": [
            {"train_s": 10.0, "steps_trained": 100},
            {"train_s": 12.0, "steps_trained": 100},
            {"train_s": 9.0, "steps_trained": 60},
        ],
    }
    # median of (30, 50, 45) = 45 s; median of (0.1, 0.12, 0.15) = 0.12 s per step -> 375 steps
    assert wall_steps(s, "ce_wall", measured) == 375


def test_wall_matching_is_checked():
    bad = spec()
    bad["conditions"]["ce_wall"] = {"match_wall_of": "nope", "match_flops_of": "kd"}
    bad["conditions"]["kd_wall"] = {
        "teachers": ["big"],
        "match_wall_of": "kd",
    }  # its rate: ce_only, no teacher
    bad["conditions"]["x"] = {"wall_rate_of": "kd"}
    with pytest.raises(ConfigError) as info:
        load_spec(bad)
    text = str(info.value)
    for expected in (
        "conditions.ce_wall: give match_flops_of or match_wall_of, not both",
        "conditions.ce_wall.match_wall_of: 'nope' is not a condition",
        "conditions.kd_wall.wall_rate_of: 'ce_only' must train this condition's student the same way",
        "conditions.x.wall_rate_of is read with match_wall_of only",
    ):
        assert expected in text, expected
