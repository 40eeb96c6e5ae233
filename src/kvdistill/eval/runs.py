"""The run directories a report reads: one `Run` record per directory written by `kvdistill train`.

Layout (see docs/architecture.md, "Run directory"): metrics.jsonl is required; config.yaml,
summary.json, eval.json (`kvdistill eval`), plan.json and alignment_sample.json are optional, and an
unreadable one is skipped with a warning.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from kvdistill.errors import KvdistillError

log = logging.getLogger(__name__)


def finite(v: Any) -> bool:
    """True for a real, finite int or float (not a bool, not nan/inf)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class Run:
    """What the report needs from one run directory."""

    path: Path
    name: str
    train: list[dict]  # metrics.jsonl lines without "split": "eval", in file order
    evals: list[dict]  # eval lines
    summary: dict = field(default_factory=dict)
    plan: dict | None = None
    sample: dict | None = None
    eval_file: dict | None = None  # RUN/eval.json written by `kvdistill eval`

    def final(self, key: str) -> Any:
        """`key` from summary.json, else from the last eval line that has it."""
        if key in self.summary:
            return self.summary[key]
        for row in reversed(self.evals):
            if key in row:
                return row[key]
        return None

    def final_train(self, key: str) -> Any:
        for row in reversed(self.train):
            if key in row:
                return row[key]
        return None

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of a train key, finite points only."""
        pts = [(r["step"], r[key]) for r in self.train if "step" in r and finite(r.get(key))]
        if not pts:
            return np.zeros(0), np.zeros(0)
        steps, vals = zip(*pts, strict=True)
        return np.asarray(steps, dtype=float), np.asarray(vals, dtype=float)

    def eval_series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of a held-out key over the eval rows, finite points only, one per step (the
        last)."""
        pts = {r["step"]: r[key] for r in self.evals if isinstance(r.get("step"), int) and finite(r.get(key))}
        if not pts:
            return np.zeros(0), np.zeros(0)
        steps = sorted(pts)
        return np.asarray(steps, dtype=float), np.asarray([pts[s] for s in steps], dtype=float)

    def train_keys(self, prefix: str) -> list[str]:
        keys: dict[str, None] = {}
        for row in self.train:
            for k in row:
                if k.startswith(prefix) and isinstance(row[k], (int, float)):
                    keys[k] = None
        return list(keys)


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        log.warning("skipping unreadable %s: %s", path, err)
        return None


def _read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    train, evals = [], []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)  # json accepts NaN / Infinity, which the trainer may write
        except json.JSONDecodeError:
            log.warning("%s:%d is not JSON (a run cut off mid-write?); skipped", path, i)
            continue
        if isinstance(row, dict):
            (evals if row.get("split") == "eval" else train).append(row)
    return train, evals


def _run_name(path: Path) -> str:
    cfg_path = path / "config.yaml"
    if cfg_path.is_file():
        try:
            cfg = yaml.safe_load(cfg_path.read_text())
        except yaml.YAMLError as err:
            log.warning("skipping unreadable %s: %s", cfg_path, err)
            cfg = None
        if isinstance(cfg, dict) and cfg.get("name"):
            return str(cfg["name"])
    return path.resolve().name


def load_runs(run_dirs: list[Path | str]) -> list[Run]:
    """Read every run directory; a missing directory or metrics.jsonl is an error naming all of them."""
    if not run_dirs:
        raise KvdistillError(
            "no run directories given", "pass one or more directories written by `kvdistill train`"
        )
    paths = [Path(d) for d in run_dirs]
    problems = []
    for p in paths:
        if not p.is_dir():
            problems.append(f"{p}: no such directory")
        elif not (p / "metrics.jsonl").is_file():
            problems.append(f"{p}: no metrics.jsonl (not a run directory, or training never logged a step)")
    if problems:
        raise KvdistillError(
            "cannot report on " + "; ".join(problems),
            "pass directories written by `kvdistill train CONFIG --out DIR`",
        )
    runs = []
    for p in paths:
        train, evals = _read_metrics(p / "metrics.jsonl")
        summary = _read_json(p / "summary.json")
        plan = _read_json(p / "plan.json")
        sample = _read_json(p / "alignment_sample.json")
        evaluated = _read_json(p / "eval.json")
        if isinstance(evaluated, dict) and evaluated.get("written_by") != "kvdistill eval":
            evaluated = None  # an experiment runner's record: its figures are in the experiment's results
        runs.append(
            Run(
                path=p,
                name=_run_name(p),
                train=train,
                evals=evals,
                summary=summary if isinstance(summary, dict) else {},
                plan=plan if isinstance(plan, dict) else None,
                sample=sample if isinstance(sample, dict) else None,
                eval_file=evaluated if isinstance(evaluated, dict) else None,
            )
        )
    # two runs with the same config name: tell them apart by directory
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.name] = counts.get(r.name, 0) + 1
    for r in runs:
        if counts[r.name] > 1:
            r.name = f"{r.name} ({r.path})"
    return runs


def teacher_names(runs: list[Run]) -> list[str]:
    """Union of teacher names over all runs, in first-seen order."""
    names: dict[str, None] = {}
    for r in runs:
        for t in (r.plan or {}).get("teachers", []):
            if isinstance(t, dict) and t.get("teacher"):
                names[str(t["teacher"])] = None
        keys = list(r.summary) + [k for row in r.evals for k in row] + [k for row in r.train for k in row]
        for k in keys:
            if k.startswith("eval/kv_error/") or k.startswith("weight/"):
                names[k.split("/", 1)[1].removeprefix("kv_error/")] = None
    return list(names)
