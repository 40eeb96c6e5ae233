"""The cache budget: the records a run reads are exactly the ones its steps draw plus its held-out
evaluations, and the extraction's cost is split over its readers as the module states."""

from __future__ import annotations

import pytest

from kvdistill.config import load_config
from kvdistill.data import load_records
from kvdistill.experiments.budget import amortise, records_read
from kvdistill.train.loader import micro_batch

STUDENT = {
    "from_config": {
        "base": "smollm2-135m",
        "num_hidden_layers": 1,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "max_position_embeddings": 96,
    },
    "tokenizer": "gpt2-tokenizer",
}


def config(steps: int, batch: int, seed: int, **data):
    raw = {
        "student": STUDENT,
        "data": {
            "source": "arithmetic",
            "size": 120,
            "eval_size": 6,
            "val_size": 5,
            "max_length": 64,
            **data,
        },
        "train": {"steps": steps, "batch_size": batch, "seed": seed},
    }
    return load_config(raw=raw)


@pytest.mark.parametrize("steps,batch,seed", [(3, 4, 0), (7, 5, 2), (40, 8, 1)])
def test_records_read_are_the_steps_batches_and_the_validation_split(steps, batch, seed):
    cfg = config(steps, batch, seed)
    train = load_records(cfg.data, split="train")
    drawn = {
        r["id"] for s in range(steps) for r in micro_batch(train, cfg, s, 0, 0, 1)
    }  # what training reads
    val = {r["id"] for r in load_records(cfg.data, split="val")}
    assert records_read(cfg) == drawn | val
    if steps * batch >= 2 * len(train):  # more than an epoch: every train record
        assert drawn == {r["id"] for r in train}
    test = {r["id"] for r in load_records(cfg.data, split="eval")}
    assert not records_read(cfg) & test  # the test split is never asked of a teacher during training


def test_records_read_follow_train_size_and_without_validation_the_eval_split():
    small = config(2, 4, 0, train_size=10, val_size=0)
    train = load_records(small.data, split="train")
    assert len(train) == 10
    ids = records_read(small)
    assert ids - {r["id"] for r in load_records(small.data, split="eval")} <= {r["id"] for r in train}
    assert {r["id"] for r in load_records(small.data, split="eval")} <= ids


def test_amortise_splits_the_cost_over_the_readers():
    out = amortise(
        {
            "a": {"seconds": 12.0, "tokens": 1000, "records": 50},
            "b": {"seconds": 3.0, "tokens": 10, "records": 5},
        },
        {"a": ["kd/seed-0", "kd/seed-1", "kd2/seed-0"], "b": ["kd/seed-0"]},
        {"a": 7, "b": 100},
    )
    assert out["a"]["flops"] == 2 * 7 * 1000 and out["a"]["readers"] == 3
    assert out["a"]["seconds_per_reader"] == pytest.approx(4.0)
    assert out["a"]["flops_per_reader"] == pytest.approx(14000 / 3)
    assert out["b"]["flops_per_reader"] == 2000 and out["b"]["runs"] == ["kd/seed-0"]
    # the charges add up to the whole cost
    assert out["a"]["flops_per_reader"] * 3 == pytest.approx(out["a"]["flops"])
