"""`kvdistill experiment SPEC --out DIR`: prepare the teachers, train every (condition, seed), evaluate, compare.

Directory layout (everything resumable: a finished step is skipped, a killed run resumes from its checkpoint):
    DIR/spec.yaml                        the spec as run
    DIR/teachers/NAME/                   a teacher's own CE training run; teacher.json: its held-out exact match
    DIR/runs/CONDITION/seed-S/           an ordinary training run (config.yaml, metrics.jsonl, final/student, ...)
    DIR/runs/CONDITION/seed-S/eval.json  its held-out figures, per-problem exact match included; on a held-out set
                                         mixing skills also exact_match_<skill> and, for a router or similarity
                                         fusion over teachers labelled with a skill, routing_acc(_<skill>)
    DIR/results.json, DIR/results.md     per condition and metric: values, mean, std, 95% interval; comparisons
    DIR/plots/                           bars with error bars per metric, held-out learning curves
"""

from __future__ import annotations

import copy
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import yaml

from kvdistill.cache.manifest import write_json_atomic
from kvdistill.config import config_path, load_config, read_raw
from kvdistill.config.schema import RunConfig
from kvdistill.data import load_records
from kvdistill.errors import KvdistillError
from kvdistill.experiments.spec import ExperimentSpec, TeacherPrep

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- configs
def base_raw(spec: ExperimentSpec) -> dict:
    """The base run config as a mapping (a fresh copy)."""
    if isinstance(spec.base, dict):
        return copy.deepcopy(spec.base)
    return read_raw(config_path(spec.base))


def teacher_config(spec: ExperimentSpec, prep: TeacherPrep) -> RunConfig:
    """The CE training run that makes a teacher competent on the task: the base data, the teacher as student."""
    raw = base_raw(spec)
    student = {"model": prep.model} if prep.model else {"from_config": prep.from_config}
    if prep.tokenizer:
        student["tokenizer"] = prep.tokenizer
    train = dict(raw.get("train") or {})
    train.update(steps=prep.steps, batch_size=prep.batch_size, lr=prep.lr, warmup_steps=prep.warmup_steps,
                 seed=0, eval_every=0, save_every=0)
    raw.update(name=f"teacher-{prep.name}", student=student, teachers=[], losses={"ce": 1.0}, fusion={},
               train=train)
    return load_config(raw=raw, overrides=prep.overrides)


def condition_config(spec: ExperimentSpec, name: str, seed: int, teachers: dict[str, dict],
                     steps: int | None = None) -> RunConfig:
    """The run of condition `name` with `seed`: base, budget, the condition's teachers and overrides, the seed.
    A `cache: true` condition reads each teacher from `teachers[name]["cache_dir"]`."""
    cond = spec.conditions[name]
    raw = base_raw(spec)
    skills = {prep.name: prep.skill for prep in spec.teachers}
    if spec.student_from is not None:
        kept = {k: v for k, v in (raw.get("student") or {}).items() if k not in ("model", "from_config", "tokenizer")}
        raw["student"] = {**kept, "model": teachers[spec.student_from]["model"]}
    raw["teachers"] = [{"name": t, "model": teachers[t]["model"]} for t in cond.teachers]
    for entry in raw["teachers"]:
        if skills.get(entry["name"]):
            entry["skill"] = skills[entry["name"]]
    if cond.cache:
        for entry in raw["teachers"]:
            entry.update(source="cache", cache_dir=teachers[entry["name"]].get("cache_dir", "?"))
    if not cond.teachers:
        raw["fusion"] = {}
    raw["name"] = f"{name}-seed{seed}"
    overrides = spec.budget_overrides() + list(cond.overrides) + [f"train.seed={seed}"]
    if steps is not None:
        overrides.append(f"train.steps={steps}")
    data_keys = [o for o in cond.overrides if o.startswith("data.")]
    if data_keys:
        raise KvdistillError(f"condition '{name}' overrides {data_keys}: every condition must see the same data "
                             "and held-out split", "move data settings to the spec's base config")
    return load_config(raw=raw, overrides=overrides)


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate_run(student_dir: Path, held: list[dict], cfg: RunConfig, spec: ExperimentSpec) -> dict:
    """Held-out perplexity, CE and (if asked) exact match with its per-problem 0/1 list, for one saved student."""
    import torch

    from kvdistill.eval.latent import cot_exact_match
    from kvdistill.eval.metrics import exact_match, perplexity
    from kvdistill.models.load import load_model
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
    """A latent student: exact match in latent mode (with tokens, latency and latent passes per answer); ppl / ce
    are those of the answer after the latents (training's held-out figures, from summary.json)."""
    from kvdistill.eval.latent import latent_exact_match
    from kvdistill.student.latent import load_latent_student

    student, tok = load_latent_student(student_dir, device=device)
    em = latent_exact_match(student, tok, held, cfg.data.template, max_new_tokens=spec.eval.max_new_tokens,
                            batch_size=spec.eval.batch_size)
    summary_path = student_dir.parent.parent / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    del student
    return {"ppl": summary.get("eval/ppl"), "ce": summary.get("eval/ce"),
            **{k: em[k] for k in ("exact_match", "per_item", "samples", "gen_tokens", "latency_s", "latent_passes",
                                  "latent_tokens")}}


