"""Scoring a trained run of an experiment on the shared test split: perplexity, CE, exact match (per problem),
MoE routing agreement; in the runner's process or, several at once, as child processes
(`python -m kvdistill.experiments.score JOB.json...`, each scoring its jobs one after the other, writing every
run's eval.json, and giving its GPU memory back when it exits).

A job: {"spec": the spec as a mapping, "config": the run's config file, "scored": the student directory to
score, "extra": figures to add (steps, FLOPs, times), "routing_teacher": a teacher directory or null,
"record": the eval.json to write}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kvdistill.atomic import write_json_atomic
from kvdistill.config import load_config
from kvdistill.config.schema import RunConfig
from kvdistill.data import load_records
from kvdistill.errors import KvdistillError
from kvdistill.experiments.spec import ExperimentSpec


def evaluate_run(
    student_dir: Path | str,
    held: list[dict],
    cfg: RunConfig,
    spec: ExperimentSpec,
    *,
    teachers: dict | None = None,
    fit: list[dict] = (),
    cache=None,
) -> dict:
    """One saved student's record on the test split, through the one evaluation path
    (`kvdistill.eval.student.evaluate_saved`): held-out ppl, CE and tokens counted and, if the spec asks,
    exact match with its per-problem 0/1 list (text students directly or by CoT decoding, latent students in
    latent mode, each with its decoding cost); on a held-out set mixing skills the per-skill figures; against
    `teachers` {name: (model, tokenizer)} the KV probe (fitted on `fit`, `cache` a shared
    `TeacherRowsCache`)."""
    from kvdistill.eval.student import evaluate_saved

    ev = evaluate_saved(
        student_dir,
        held,
        template=cfg.data.template,
        max_length=cfg.data.max_length,
        em=spec.eval.exact_match,
        cot=spec.eval.cot,
        max_new_tokens=spec.eval.max_new_tokens,
        max_cot_tokens=spec.eval.max_cot_tokens,
        batch_size=spec.eval.batch_size,
        teachers=teachers,
        fit_records=fit,
        teacher_cache=cache,
    )
    return record_of(ev, spec, held)


def record_of(ev: dict, spec: ExperimentSpec, held: list[dict]) -> dict:
    """An evaluation (`kvdistill.eval.student`) as a run's eval.json holds it: ppl, ce, tokens, the
    exact-match figures the way of answering has (`RECORD_EM`), per-skill figures, the KV probe where
    measured, and a latent student's swap probe (swap_exact_match, swap_per_item, swap_follows)."""
    out = {k: ev["perplexity"][k] for k in ("ppl", "ce", "tokens")}
    if "exact_match" in ev:
        way = "latent" if ev["mode"] == "latent" else "cot" if spec.eval.cot else "text"
        out.update({k: ev["exact_match"][k] for k in RECORD_EM[way]})
    if "latent_swap" in ev:  # the swap probe: answers from another question's latents
        swap = ev["latent_swap"]
        out.update(
            swap_exact_match=swap["exact_match"], swap_per_item=swap["per_item"], swap_follows=swap["follows"]
        )
    out.update(_per_skill(out, held))
    if ev.get("probe_kv_error"):
        out["probe_kv_error"] = ev["probe_kv_error"]
    return out


RECORD_EM = {
    "text": ("exact_match", "per_item", "samples"),
    "cot": ("exact_match", "per_item", "samples", "gen_tokens", "latency_s"),
    "latent": (
        "exact_match",
        "per_item",
        "samples",
        "gen_tokens",
        "latency_s",
        "latent_passes",
        "latent_tokens",
    ),
}
"""What of an exact-match result a run's eval.json keeps, by the way the student answered (a direct answer
costs no decoding worth a metric; CoT and latent answers report theirs)."""


