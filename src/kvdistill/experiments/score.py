"""Scoring a trained run of an experiment on the shared test split: perplexity, CE, exact match (per problem), MoE
routing agreement; in the runner's process or, several at once, as child processes
(`python -m kvdistill.experiments.score JOB.json...`, each scoring its jobs one after the other, writing every run's
eval.json, and giving its GPU memory back when it exits).

A job: {"spec": the spec as a mapping, "config": the run's config file, "scored": the student directory to score,
"extra": figures to add (steps, FLOPs, times), "routing_teacher": a teacher directory or null, "record": the
eval.json to write}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kvdistill.cache.manifest import write_json_atomic
from kvdistill.config import load_config
from kvdistill.config.schema import RunConfig
from kvdistill.data import load_records
from kvdistill.experiments.spec import ExperimentSpec


def evaluate_run(student_dir: Path, held: list[dict], cfg: RunConfig, spec: ExperimentSpec) -> dict:
    """Held-out perplexity, CE and (if asked) exact match with its per-problem 0/1 list, for one saved student."""
    import torch

    from kvdistill.eval.metrics import exact_match, perplexity
    from kvdistill.models.load import load_model
    from kvdistill.student.answer import cot_exact_match
    from kvdistill.student.latent import is_latent_student

    device = "cuda" if torch.cuda.is_available() else "cpu"
    bs = spec.eval.batch_size
    if is_latent_student(student_dir):
        return _evaluate_latent(student_dir, held, cfg, spec, device)
    model, tok = load_model(str(student_dir), device=device, attn_implementation="sdpa")
    model.eval()
    ppl = perplexity(model, tok, held, max_length=cfg.data.max_length, batch_size=bs)
    out = {"ppl": ppl["ppl"], "ce": ppl["ce"], "tokens": ppl["tokens"]}
    if spec.eval.exact_match and spec.eval.cot:
        em = cot_exact_match(model, tok, held, cfg.data.template, max_new_tokens=spec.eval.max_cot_tokens,
                             batch_size=bs)
        out.update({k: em[k] for k in ("exact_match", "per_item", "samples", "gen_tokens", "latency_s")})
    elif spec.eval.exact_match:
        em = exact_match(model, tok, held, max_new_tokens=spec.eval.max_new_tokens, batch_size=bs)
        out.update(exact_match=em["exact_match"], per_item=em["per_item"], samples=em["samples"])
    del model
    out.update(_per_skill(out, held))
    return out


def _per_skill(ev: dict, held: list[dict]) -> dict:
    """A held-out set that mixes skills: exact_match_<skill> and the scored records' skills (`skills`, for the
    per-skill paired comparisons); nothing for unlabelled records."""
    from kvdistill.eval.skills import exact_match_by_skill

    skills = [r.get("skill") for r in held if r.get("answer") is not None and r.get("answer_start") is not None]
    if "per_item" not in ev or not any(skills):
        return {}
    return {"skills": skills, **exact_match_by_skill(ev["per_item"], skills)}


def _evaluate_latent(student_dir: Path, held: list[dict], cfg: RunConfig, spec: ExperimentSpec, device) -> dict:
    """A latent student (`kvdistill.eval.latent.evaluate_latent`, as `kvdistill eval` runs it): latent-mode exact match
    with tokens, latency and latent passes per answer, and the held-out answer CE after the latents."""
    from kvdistill.eval.latent import evaluate_latent

    ev = evaluate_latent(student_dir, held, cfg.data.template, max_new_tokens=spec.eval.max_new_tokens,
                         batch_size=spec.eval.batch_size, device=device)
    return {k: ev[k] for k in ("ppl", "ce", "exact_match", "per_item", "samples", "gen_tokens", "latency_s",
                               "latent_passes", "latent_tokens")}


def routing_agreement(student_dir: Path, teacher_dir: str, held: list[dict], cfg: RunConfig) -> dict:
    """routing_top1 / routing_topk of a saved MoE student against a prepared MoE teacher on the held-out records."""
    import torch

    from kvdistill.eval.moe import routing_agreement_of
    from kvdistill.models.load import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    student, s_tok = load_model(str(student_dir), device=device, attn_implementation="sdpa")
    teacher, t_tok = load_model(str(teacher_dir), device=device, attn_implementation="sdpa")
    return routing_agreement_of(student.eval(), s_tok, teacher.eval(), t_tok, held, max_length=cfg.data.max_length)


def score(job: dict) -> dict:
    """Score one job (module docstring): its eval.json, also returned."""
    spec = ExperimentSpec.model_validate(job["spec"])
    cfg = load_config(job["config"])
    held = load_records(cfg.data, split="eval")
    scored = Path(job["scored"])
    ev = evaluate_run(scored, held, cfg, spec)
    ev.update(job.get("extra") or {})
    if job.get("routing_teacher"):
        ev.update(routing_agreement(scored, job["routing_teacher"], held, cfg))
    write_json_atomic(Path(job["record"]), ev)
    return ev


if __name__ == "__main__":  # a child process of the runner
    for arg in sys.argv[1:]:
        score(json.loads(Path(arg).read_text()))
