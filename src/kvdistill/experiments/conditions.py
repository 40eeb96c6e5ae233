"""The run configs of an experiment: each teacher's own CE training run, each (condition, seed)'s run from the
base config, the budget and the condition's teachers and overrides, and the check that every run keeps the
base's held-out splits and never trains on them (`kvdistill.experiments.spec` says what a spec holds).
"""

from __future__ import annotations

import copy

from kvdistill.config import config_path, load_config, merge_data, read_raw
from kvdistill.config.schema import RunConfig
from kvdistill.data import load_records
from kvdistill.errors import KvdistillError
from kvdistill.experiments.spec import ExperimentSpec, TeacherPrep

__all__ = ["base_raw", "check_splits", "condition_config", "teacher_config"]


def base_raw(spec: ExperimentSpec) -> dict:
    """The base run config as a mapping (a fresh copy)."""
    if isinstance(spec.base, dict):
        return copy.deepcopy(spec.base)
    return read_raw(config_path(spec.base))


def teacher_config(spec: ExperimentSpec, prep: TeacherPrep) -> RunConfig:
    """The CE training run that makes a teacher competent on the task: the base data, the teacher as
    student."""
    raw = base_raw(spec)
    student = {"model": prep.model} if prep.model else {"from_config": prep.from_config}
    if prep.tokenizer:
        student["tokenizer"] = prep.tokenizer
    train = dict(raw.get("train") or {})
    train.update(
        steps=prep.steps,
        batch_size=prep.batch_size,
        lr=prep.lr,
        warmup_steps=prep.warmup_steps,
        seed=0,
        eval_every=0,
        save_every=0,
    )
    raw.update(
        name=f"teacher-{prep.name}", student=student, teachers=[], losses={"ce": 1.0}, fusion={}, train=train
    )
    if prep.data:
        raw["data"] = merge_data(raw.get("data"), prep.data)
    # a teacher keeps the base's held-out evaluations but not its students' selection settings
    train.pop("early_stopping", None)
    train.pop("grad_norms_every", None)
    return load_config(raw=raw, overrides=prep.overrides)


def condition_config(
    spec: ExperimentSpec, name: str, seed: int, teachers: dict[str, dict], steps: int | None = None
) -> RunConfig:
    """The run of condition `name` with `seed`: base, budget, the condition's teachers and overrides, the
    seed. A `cache: true` condition reads each teacher from `teachers[name]["cache_dir"]`."""
    cond = spec.conditions[name]
    raw = base_raw(spec)
    skills = {prep.name: prep.skill for prep in spec.teachers}
    if spec.student_from is not None:
        kept = {
            k: v
            for k, v in (raw.get("student") or {}).items()
            if k not in ("model", "from_config", "tokenizer")
        }
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
    return load_config(raw=raw, overrides=overrides)


def check_splits(configs: dict[str, RunConfig], test: list[dict], val: list[dict]) -> dict[str, int]:
    """Every run (named by `configs`' keys; teachers included) keeps the base's test and validation splits and
    trains on records sharing no id and no question with them; {name: train records}. A KvdistillError names
    each run that breaks it."""
    from kvdistill.data.records import _problem_key

    test_ids, val_ids = [r["id"] for r in test], [r["id"] for r in val]
    held_ids = set(test_ids) | set(val_ids)
    held_keys = {_problem_key(r) for r in test + val}
    seen: dict[str, tuple] = {}
    sizes, problems = {}, []
    for name, cfg in configs.items():
        key = cfg.data.model_dump_json()
        if key not in seen:
            train = load_records(cfg.data, split="train")
            same_test = [r["id"] for r in load_records(cfg.data, split="eval")] == test_ids
            same_val = [r["id"] for r in load_records(cfg.data, split="val")] == val_ids
            shared = [r["id"] for r in train if r["id"] in held_ids or _problem_key(r) in held_keys]
            seen[key] = (len(train), same_test, same_val, shared)
        n, same_test, same_val, shared = seen[key]
        sizes[name] = n
        if not (same_test and same_val):
            problems.append(
                f"{name}: its data gives other {'test' if not same_test else 'validation'} records "
                "than the base's"
            )
        if shared:
            problems.append(
                f"{name}: {len(shared)} training records share an id or a question with the held-out "
                f"splits (e.g. {shared[:3]})"
            )
    if problems:
        raise KvdistillError(
            "every run must be scored on the same held-out records and never train on them: "
            + "; ".join(problems),
            "change only data.size / data.train_size (or other keys that keep data.source, seed, "
            "eval_size and val_size) in teachers[i].data and condition overrides",
        )
    return sizes
