"""metrics.jsonl and the trackers of a training run (train.report_to, through Accelerate)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from kvdistill.atomic import write_text_atomic
from kvdistill.config import RunConfig
from kvdistill.paths import open_append

log = logging.getLogger(__name__)


class MetricsLog:
    """metrics.jsonl and the trackers of train.report_to (through Accelerate), on the main process.

    Tracker names: a teacher's terms under teacher/<name>/ (loss/kv/<name> -> teacher/<name>/kv, weight/<name>
    -> teacher/<name>/weight, eval/kv_error/<name> -> teacher/<name>/eval_kv_error), other training figures
    under train/, held-out ones under eval/; per-layer lists go to metrics.jsonl only.
    """

    def __init__(self, out_dir: Path, enabled: bool, accelerator=None, cfg: RunConfig | None = None):
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.accelerator = accelerator if accelerator is not None and accelerator.log_with else None
        self.teachers = {t.name for t in cfg.teachers} if cfg is not None else set()
        if self.accelerator is not None:
            if "mlflow" in cfg.train.trackers and "MLFLOW_TRACKING_URI" not in os.environ:
                import mlflow

                mlflow.set_tracking_uri((out_dir / "mlruns").resolve().as_uri())
            self.accelerator.init_trackers("kvdistill")
            settings = _flat(json.loads(json.dumps(cfg.model_dump(mode="json"))))
            for tracker in self.accelerator.trackers:
                if tracker.name != "tensorboard":  # its hparams would add a run folder per start
                    tracker.store_init_configuration(settings)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open_append(self.path) as f:  # a symlink planted at the name is refused, never followed
            f.write(json.dumps(row) + "\n")
        if self.accelerator is not None:
            values = {
                self.tracker_key(k, row.get("split") == "eval"): v
                for k, v in row.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"
            }
            self.accelerator.log(values, step=row["step"])

    def tracker_key(self, key: str, held_out: bool) -> str:
        parts = key.split("/")
        if len(parts) >= 2 and parts[-1] in self.teachers:
            if parts[0] == "loss" and len(parts) == 3:
                return f"teacher/{parts[-1]}/{parts[1]}"
            if parts[0] == "weight" and len(parts) == 2:
                return f"teacher/{parts[-1]}/weight"
            if parts[0] == "eval":
                return f"teacher/{parts[-1]}/{'_'.join(parts[:-1])}"
        return key if key.startswith("eval/") else ("eval/" if held_out else "train/") + key

    def close(self) -> None:
        if self.accelerator is not None:
            for tracker in self.accelerator.trackers:
                tracker.finish()
            self.accelerator.trackers = []


def _flat(tree: dict, prefix: str = "") -> dict:
    """A nested config as {dotted key: bool | int | float | str} (lists and None as text), what trackers
    take."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
    return out


def truncate_log(path: Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint so the log matches an uninterrupted run (a line cut
    short by a kill is dropped too); rewritten atomically."""
    if not path.is_file():
        return
    kept, unreadable = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            unreadable += int(bool(line.strip()))
            continue
        if row["step"] <= step:
            kept.append(json.dumps(row) + "\n")
    if unreadable:
        log.warning("%s: dropped %d unreadable line(s) (cut short by a kill?)", path, unreadable)
    write_text_atomic(path, "".join(kept))
