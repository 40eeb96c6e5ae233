"""Compute-matched conditions: the steps of a `match_flops_of` condition from the training FLOPs per student
token (6·N_s + 2·Σ N_t over its online teachers), and of a `match_wall_of` condition from the measured wall
time of the runs it is matched to; the FLOPs an on-policy run spends sampling (`generation`).

An on-policy run (train.on_policy) also generates: each new token of the student's samples costs a forward
of the student, 2·N_s (with the K/V cache; attention over the context left out, as in 6·N_s). Its count is
measured (`on_policy/new_tokens` of every step row in metrics.jsonl, which a resumed run truncates to its
checkpoint), so it is charged after training; the teachers' forward on the sampled text is in 2·Σ N_t per
trained token already. `match_flops_of` sets steps before training from the per-token formula, so a condition
matched to an on-policy one does not include its sampling.
"""

from __future__ import annotations

import json
from pathlib import Path

from kvdistill.config.schema import RunConfig
from kvdistill.experiments.conditions import condition_config
from kvdistill.experiments.spec import ExperimentSpec


def student_params(cfg: RunConfig) -> int:
    """Parameters of the run's student as built (from its checkpoint or config)."""
    from kvdistill.student import build_student

    model, _ = build_student(cfg.student, seed=cfg.train.seed)
    return sum(p.numel() for p in model.parameters())


def flops_steps(spec: ExperimentSpec, name: str, teachers: dict[str, dict], n_student: int) -> int | None:
    """Steps of a `match_flops_of` condition: the reference's steps times its per-token training FLOPs
    (6·N_s + 2·Σ N_t) over this condition's; None for a condition without it."""
    ref = spec.conditions[name].match_flops_of
    if ref is None:
        return None
    ref_steps = condition_config(spec, ref, spec.seeds[0], teachers).train.steps
    return max(
        1,
        round(
            ref_steps
            * flops_per_token(spec, ref, teachers, n_student)
            / flops_per_token(spec, name, teachers, n_student)
        ),
    )


def flops_per_token(spec: ExperimentSpec, name: str, teachers: dict[str, dict], n_student: int) -> int:
    """Training FLOPs per student token of condition `name`: 6·N_s + 2·Σ N_t over its online teachers (a
    cached teacher's forward is paid once, at extraction: `budget.amortise`)."""
    cond = spec.conditions[name]
    return 6 * n_student + (0 if cond.cache else 2 * sum(teachers[t]["params"] for t in cond.teachers))


def wall_steps(spec: ExperimentSpec, name: str, measured: dict[str, list[dict]]) -> int:
    """Steps of a `match_wall_of` condition: the median training seconds of the reference's runs (with their
    amortised extraction seconds) over the median seconds per step of `wall_rate_of`'s runs; `measured`:
    condition -> its runs' eval.json records (train_s, steps_trained, amortised_s)."""
    import statistics

    cond = spec.conditions[name]
    ref, rate = measured[cond.match_wall_of], measured[cond.wall_rate_of or spec.baseline]
    budget = statistics.median(r["train_s"] + r.get("amortised_s", 0.0) for r in ref)
    per_step = statistics.median(r["train_s"] / r["steps_trained"] for r in rate)
    return max(1, round(budget / per_step))


def generation(metrics: Path, n_student: int) -> tuple[int, int]:
    """(tokens the student generated, their FLOPs 2·N_s·tokens) of a run, from its metrics.jsonl's step rows
    (module docstring); (0, 0) for a run that sampled nothing."""
    tokens = 0
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            row = json.loads(line)
            if "split" not in row:  # a step row (held-out rows carry their split)
                tokens += int(row.get("on_policy/new_tokens", 0))
    return tokens, 2 * n_student * tokens
