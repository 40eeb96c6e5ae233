"""Routing accuracy against a hand-made example with known numbers, per-token weights pooled per sample first,
and bad input refused."""

from __future__ import annotations

import pytest
import torch

from kvdistill.errors import KvdistillError
from kvdistill.fuse.routing_accuracy import routing_accuracy
from kvdistill.objectives.fusion import per_sample


def test_hand_made_example():
    weights = torch.tensor(
        [
            [0.7, 0.2, 0.1],  # arithmetic -> teacher 0: 0.7
            [0.1, 0.8, 0.1],  # gsm -> teacher 1: 0.8
            [0.2, 0.2, 0.6],  # sorting -> teacher 2: 0.6
            [0.5, 0.25, 0.25],  # arithmetic: 0.5
            [0.3, 0.3, 0.4],
        ]
    )  # unlabelled: not counted
    skills = ["arithmetic", "gsm", "sorting", "arithmetic", None]
    got = routing_accuracy(weights, skills, {"arithmetic": 0, "gsm": 1, "sorting": 2})
    assert got == pytest.approx(
        {
            "routing_acc": (0.7 + 0.8 + 0.6 + 0.5) / 4,
            "routing_acc_arithmetic": 0.6,
            "routing_acc_gsm": 0.8,
            "routing_acc_sorting": 0.6,
        }
    )


def test_uniform_weights_give_one_over_k_and_a_skill_without_specialist_is_skipped():
    weights = torch.full((4, 4), 0.25)
    got = routing_accuracy(weights, ["a", "b", "a", "c"], {"a": 3, "b": 0})
    assert got == pytest.approx({"routing_acc": 0.25, "routing_acc_a": 0.25, "routing_acc_b": 0.25})
    assert routing_accuracy(weights, ["c"] * 4, {"a": 0}) == {}


def test_per_token_weights_are_the_mean_over_counted_tokens():
    token_w = torch.tensor(
        [
            [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]],  # 2 counted tokens: (0.5, 0.5)
            [[0.0, 1.0], [0.2, 0.8], [0.4, 0.6], [0.5, 0.5]],
        ]
    )  # 3 counted: (0.2, 0.8)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    got = routing_accuracy(per_sample(token_w, mask), ["x", "y"], {"x": 0, "y": 1})
    assert got == pytest.approx({"routing_acc": 0.65, "routing_acc_x": 0.5, "routing_acc_y": 0.8})


def test_bad_input():
    with pytest.raises(KvdistillError, match="must be \\(N, K\\)"):
        routing_accuracy(torch.ones(2, 3, 2), ["a", "b"], {"a": 0})
    with pytest.raises(KvdistillError, match="must be \\(N, K\\)"):
        routing_accuracy(torch.ones(3, 2) / 2, ["a", "b"], {"a": 0})
    with pytest.raises(KvdistillError, match="teacher indices"):
        routing_accuracy(torch.ones(2, 2) / 2, ["a", "b"], {"a": 2})
