"""Confidence weights: a teacher's NLL per byte of the scored text and the softmax over teachers, against a
hand-made example with known numbers; truncated teachers, the temperature and bad shapes."""

from __future__ import annotations

import math

import pytest
import torch

from kvdistill.errors import KvdistillError
from kvdistill.fuse import byte_nll, confidence_weights, covered_end
from kvdistill.fuse.routing_accuracy import routing_accuracy


def test_two_teachers_known_nll_give_known_weights():
    """Text 'Q: ab|cdefg' (10 bytes), the continuation from byte 5. Teacher A: BOS, 'Q: ab' (0-5), 'cde'
    (5-8), 'fg' (8-10); its scored tokens are 'cde' (NLL 1.5) and 'fg' (0.5): 2.0 / 5 bytes. Teacher B: 'Q: '
    (0-3), 'abc' (3-6) straddles the start and is not scored, 'defg' (6-10) NLL 2.4 over 4 bytes."""
    nll_a = torch.tensor([[9.0, 1.5, 0.5, 0.0]])  # nll[:, t] is token t + 1's
    counted_a = torch.tensor([[True, True, True, False]])
    spans_a = torch.tensor([[[0, 0], [0, 5], [5, 8], [8, 10]]])
    nll_b = torch.tensor([[7.0, 2.4, 0.0]])
    counted_b = torch.tensor([[True, True, False]])
    spans_b = torch.tensor([[[0, 3], [3, 6], [6, 10]]])
    start = torch.tensor([5])
    a = byte_nll(nll_a, counted_a, spans_a, start)
    b = byte_nll(nll_b, counted_b, spans_b, start)
    torch.testing.assert_close(a, torch.tensor([0.4]))
    torch.testing.assert_close(b, torch.tensor([0.6]))
    w = confidence_weights(torch.stack([a, b], -1), temperature=0.1)  # softmax(-4, -6)
    expected = torch.tensor([[1 / (1 + math.exp(-2)), math.exp(-2) / (1 + math.exp(-2))]])
    torch.testing.assert_close(w, expected)
    assert float(w[0, 0]) == pytest.approx(0.8808, abs=1e-4)
    # the whole text from byte 0: A scores 'Q: ab', 'cde', 'fg' (BOS has no bytes): (9 + 1.5 + 0.5) / 10
    torch.testing.assert_close(byte_nll(nll_a, counted_a, spans_a, torch.tensor([0])), torch.tensor([1.1]))
    # B's first token is never predicted: (2.4 + 7.0 for 'abc') / 7 bytes
    torch.testing.assert_close(
        byte_nll(nll_b, counted_b, spans_b, torch.tensor([0])), torch.tensor([9.4 / 7])
    )
    # A truncated after byte 8 (its covered end): both are scored on bytes 5-8 only; B has no token inside,
    # NaN
    assert covered_end(spans_a[:, :3], torch.ones(1, 3)).tolist() == [8]
    end = torch.tensor([8])
    torch.testing.assert_close(byte_nll(nll_a, counted_a, spans_a, start, end), torch.tensor([0.5]))
    assert torch.isnan(byte_nll(nll_b, counted_b, spans_b, start, end)).all()


def test_padding_and_uncounted_positions_are_not_scored():
    nll = torch.tensor([[1.0, 2.0, 50.0, 50.0]])
    counted = torch.tensor([[True, False, False, False]])  # token 2 is padding (not predicted)
    spans = torch.tensor([[[0, 2], [2, 4], [0, 0], [0, 0]]])
    torch.testing.assert_close(byte_nll(nll, counted, spans, torch.tensor([0])), torch.tensor([0.5]))


def test_a_teacher_that_scored_nothing_gets_weight_zero_and_none_scored_is_uniform():
    x = torch.tensor([[0.3, float("nan"), 0.5], [float("nan")] * 3])
    w = confidence_weights(x, temperature=0.2)
    e = math.exp(-1.0)
    torch.testing.assert_close(w[0], torch.tensor([1 / (1 + e), 0.0, e / (1 + e)]))
    torch.testing.assert_close(w[1], torch.full((3,), 1 / 3))
    assert torch.isnan(
        byte_nll(
            torch.ones(1, 3),
            torch.ones(1, 3, dtype=torch.bool),
            torch.tensor([[[0, 1], [1, 2], [2, 3]]]),
            torch.tensor([3]),
        )
    )[0]


def test_temperature_sharpens_and_weights_route_by_skill():
    """Three specialists, each with the lowest NLL per byte on its own skill: the routing accuracy rises
    toward 1 as τ falls, and is 1/3 at a very high τ."""
    nll = torch.tensor([[0.2, 1.0, 1.2], [1.1, 0.3, 0.9], [1.4, 1.2, 0.25], [0.4, 0.7, 0.8]])  # (B, N)
    skills = ["a", "b", "c", "a"]
    of = {"a": 0, "b": 1, "c": 2}
    accs = [
        routing_accuracy(confidence_weights(nll, t), skills, of)["routing_acc"]
        for t in (100.0, 1.0, 0.1, 0.01)
    ]
    assert accs == sorted(accs) and accs[0] == pytest.approx(1 / 3, abs=0.01) and accs[-1] > 0.99
    # hand-computed for τ = 0.1, the first sample: softmax(-2, -10, -12)
    z = math.exp(-2) + math.exp(-10) + math.exp(-12)
    assert float(confidence_weights(nll, 0.1)[0, 0]) == pytest.approx(math.exp(-2) / z)


def test_bad_input_is_refused():
    with pytest.raises(KvdistillError, match="temperature"):
        confidence_weights(torch.zeros(2, 2), 0.0)
    with pytest.raises(KvdistillError, match=r"must be \(B, N\)"):
        confidence_weights(torch.zeros(2), 1.0)
    with pytest.raises(KvdistillError, match="do not fit"):
        byte_nll(torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool), torch.zeros(1, 4, 2), torch.zeros(1))
