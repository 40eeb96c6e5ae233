"""On-policy training (train.on_policy) resumes exactly: the sampling draws are a pure function of the seed,
the step and the sample ids, so a run stopped at a checkpoint and resumed samples, logs and ends where the
uninterrupted run does."""

from __future__ import annotations

import torch

from kvdistill.objectives.on_policy import OnPolicy
from kvdistill.train.trainer import train

RESUMABLE = [
    "train.steps=4",
    "train.batch_size=2",
    "train.save_every=2",
    "train.on_policy.lambda=0.8",
    "train.on_policy.max_new_tokens=4",
]


def test_resume_samples_what_the_uninterrupted_run_sampled(tiny_config, tmp_path, files):
    cfg = tiny_config(*RESUMABLE)
    on = OnPolicy(cfg.train.on_policy, seed=0, template=cfg.data.template, tokenizer=None)
    assert [on.chosen(s) for s in range(4)] == [
        False,
        True,
        False,
        True,
    ]  # both kinds on both sides of step 2
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train(cfg, full, progress=False)
    train(cfg, resumed, stop_after=2, progress=False)
    train(cfg, resumed, resume=True, progress=False)
    rows, again = files.metrics(full), files.metrics(resumed)
    assert [r["on_policy/sampled"] for r in rows] == [0.0, 1.0, 0.0, 1.0]
    assert rows[1]["on_policy/new_tokens"] > 0 and rows[0]["on_policy/generate_s"] == 0.0
    drop = ("tokens_per_s", "elapsed_s", "on_policy/generate_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in again] == [
        {k: v for k, v in r.items() if k not in drop} for r in rows
    ]
    a, b = files.weights(full / "final"), files.weights(resumed / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