def _per_skill(ev: dict, held: list[dict]) -> dict:
    """A held-out set that mixes skills: exact_match_<skill> and the scored records' skills (`skills`, for the
    per-skill paired comparisons); nothing for unlabelled records."""
    from kvdistill.eval.skills import exact_match_by_skill

    skills = [
        r.get("skill") for r in held if r.get("answer") is not None and r.get("answer_start") is not None
    ]
    if "per_item" not in ev or not any(skills):
        return {}
    return {"skills": skills, **exact_match_by_skill(ev["per_item"], skills)}


def routing_agreement(student_dir: Path, teacher_dir: str, held: list[dict], cfg: RunConfig) -> dict:
    """routing_top1 / routing_topk of a saved MoE student against a prepared MoE teacher on the held-out
    records."""
    from kvdistill.device import default_device
    from kvdistill.eval.moe import routing_agreement_of
    from kvdistill.models.load import load_model

    device = default_device()
    student, s_tok = load_model(str(student_dir), device=device, attn_implementation="sdpa")
    teacher, t_tok = load_model(str(teacher_dir), device=device, attn_implementation="sdpa")
    return routing_agreement_of(
        student.eval(), s_tok, teacher.eval(), t_tok, held, max_length=cfg.data.max_length
    )


_LOADED: dict[str, tuple] = {}  # teacher models this process loaded for the KV probe, by name
_ROWS: dict[str, object] = {}  # their K/V on the probe's records, captured once for every run scored here


def _probe_teachers(names: dict[str, str] | None) -> dict:
    """{name: (model, tokenizer)} of the probe's teachers {name: model}, loaded once per process."""
    from kvdistill.device import default_device
    from kvdistill.models.load import load_model

    for model in (names or {}).values():
        if model not in _LOADED:
            _LOADED[model] = load_model(model, device=default_device(), attn_implementation="sdpa")
    return {name: _LOADED[model] for name, model in (names or {}).items()}


def score(job: dict) -> dict:
    """Score one job (module docstring): its eval.json, also returned. An `init` job scores the untrained
    student its config builds; `probe_teachers` {name: model} adds the KV probe against them."""
    from kvdistill.eval.metrics import TeacherRowsCache
    from kvdistill.eval.run import MIN_FIT

    spec = ExperimentSpec.model_validate(job["spec"])
    cfg = load_config(job["config"])
    held = load_records(cfg.data, split="eval")
    teachers = _probe_teachers(job.get("probe_teachers"))
    fit = load_records(cfg.data, split="train")[: max(len(held), MIN_FIT)] if teachers else []
    cache = _ROWS.setdefault("rows", TeacherRowsCache()) if teachers else None
    if job.get("init"):
        from kvdistill.device import default_device
        from kvdistill.eval.student import evaluate_student
        from kvdistill.student import build_student

        if cfg.student.latent is not None:
            raise KvdistillError(
                "eval.init scores the untrained student as a text model; this base student is a latent one",
                "drop eval.init from the spec (or score the latent student's "
                "backbone in a condition of its own)",
            )
        model, tok = build_student(cfg.student, seed=cfg.train.seed)
        way = {
            "cot": spec.eval.cot,
            "template": cfg.data.template,
            "max_new_tokens": spec.eval.max_cot_tokens if spec.eval.cot else spec.eval.max_new_tokens,
        }
        ev = record_of(
            evaluate_student(
                model.to(default_device()),
                tok,
                teachers,
                fit,
                held,
                max_length=cfg.data.max_length,
                em=spec.eval.exact_match,
                batch_size=spec.eval.batch_size,
                teacher_cache=cache,
                **way,
            ),
            spec,
            held,
        )
    else:
        scored = Path(job["scored"])
        ev = evaluate_run(scored, held, cfg, spec, teachers=teachers, fit=fit, cache=cache)
        ev.update(job.get("extra") or {})
        if job.get("routing_teacher"):
            ev.update(routing_agreement(scored, job["routing_teacher"], held, cfg))
    write_json_atomic(Path(job["record"]), ev)
    return ev


if __name__ == "__main__":  # a child process of the runner
    for arg in sys.argv[1:]:
        score(json.loads(Path(arg).read_text()))
