"""The Accelerator of a run (devices, DDP, mixed precision, trackers) and running a step on the main process
only."""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kvdistill.config import RunConfig
from kvdistill.errors import KvdistillError


def on_main(accelerator, fn: Callable[[], Any]) -> Any:
    """fn() on the main process only; its result, or the KvdistillError it raised, on every process (so no
    process goes on alone or is left waiting for the others)."""
    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 (re-raised below, on every process)
            error = err
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        shared = [
            (
                result,
                None
                if error is None
                else (getattr(error, "problem", f"process 0: {error!r}"), getattr(error, "fix", None)),
            )
        ]
        broadcast_object_list(shared, from_process=0)
        result, message = shared[0]
        if error is None and message is not None:
            error = KvdistillError(*message)
    if error is not None:
        raise error
    return result


def make_accelerator(cfg: RunConfig, out_dir: Path):
    """A fresh Accelerator for this run with its trackers (not started yet), refusing a launch that Accelerate
    did not see as one."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedDataParallelKwargs

    # some maps may get no gradient in a config (e.g. value maps when only the cosine term on keys is on)
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    # Accelerate keeps its settings per process; one process may run several trainings (curriculum phases,
    # the quickstart's CE-only twin) with their own mixed precision and accumulation: forget the previous
    # run's (private API, the process group itself is kept)
    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        cpu=launched > 1 and not _hasmake_accelerator(),
        gradient_accumulation_steps=cfg.train.grad_accum,
        kwargs_handlers=[ddp],
        log_with=_trackers(cfg, out_dir) or None,
    )
    if accelerator.num_processes != launched:
        raise KvdistillError(
            f"launched as {launched} processes (WORLD_SIZE) but Accelerate set up "
            f"{accelerator.num_processes} "
            f"({accelerator.distributed_type}): each process would train alone and overwrite the others' "
            "files",
            "launch with `torchrun --nproc_per_node N` or `accelerate launch` configured for N processes",
        )
    if accelerator.num_processes > 1:
        atexit.register(destroy_process_group)  # registering twice is harmless: it checks first
    return accelerator


def _trackers(cfg: RunConfig, out_dir: Path) -> list:
    """Accelerate's trackers for train.report_to, each told where to write (see `TrainConfig.report_to`)."""
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, TrackioTracker, WandBTracker

    made = []
    for name in cfg.train.trackers:
        if name == "tensorboard":
            made.append(TensorBoardTracker("tb", out_dir))
        elif name == "wandb":
            mode = {} if "WANDB_MODE" in os.environ else {"mode": "offline"}
            made.append(WandBTracker("kvdistill", name=cfg.name, dir=str(out_dir), **mode))
        elif name == "mlflow":
            made.append(MLflowTracker("kvdistill", run_name=cfg.name))
        elif name == "trackio":
            made.append(TrackioTracker("kvdistill", name=cfg.name))
    return made


def destroy_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _hasmake_accelerator() -> bool:
    """A GPU (or other accelerator) is present; without one, Accelerate must be told to run DDP on CPU
    (gloo)."""
    if hasattr(torch, "accelerator"):
        return torch.accelerator.is_available()
    return torch.cuda.is_available()
