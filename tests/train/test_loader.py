"""The trainer's data pipeline: collated micro-batches from a DataLoader (worker processes or none) train
exactly as the records did, resume exactly (the sample order is a function of the checkpointed step), for the
text and the latent objective alike (one step path)."""

from __future__ import annotations

import dataclasses

import pytest

from kvdistill.errors import ConfigError, KvdistillError
from kvdistill.train.loader import MicroBatches, micro_batch
from kvdistill.train.trainer import train

RESUMABLE = [
    "train.steps=4",
    "train.batch_size=2",
    "train.grad_accum=2",
    "train.warmup_steps=2",
    "train.save_every=2",
]


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


@dataclasses.dataclass
class Ids:
    """A batch as a collator makes one: its records, the step it was collated for, the teachers' pass
    ahead."""

    records: list[str]
    step: int | None = None
    ahead: object = None


def test_micro_batches_follow_micro_batch(tiny_config):
    cfg = tiny_config(*RESUMABLE)
    records = [{"id": str(i)} for i in range(10)]
    items = MicroBatches(records, cfg, rank=1, world=2, collate=lambda rs: Ids([r["id"] for r in rs]))
    assert len(items) == 8
    for step in range(4):
        for micro in range(2):
            want = [r["id"] for r in micro_batch(records, cfg, step, micro, 1, 2)]
            assert items[2 * step + micro] == Ids(want, step=step)


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


LATENT = {
    "name": "latent",
    "data": {"source": "arithmetic", "size": 24, "eval_size": 4, "max_length": 96},
    "student": {
        "from_config": {
            "base": "smollm2-135m",
            "num_hidden_layers": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 32,
            "max_position_embeddings": 256,
        },
        "tokenizer": "gpt2-tokenizer",
        "latent": {"tokens": 4, "iterations": 1},
    },
    "teachers": [
        {
            "name": "qwen_sp",
            "tokenizer": "llama2-tokenizer",
            "from_config": {
                "family": "qwen2",
                "num_hidden_layers": 2,
                "hidden_size": 48,
                "intermediate_size": 96,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "max_position_embeddings": 256,
            },
        }
    ],
    "losses": {"ce": 1.0, "cot_ce": 1.0, "latent_kv": {"weight": 1.0}},
    "train": {"steps": 2, "batch_size": 2, "grad_accum": 2, "tensorboard": False},
}


def test_a_latent_student_takes_the_same_step_path(tmp_path, files):
    """The latent objective's batches collated on a worker process and its teachers' targets computed one
    micro-batch ahead on a thread train exactly as both done in the step."""
    from kvdistill.config import load_config

    inline, piped = tmp_path / "inline", tmp_path / "piped"
    train(load_config(raw=LATENT), inline, progress=False)
    train(
        load_config(raw=LATENT, overrides=["train.num_workers=1", "train.teachers_ahead=true"]),
        piped,
        progress=False,
    )
    ra, rb = files.metrics(inline), files.metrics(piped)
    assert [r["step"] for r in ra] == [1, 2]
    for x, y in zip(ra, rb, strict=True):
        for key in (
            "loss",
            "loss/ce",
            "loss/cot_ce",
            "loss/latent_kv/self",
            "loss/latent_kv/qwen_sp",
            "grad_norm",
        ):
            assert x[key] == y[key], key


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


def test_teachers_ahead_without_teachers_is_refused(tiny_config, tmp_path):
    with pytest.raises(KvdistillError, match="train.teachers_ahead is true, but this run has no teachers"):
        train(
            tiny_config(*RESUMABLE, "teachers=[]", "train.teachers_ahead=true"),
            tmp_path / "no",
            progress=False,
        )
