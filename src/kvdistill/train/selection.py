"""train.early_stopping's state: the best validation value so far, rebuilt from metrics.jsonl on a resume."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from kvdistill.config import RunConfig


@dataclass
class Selection:
    """train.early_stopping's state: the best validation value so far, its step, evaluations since it
    improved. A pure function of the evaluations logged so far, so a resume rebuilds it from metrics.jsonl."""

    metric: str  # "eval/ce" or "eval/exact_match"
    higher: bool
    min_delta: float
    patience: int
    best: float | None = None
    best_step: int | None = None
    bad: int = 0
    stopped_at: int | None = None

    def update(self, step: int, figures: dict) -> bool:
        """Take an evaluation; True when it is the new best."""
        value = figures.get(self.metric)
        if value is None or not math.isfinite(value):
            self.bad += 1
            return False
        if self.best is None or (value - self.best if self.higher else self.best - value) > self.min_delta:
            self.best, self.best_step, self.bad = value, step, 0
            return True
        self.bad += 1
        return False

    @property
    def exhausted(self) -> bool:
        return self.patience > 0 and self.bad >= self.patience


def selection_at(cfg: RunConfig, out_dir: Path, start: int) -> Selection | None:
    """train.early_stopping's state at step `start`: rebuilt from the eval rows logged up to it (a resume),
    and a best student saved after it (by evaluations a resume replays) forgotten."""
    es = cfg.train.early_stopping
    if es is None:
        return None
    metric = "eval/exact_match" if es.metric == "exact_match" else "eval/ce"
    sel = Selection(
        metric=metric, higher=es.metric == "exact_match", min_delta=es.min_delta, patience=es.patience
    )
    path = out_dir / "metrics.jsonl"
    seen: set[int] = set()
    for line in path.read_text().splitlines() if (start and path.is_file()) else []:
        row = json.loads(line)
        if row.get("split") == "eval" and row["step"] <= start and row["step"] not in seen:
            seen.add(row["step"])
            sel.update(int(row["step"]), row)
    best = out_dir / "best.json"
    if best.is_file() and (sel.best_step is None or json.loads(best.read_text())["step"] != sel.best_step):
        best.unlink()
    return sel
