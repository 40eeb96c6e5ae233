"""The trainer's data pipeline: collated micro-batches from a DataLoader (worker processes or none) train exactly
as the records did, resume exactly (the sample order is a function of the checkpointed step), and an objective
without `collate` still trains on the record lists."""

from __future__ import annotations

import pytest
import torch

from kvdistill.errors import ConfigError, KvdistillError
from kvdistill.train.loader import MicroBatches, micro_batch
from kvdistill.train.trainer import train

RESUMABLE = ["train.steps=4", "train.batch_size=2", "train.grad_accum=2", "train.warmup_steps=2",
             "train.save_every=2"]


def same_runs(a, b, files):
    ra, rb = files.metrics(a), files.metrics(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] and ra
    for x, y in zip(ra, rb, strict=True):
        for key in ("loss", "loss/ce", "loss/kv/qwen2", "loss/kv/gemma3", "grad_norm", "tokens", "lr"):
            assert x[key] == y[key], key
    assert files.max_diff(files.weights(a / "final"), files.weights(b / "final")) == 0.0


@pytest.fixture(scope="module")
def uninterrupted(tiny_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("loader") / "run"
    train(tiny_config(*RESUMABLE), out, progress=False)
    return out


def test_micro_batches_follow_micro_batch(tiny_config):
    cfg = tiny_config(*RESUMABLE)
    records = [{"id": str(i)} for i in range(10)]
    items = MicroBatches(records, cfg, rank=1, world=2, collate=lambda rs: [r["id"] for r in rs])
    assert len(items) == 8
    for step in range(4):
        for micro in range(2):
            assert items[2 * step + micro] == [r["id"] for r in micro_batch(records, cfg, step, micro, 1, 2)]


def test_worker_processes_give_the_same_run(tiny_config, uninterrupted, tmp_path, files):
    out = tmp_path / "workers"
    train(tiny_config(*RESUMABLE, "train.num_workers=2", "train.prefetch=3"), out, progress=False)
    same_runs(uninterrupted, out, files)


def test_a_resume_with_workers_matches_the_uninterrupted_run(tiny_config, uninterrupted, tmp_path, files):
    out = tmp_path / "resumed"
    cfg = tiny_config(*RESUMABLE, "train.num_workers=2")
    train(cfg, out, stop_after=2, progress=False)
    train(cfg, out, resume=True, progress=False)
    same_runs(uninterrupted, out, files)


class RecordsOnly(torch.nn.Module):
    """An objective without `collate` (its forward takes record lists), delegating the rest to a real one."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, records):
        assert isinstance(records, list) and isinstance(records[0], dict)
        return self.inner(records)

    def __getattr__(self, name):
        if name == "collate":
            raise AttributeError(name)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)


def test_an_objective_without_collate_trains_on_records(tiny_config, uninterrupted, tmp_path, files, monkeypatch):
    import kvdistill.objectives as objectives

    build = objectives.build_objective
    monkeypatch.setattr(objectives, "build_objective", lambda *a, **k: RecordsOnly(build(*a, **k)))
    out = tmp_path / "records"
    train(tiny_config(*RESUMABLE), out, progress=False)
    same_runs(uninterrupted, out, files)


def test_prefetch_without_workers_is_refused(tiny_config):
    with pytest.raises(ConfigError, match="train.prefetch"):
        tiny_config("train.prefetch=2")


def test_teachers_ahead_give_the_same_run(tiny_config, uninterrupted, tmp_path, files):
    """train.teachers_ahead (the teachers one micro-batch ahead on a worker thread) trains exactly as the step
    that runs them itself, and resumes exactly."""
    out = tmp_path / "ahead"
    cfg = tiny_config(*RESUMABLE, "train.teachers_ahead=true")
    train(cfg, out, stop_after=2, progress=False)
    train(cfg, out, resume=True, progress=False)
    same_runs(uninterrupted, out, files)


def test_teachers_ahead_without_a_teachers_pass_is_refused(tiny_config, tmp_path, monkeypatch):
    import kvdistill.objectives as objectives

    build = objectives.build_objective
    monkeypatch.setattr(objectives, "build_objective", lambda *a, **k: RecordsOnly(build(*a, **k)))
    with pytest.raises(KvdistillError, match="train.teachers_ahead"):
        train(tiny_config(*RESUMABLE, "train.teachers_ahead=true"), tmp_path / "no", progress=False)
