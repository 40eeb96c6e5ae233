"""objectives.ahead: the teachers' pass run one batch ahead on a worker thread gives the very losses and
gradients of the step that runs its teachers itself, keeps the batch order, starts the next batch's pass
before this one's step, and surfaces a failed pass at its own batch."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import pytest
import torch

from kvdistill.data import load_records
from kvdistill.objectives import build_objective
from kvdistill.objectives.ahead import TeachersAhead, tensors_of


def loss_and_grads(objective, batch):
    objective.zero_grad(set_to_none=True)
    loss, metrics = objective(batch)
    loss.backward()
    return (
        loss.detach(),
        metrics,
        {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None},
    )


@pytest.mark.parametrize(
    "variant",
    [
        [],
        [
            "teachers.1.compression.kind=rkv",
            "teachers.1.compression.budget=8",
            "fusion.kind=router",
            "losses.cosine=0.5",
        ],
    ],
)
def test_ahead_equals_the_inline_step(tiny_config, variant):
    """Three batches through `TeachersAhead` == the same batches with the teachers run inside the step: loss,
    metrics and every gradient bit for bit; the passes ran on the worker thread, batch n+1's submitted before
    batch n's step."""
    cfg = tiny_config(*variant)
    objective = build_objective(cfg)
    records = load_records(cfg.data)[:6]
    batches = [objective.collate(records[i : i + 2]) for i in range(0, 6, 2)]
    inline = [loss_and_grads(objective, b) for b in batches]

    events: list[tuple[str, int, str]] = []  # (what, batch, thread)
    pass_of = objective.teacher_pass

    def spy(collated, **kw):
        n = next(n for n, b in enumerate(batches) if b.records is collated.records)
        events.append(("pass", n, threading.current_thread().name))
        return pass_of(collated, **kw)

    objective.teacher_pass = spy
    ahead = TeachersAhead(objective, iter(batches), device="cpu")
    got = []
    for n, batch in enumerate(ahead):
        assert batch.records is batches[n].records and batch.ahead is not None
        if n + 1 < len(batches):  # the next batch's pass is submitted before this batch's step
            assert ahead.next is not None and ahead.next[0].records is batches[n + 1].records
        got.append(loss_and_grads(objective, batch))
    ahead.close()
    assert [e[:2] for e in events] == [("pass", 0), ("pass", 1), ("pass", 2)]
    assert all(name.startswith("kvdistill-teachers") for _, _, name in events)
    for a, b in zip(inline, got, strict=True):
        assert torch.equal(a[0], b[0]) and a[1] == b[1]
        assert a[2].keys() == b[2].keys() and len(a[2]) > 5
        for name in a[2]:
            assert torch.equal(a[2][name], b[2][name]), name


def test_a_failed_pass_surfaces_at_its_batch(tiny_config):
    objective = build_objective(tiny_config())
    records = load_records(objective.cfg.data)[:4]
    batches = [objective.collate(records[:2]), objective.collate(records[2:])]
    pass_of = objective.teacher_pass

    def failing(collated, **kw):
        if collated.records is batches[1].records:
            raise RuntimeError("teacher exploded")
        return pass_of(collated, **kw)

    objective.teacher_pass = failing
    ahead = TeachersAhead(objective, iter(batches), device="cpu")
    first = next(ahead)
    objective(first)  # batch 0 is fine
    second = next(ahead)
    with pytest.raises(RuntimeError, match="teacher exploded"):
        objective(second)
    ahead.close()
    with pytest.raises(StopIteration):
        next(ahead)


@dataclass
class Box:
    a: torch.Tensor
    more: dict


def test_tensors_of_walks_dataclasses_dicts_and_lists_once():
    x, y, z = torch.zeros(1), torch.ones(2), torch.ones(3)
    found = list(tensors_of([Box(x, {"k": [y, (z, x)], "n": None}), {"again": y}, 3]))
    assert sorted(t.numel() for t in found) == [1, 2, 3]
