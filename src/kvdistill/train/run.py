"""What a training run holds between `setup`, `fit` and `finish` (`kvdistill.train.trainer`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvdistill.config import RunConfig
from kvdistill.objectives.base import TrainingObjective
from kvdistill.train.distributed import Sharded
from kvdistill.train.metrics_log import MetricsLog
from kvdistill.train.resume import RunLock
from kvdistill.train.selection import Selection


@dataclass
class Run:
    """What a training run holds between `setup`, `fit` and `finish`."""

    cfg: RunConfig
    out_dir: Path
    accelerator: Any
    objective: Any  # as prepared by Accelerate (DDP-wrapped when launched on several processes): the loss
    inner: TrainingObjective  # the unwrapped objective: evaluate, save_student
    optimizer: Any
    scheduler: Any
    train_records: list[dict]
    eval_records: list[dict]
    log: MetricsLog
    start: int  # the first optimizer step to run (0, or the resumed checkpoint's step)
    end: int  # run steps start..end-1: cfg.train.steps, or fewer with stop_after
    tokens_seen: int = 0
    last_good: Path | None = None  # the newest checkpoint written or resumed from
    lock: RunLock | None = None  # held by the main process from setup until `close`
    batches: Any = None  # during `fit`: the iterator of collated micro-batches (`train.loader`)
    t0: float = field(default_factory=time.time)
    eval_s: float = 0.0  # seconds spent in held-out evaluations since t0 (train_s = elapsed - eval_s)
    selection: Selection | None = None  # train.early_stopping's state
    last_eval: tuple[int, dict] | None = None  # (step, figures) of the newest evaluation
    sharded: Sharded | None = None  # train.distributed fsdp on several processes: the sharded student
    memory: list[dict] | None = None  # the memory report of every process after the first step run

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def close(self) -> None:
        """Close the metrics log and give the run directory's lock back (idempotent)."""
        try:
            self.log.close()
        finally:
            if self.lock is not None:
                self.lock.release()
