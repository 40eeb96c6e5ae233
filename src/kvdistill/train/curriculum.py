"""The 5-phase curriculum, or any list of configs run in order, each starting from the previous student.

Packaged phases (`kvdistill train --phases 1-5 --out DIR`):
1. two teachers, fixed 0.5 / 0.5              4. learned router with entropy regularisation
2. unequal fixed weights, uniform layer map   5. + an encoder teacher (MiniLM), all in one shared latent
                                                 space Z
3. similarity routing over all teachers

A curriculum config (`kvdistill train CURRICULUM.yaml --out DIR`) lists the stages, each a packaged name or a
path (relative to the curriculum file), plus overrides applied to every stage (an override of a fusion
section, `fusion.similarity|router|entropy|latent|confidence.*`, only to the stages whose fusion reads it)::

    curriculum: [phase1, phase2, my_phase.yaml]
    overrides: [train.steps=200, data.max_length=512]

Stage k runs in DIR/<stage name> and starts from stage k-1's final student; on `--resume` finished stages
(summary.json present) are skipped and an interrupted one continues from its last checkpoint.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml

from kvdistill.atomic import write_json_atomic
from kvdistill.config import load_config, packaged_file
from kvdistill.errors import KvdistillError
from kvdistill.paths import claim, dir_problem
from kvdistill.rundir import student_dir

log = logging.getLogger(__name__)

PHASES = (1, 2, 3, 4, 5)
CURRICULUM = "curriculum.json"  # DIR/curriculum.json: the stages run, with their summaries


def packaged_config(name: str) -> Path:
    return packaged_file(name)


def is_curriculum(path: str | Path) -> bool:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and "curriculum" in raw


def read_curriculum(path: str | Path) -> tuple[list[Path], list[str]]:
    """Stages (config paths) and shared overrides of a curriculum file; every problem at once."""
    path = Path(path)
    raw = yaml.safe_load(path.read_text())
    problems = [
        f"unknown key '{k}' (a curriculum file has 'curriculum' and 'overrides')"
        for k in raw
        if k not in ("curriculum", "overrides")
    ]
    stages = raw.get("curriculum")
    overrides = raw.get("overrides") or []
    if not isinstance(stages, list) or not stages:
        problems.append("'curriculum' must be a non-empty list of config paths or packaged names")
        stages = []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        problems.append("'overrides' must be a list of 'dotted.key=value' strings")
        overrides = []
    paths = []
    for stage in stages:
        candidate = path.parent / str(stage)
        if candidate.is_file():
            paths.append(candidate)
            continue
        try:
            paths.append(packaged_config(str(stage)))
        except KvdistillError as err:
            problems.append(f"stage '{stage}': {err.problem}")
    if problems:
        raise KvdistillError(
            f"curriculum {path} has problems: " + "; ".join(problems),
            "fix the listed entries of the curriculum file",
        )
    return paths, overrides


# the fusion sections that only some fusion kinds / spaces read: {section: (key, value that reads it)}
_READ_BY = {
    "similarity": ("kind", ("similarity",)),
    "router": ("kind", ("router",)),
    "entropy": ("kind", ("router",)),
    "latent": ("space", ("latent",)),
    "confidence": ("kind", ("confidence", "router")),
}


def stage_overrides(stage: Path, overrides: list[str]) -> list[str]:
    """The overrides that apply to one stage: all of them, except those of a fusion section the stage's fusion
    does not read (e.g. fusion.latent.* for a loss-space stage), which apply only where they are read."""
    from kvdistill.config import read_raw

    fusion = dict(
        read_raw(stage, [o for o in overrides if o.split("=", 1)[0] in ("fusion.kind", "fusion.space")]).get(
            "fusion"
        )
        or {}
    )
    kept = []
    for item in overrides:
        parts = item.split("=", 1)[0].split(".")
        if len(parts) > 2 and parts[0] == "fusion" and parts[1] in _READ_BY:
            key, value = _READ_BY[parts[1]]
            if fusion.get(key, {"kind": "fixed", "space": "loss"}[key]) not in value:
                log.info(
                    "stage %s: override %s is not read by its fusion; not applied there", stage.name, item
                )
                continue
        kept.append(item)
    return kept


def run_curriculum(
    stages: list[Path],
    out: str | Path,
    overrides: list[str],
    *,
    resume: bool = False,
    init_student: str | None = None,
) -> list[dict]:
    """Train `stages` in order under OUT/<config name>; stage k > 0 starts from stage k-1's final student."""
    from kvdistill.train.trainer import train

    out = Path(out)
    configs = [
        load_config(p, stage_overrides(p, overrides)) for p in stages
    ]  # all validated before the first step
    names = [c.name for c in configs]  # each one path segment (RunConfig checks it): DIR/<name>
    if len(set(names)) != len(names):
        raise KvdistillError(
            f"curriculum stages share names {names}", "give every stage config a distinct `name`"
        )
    if CURRICULUM in names:
        raise KvdistillError(
            f"a curriculum stage is named '{CURRICULUM}', the file that lists the stages",
            "rename that stage config's `name`",
        )
    problem = dir_problem(out, "curriculum", legacy=(CURRICULUM,))
    if problem:
        raise problem
    for (
        name
    ) in names:  # a stage folder that is not a run (the user's own files) is refused before any training
        problem = dir_problem(
            out / name, "run", flag=f"stage '{name}' folder", legacy=("config.yaml", "plan.json")
        )
        if problem:
            raise problem
    claim(out, "curriculum")
    previous = Path(init_student) if init_student else None
    results = []
    for cfg in configs:
        run_dir = out / cfg.name
        if (run_dir / "summary.json").is_file() and resume:
            summary = json.loads((run_dir / "summary.json").read_text())
        else:
            summary = train(
                cfg,
                run_dir,
                resume=resume and (run_dir / "config.yaml").is_file(),
                init_student=str(previous) if previous else None,
            )
        results.append(
            {
                "stage": cfg.name,
                "dir": str(run_dir),
                "init_student": str(previous) if previous else None,
                **summary,
            }
        )
        previous = student_dir(run_dir / "final")
        write_json_atomic(out / CURRICULUM, results)
    return results


def run_phases(
    phases: list[int], out: str | Path, overrides: list[str], *, resume: bool = False
) -> list[dict]:
    """The packaged phases `phases` (e.g. [1, 2, 3, 4, 5]) as one curriculum."""
    return run_curriculum([packaged_config(f"phase{p}") for p in phases], out, overrides, resume=resume)
