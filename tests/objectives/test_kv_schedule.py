"""losses.kv.schedule: the K/V weight at given steps, and the objective applying it (logged as kv/weight, the
loss equal to CE + w(step)·KV)."""

from __future__ import annotations

import math

import pytest

from kvdistill.config.losses import KVLossConfig
from kvdistill.errors import ConfigError


def kv(**schedule) -> KVLossConfig:
    return KVLossConfig.model_validate({"weight": 2.0, "schedule": schedule})


def test_weights_at_given_steps():
    total = 11  # steps 0..10: x = s / 10
    const = kv()
    assert [const.weight_at(s, total) for s in (0, 5, 10)] == [2.0, 2.0, 2.0]
    lin = kv(kind="linear", end=0.0)
    assert [lin.weight_at(s, total) for s in (0, 1, 5, 10, 50)] == pytest.approx([2.0, 1.8, 1.0, 0.0, 0.0])
    cos = kv(kind="cosine", end=0.5)
    assert cos.weight_at(0, total) == pytest.approx(2.0) and cos.weight_at(10, total) == pytest.approx(0.5)
    assert cos.weight_at(5, total) == pytest.approx(1.25)  # half way: the mean
    assert cos.weight_at(2, total) == pytest.approx(0.5 + 1.5 * (1 + math.cos(math.pi * 0.2)) / 2)
    late = kv(kind="linear", end=0.0, start=6)  # constant until step 6, then down to 0 at step 10
    assert [late.weight_at(s, total) for s in (0, 5, 6, 8, 10)] == pytest.approx([2.0, 2.0, 2.0, 1.0, 0.0])
    up = kv(kind="linear", end=4.0)  # a schedule may rise too
    assert up.weight_at(5, total) == pytest.approx(3.0)


def test_schedule_fields_are_checked(tiny_config):
    with pytest.raises(ConfigError, match="kind linear needs end"):
        tiny_config("losses.kv.schedule.kind=linear")
    with pytest.raises(ConfigError, match="read by kind linear / cosine only"):
        tiny_config("losses.kv.schedule.end=0.5")


def test_objective_applies_the_weight_of_the_step(tiny_config):
    import torch

    from kvdistill.objectives import build_objective

    cfg = tiny_config(
        "losses.kv.schedule.kind=linear", "losses.kv.schedule.end=0.0", "train.steps=5", "data.size=8"
    )
    objective = build_objective(cfg, device="cpu")
    from kvdistill.data import load_records

    batch = load_records(cfg.data, split="train")[:3]
    seen = []
    for step in (0, 2, 4):
        objective.train_step = step
        torch.manual_seed(0)
        loss, metrics = objective(batch)
        w = cfg.losses.kv.weight_at(step, 5)
        seen.append(metrics["kv/weight"])
        kv_sum = sum(v for k, v in metrics.items() if k.startswith("loss/kv/")) / len(cfg.teachers)
        # fixed fusion weights 1/N: loss = CE + w · mean over teachers of their K/V error
        assert float(loss.detach()) == pytest.approx(metrics["loss/ce"] + w * kv_sum, rel=1e-4)
        assert float(objective.last_terms["kd"].detach()) == pytest.approx(w * kv_sum, rel=1e-4, abs=1e-6)
    assert seen == pytest.approx([1.0, 0.5, 0.0])