def routing_agreement(student_dir: Path, teacher_dir: str, held: list[dict], cfg: RunConfig) -> dict:
    """routing_top1 / routing_topk of a saved MoE student against a prepared MoE teacher on the held-out records."""
    import torch

    from kvdistill.eval.moe import routing_agreement_of
    from kvdistill.models.load import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    student, s_tok = load_model(str(student_dir), device=device, attn_implementation="sdpa")
    teacher, t_tok = load_model(str(teacher_dir), device=device, attn_implementation="sdpa")
    return routing_agreement_of(student.eval(), s_tok, teacher.eval(), t_tok, held, max_length=cfg.data.max_length)


# ---------------------------------------------------------------------------------------------- teachers
def prepare_teachers(spec: ExperimentSpec, out: Path, held: list[dict]) -> dict[str, dict]:
    """Train (or reuse) every teacher of the spec, `spec.concurrent` at once; {name: {model, exact_match, ppl,
    params}}. Stops when one is below its required exact match."""
    dirs = {prep.name: out / "teachers" / prep.name for prep in spec.teachers}
    configs = {prep.name: teacher_config(spec, prep) for prep in spec.teachers}
    pending = [(dirs[n], cfg) for n, cfg in configs.items()
               if not (dirs[n] / "teacher.json").is_file() and not (dirs[n] / "final" / "student").is_dir()]
    train_all(pending, spec.concurrent)
    info = {}
    for prep in spec.teachers:
        run_dir = dirs[prep.name]
        record = run_dir / "teacher.json"
        if not record.is_file():
            ev = evaluate_run(run_dir / "final" / "student", held, configs[prep.name], spec)
            per_skill = {k: v for k, v in ev.items() if k.startswith("exact_match_")}
            write_json_atomic(record, {"exact_match": ev.get("exact_match"), "ppl": ev["ppl"], **per_skill,
                                       "params": _param_count(run_dir / "final" / "student"),
                                       "samples": ev.get("samples", [])})
        got = json.loads(record.read_text())
        info[prep.name] = {"model": str(run_dir / "final" / "student"), **got}
        # a specialist must be competent on its own skill (its held-out exact match there), others on everything
        key = f"exact_match_{prep.skill}" if prep.skill else "exact_match"
        em = got.get(key)
        if prep.min_exact_match > 0 and (em is None or em < prep.min_exact_match):
            raise KvdistillError(
                f"teacher '{prep.name}' reached held-out exact match{f' on {prep.skill}' if prep.skill else ''} {em} "
                f"< the required {prep.min_exact_match}: "
                "without competent teachers no comparison means anything",
                f"train it longer (teachers.{prep.name}.steps, now {prep.steps}) or larger, then rerun "
                f"(delete {record} to re-evaluate), or lower min_exact_match")
    return info


def prepare_caches(spec: ExperimentSpec, out: Path, names: list[str], teachers: dict[str, dict],
                   data_cfg) -> dict[str, dict]:
    """Extract (or reuse) the cache of every teacher a `cache: true` condition reads: DIR/caches/NAME, with its
    cost in DIR/caches/NAME.json; sets teachers[NAME]["cache_dir"]. Returns {NAME: {seconds, tokens, records}}."""
    from kvdistill.cache.extract import extract
    from kvdistill.config.schema import TeacherConfig

    needed = sorted({t for n in names if spec.conditions[n].cache for t in spec.conditions[n].teachers})
    costs = {}
    for t in needed:
        d = out / "caches" / t
        record = out / "caches" / f"{t}.json"
        if not record.is_file():
            log.info("extracting the cache of teacher %s", t)
            res = extract(TeacherConfig(name=t, model=teachers[t]["model"]), data_cfg, d, batch_size=32,
                          progress=False)
            write_json_atomic(record, {"seconds": res["seconds"], "tokens": res["tokens"],
                                       "records": res["records"]})
        teachers[t]["cache_dir"] = str(d)
        costs[t] = json.loads(record.read_text())
    return costs


