"""`kvdistill experiment SPEC --out DIR --smoke`: the spec's own runs, shrunk to seconds, to see on a laptop
CPU that every one of them runs end to end before GPU time is spent on it.

The smoke spec keeps what can break: the models (their families, sizes, tokenizers), the data sources and
pools (a generated source's files included), every condition's teachers, fusion, losses, latent student,
caches and matching, the scoring. It shrinks what only costs time:

    every run (conditions and their budget)   train.steps 2, batch 2, no warmup, held-out evaluation every
                                              step (at most 4 new tokens), no checkpoints between
    the held-out splits                       test and validation at most 8 problems each
    teachers                                  at most 2 steps at batch 2, no competence threshold
    scoring                                   batches of at most 8, at most 4 new tokens (8 for CoT)
    concurrency                               one run at a time
    mixed precision, on a CPU only            off (train.mixed_precision no, teachers too): bf16 autocast on
                                              a CPU without native bf16 is about 10x slower (a 6 x 384 llama
                                              step at batch 2 x 320 on a 2-core machine: 77 s against 7.4 s)

Its figures mean nothing. Its directory is marked as a smoke experiment, so that the real experiment
cannot resume from it (and reuse its 2-step teachers) by mistake.
"""

from __future__ import annotations

from kvdistill.experiments.conditions import base_raw
from kvdistill.experiments.spec import ExperimentSpec

__all__ = ["SMOKE_KIND", "SMOKE_RUN", "smoke_spec"]

SMOKE_KIND = "smoke experiment"
"""The directory kind of a smoke experiment (`kvdistill.paths.claim`)."""

SMOKE_RUN = (
    "train.steps=2",
    "train.batch_size=2",
    "train.grad_accum=1",
    "train.warmup_steps=0",
    "train.eval_every=1",
    "train.eval_max_new_tokens=4",
    "train.save_every=0",
)
"""Overrides every condition ends with: after the budget's and its own, so they win."""

HELD_OUT = 8


def smoke_spec(spec: ExperimentSpec, *, cpu: bool = False) -> ExperimentSpec:
    """The smoke version of `spec` (module docstring), named NAME-smoke; `cpu`: for a machine without a GPU
    (mixed precision off)."""
    raw = spec.model_dump(mode="json")
    base = base_raw(spec)
    data = dict(base.get("data") or {})
    data["eval_size"] = min(data.get("eval_size", 32), HELD_OUT)
    if data.get("val_size"):
        data["val_size"] = min(data["val_size"], HELD_OUT)
    base["data"] = data
    raw.update(name=f"{spec.name}-smoke", base=base, concurrent=1)
    last = list(SMOKE_RUN) + (['train.mixed_precision="no"'] if cpu else [])
    for cond in raw["conditions"].values():
        cond["overrides"] = list(cond.get("overrides") or []) + last
    for prep in raw["teachers"]:
        prep.update(steps=min(prep["steps"], 2), batch_size=2, warmup_steps=0, min_exact_match=0.0)
        if cpu:
            prep["overrides"] = list(prep.get("overrides") or []) + ['train.mixed_precision="no"']
    ev = raw["eval"]
    ev.update(
        batch_size=min(ev["batch_size"], HELD_OUT),
        max_new_tokens=min(ev["max_new_tokens"], 4),
        max_cot_tokens=min(ev["max_cot_tokens"], 8),
    )
    return ExperimentSpec.model_validate(raw)