def _param_count(student_dir: Path) -> int:
    """Parameters of a saved model, from its safetensors headers (no weights loaded)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(student_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():  # noqa: SIM118 (safe_open is not iterable)
                n = 1
                for d in st.get_slice(key).get_shape():
                    n *= int(d)
                total += n
    return total


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

    def per_token(cond: str) -> int:
        return 6 * n_student + 2 * sum(teachers[t]["params"] for t in spec.conditions[cond].teachers)

    return max(1, round(ref_steps * per_token(ref) / per_token(name)))


# ---------------------------------------------------------------------------------------------- runs
def run_dir(out: Path, name: str, seed: int) -> Path:
    return out / "runs" / name / f"seed-{seed}"


def train_all(pending: list[tuple[Path, RunConfig]], concurrent: int) -> None:
    """Train the pending runs: in this process one after the other, or `concurrent` at once as separate
    `kvdistill train` processes (they share the GPU); a killed run resumes from its last checkpoint."""
    from kvdistill.config import dump_config
    from kvdistill.train.trainer import train

    if concurrent == 1:
        for d, cfg in pending:
            log.info("training %s (%d steps)", d, cfg.train.steps)
            train(cfg, d, resume=(d / "config.yaml").is_file())  # a started run resumes (or restarts cleanly)
        return
    queue = list(pending)
    running: list[tuple[subprocess.Popen, Path]] = []
    failed = []
    while queue or running:
        while queue and len(running) < concurrent:
            d, cfg = queue.pop(0)
            d.parent.mkdir(parents=True, exist_ok=True)
            config = d.parent / f"{d.name}.yaml"
            config.write_text(dump_config(cfg))
            cmd = [sys.executable, "-m", "kvdistill.cli", "train", str(config), "--out", str(d)]
            if (d / "config.yaml").is_file():
                cmd.append("--resume")
            with (d.parent / f"{d.name}.log").open("a") as logfile:
                running.append((subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT), d))
        time.sleep(0.5)
        for proc, d in list(running):
            if proc.poll() is not None:
                running.remove((proc, d))
                if proc.returncode != 0:
                    failed.append(f"{d} (exit {proc.returncode}, log {d.parent / (d.name + '.log')})")
    if failed:
        raise KvdistillError(f"training failed for {', '.join(failed)}",
                             "read the logs; rerun the same command to resume the missing runs")


def run_experiment(spec: ExperimentSpec, out: str | Path, *, only: list[str] | None = None,
                   seeds: int | None = None) -> dict:
    """Run (or resume) the experiment; returns the results also written to DIR/results.json."""
    from kvdistill.experiments.results import collect, write_results

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    names = list(spec.conditions) if not only else _only(spec, only)
    use_seeds = spec.seeds[:seeds] if seeds else spec.seeds
    probe = condition_config(spec, spec.baseline, use_seeds[0], {t.name: {"model": "?"} for t in spec.teachers})
    held = load_records(probe.data, split="eval")
    if not held:
        raise KvdistillError("the base config holds out no records (data.eval_size 0)",
                             "set data.eval_size in the spec's base config")
    teachers = prepare_teachers(spec, out, held)
    extraction = prepare_caches(spec, out, names, teachers, probe.data)
    n_student = student_params(probe) if any(spec.conditions[n].match_flops_of for n in names) else 0
    configs = {(n, s): condition_config(spec, n, s, teachers, flops_steps(spec, n, teachers, n_student))
               for n in names for s in use_seeds}
    pending = [(run_dir(out, n, s), cfg) for (n, s), cfg in configs.items()
               if not (run_dir(out, n, s) / "final" / "student" / "config.json").is_file()]
    train_all(pending, spec.concurrent)
    for (n, s), cfg in configs.items():
        record = run_dir(out, n, s) / "eval.json"
        if not record.is_file():
            ev = evaluate_run(run_dir(out, n, s) / "final" / "student", held, cfg, spec)
            summary = json.loads((run_dir(out, n, s) / "summary.json").read_text())
            ev.update(elapsed_s=summary.get("elapsed_s"), steps=cfg.train.steps)
            # the routing accuracy training's own held-out evaluation gave the trained fusion (Objective.evaluate)
            ev.update({k.removeprefix("eval/"): v for k, v in summary.items() if k.startswith("eval/routing_acc")})
            if spec.eval.routing_teacher:
                ev.update(routing_agreement(run_dir(out, n, s) / "final" / "student",
                                            teachers[spec.eval.routing_teacher]["model"], held, cfg))
            write_json_atomic(record, ev)
    results = collect(spec, out, names, use_seeds, teachers)
    results["extraction"] = extraction
    write_results(results, spec, out)
    return results


def _only(spec: ExperimentSpec, only: list[str]) -> list[str]:
    unknown = [n for n in only if n not in spec.conditions]
    if unknown:
        raise KvdistillError(f"--only {unknown}: not conditions of '{spec.name}'",
                             f"use some of {', '.join(spec.conditions)}")
    return list(dict.fromkeys([spec.baseline, *only]))  # the baseline is always run: comparisons need it
