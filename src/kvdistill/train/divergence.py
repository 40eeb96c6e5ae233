"""A NaN/inf loss or gradient norm: every process stops before the update, and the advice names the cause it
finds (non-finite config numbers, a damaged cache, non-finite weights) and where to resume from."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from kvdistill.config import RunConfig
from kvdistill.errors import KvdistillError
from kvdistill.train.accelerator import on_main
from kvdistill.train.checkpoint import checkpoint_path, latest_checkpoint, list_checkpoints, set_aside
from kvdistill.train.run import Run


class NonFiniteLoss(KvdistillError):
    """A NaN/inf loss or gradient norm at optimizer step `step` (1-based): the run stopped before the
    update."""

    def __init__(
        self, problem: str, fix: str | None = None, *, step: int | None = None, ids: list[str] | None = None
    ):
        super().__init__(problem, fix)
        self.step = step
        self.ids = list(ids or [])  # the samples of the failing process's step


def stop_if_non_finite(
    accelerator,
    loss: float,
    metrics: dict,
    step: int,
    micro: int,
    records: list[dict],
    last_good: Path | None = None,
) -> None:
    """Raise NonFiniteLoss on every process when the loss of any process is NaN/inf (before any backward).

    The failing process's samples are named; the others learn which process failed, so none of them is left
    waiting in the gradient all-reduce.
    """
    bad = not math.isfinite(loss)
    mine = (
        accelerator.process_index,
        loss,
        [r["id"] for r in records],
        sorted(k for k, v in metrics.items() if not math.isfinite(v)),
    )
    world = accelerator.num_processes
    if world > 1:
        flag = accelerator.reduce(torch.tensor([float(bad)], device=accelerator.device), reduction="sum")
        if float(flag[0]) == 0:
            return
        from accelerate.utils import gather_object

        where = gather_object([mine] if bad else [])
    elif not bad:
        return
    else:
        where = [mine]
    parts = []
    for proc, value, ids, terms in where:
        on = f" on process {proc}" if world > 1 else ""
        terms = [t for t in terms if t != "loss"]
        parts.append(
            f"loss is {value}{on} at step {step + 1}, micro-batch {micro} (samples {ids}); "
            f"non-finite terms: {terms or 'total only'}"
        )
    raise NonFiniteLoss("; ".join(parts), step=step + 1, ids=[i for _, _, ids, _ in where for i in ids])


def nonfinite_config(cfg: RunConfig) -> list[str]:
    """Dotted keys of the config's non-finite numbers (refused when a config is read; a config built in code
    with model_construct skips that)."""
    found = []

    def walk(node, key):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{key}.{i}")
        elif isinstance(node, float) and not math.isfinite(node):
            found.append(f"{key} = {node}")

    walk(cfg.model_dump(), "")
    return found


def nonfinite_inputs(run: Run, ids: list[str]) -> list[str]:
    """The cached teacher K/V of samples `ids` that hold NaN/inf (what a damaged or badly extracted cache
    feeds the loss), as 'teacher t, sample s: keys_l0'."""
    found = []
    for teacher in run.inner.teachers:
        if teacher.kind != "cache":
            continue
        reader = teacher.reader
        for sid in ids:
            try:
                tensors = reader.get(sid)
            except KvdistillError:
                continue
            bad = [
                n for n, x in tensors.items() if x.is_floating_point() and not bool(torch.isfinite(x).all())
            ]
            if bad:
                found.append(
                    f"teacher '{teacher.name}' (cache {reader.dir}), sample {sid!r}: {', '.join(bad)}"
                )
    return found


def nonfinite_weights(run: Run) -> list[str]:
    return [name for name, p in run.inner.named_parameters() if not bool(torch.isfinite(p.detach()).all())]


def diverged(run: Run, err: NonFiniteLoss) -> NonFiniteLoss:
    """`err` (raised at step s on every process) with advice that names the cause it finds: a non-finite
    number in the config, non-finite teacher inputs (a damaged cache), or non-finite weights. Where the config
    and the inputs are finite, the weights of step s-1 gave the non-finite value, and a resume is exact, so
    from them it comes back at any lr: their checkpoint, if saved, is set aside (step-N.diverged, kept); the
    advice names the newest checkpoint before it and the lower train.lr to resume with."""
    in_config = nonfinite_config(run.cfg)
    if in_config:
        return NonFiniteLoss(
            f"{err.problem}; cause: the config holds non-finite numbers ({'; '.join(in_config)})",
            "give those keys finite values (the checkpoints are fine; nothing was set aside), "
            "then rerun with --resume",
            step=err.step,
            ids=err.ids,
        )
    inputs = nonfinite_inputs(run, err.ids)
    if inputs:
        return NonFiniteLoss(
            f"{err.problem}; cause: non-finite teacher K/V in the input ({'; '.join(inputs[:5])})",
            "the cache is damaged, not the run (nothing was set aside): run `kvdistill cache "
            "verify` on it and re-extract it, then rerun with --resume",
            step=err.step,
            ids=err.ids,
        )
    weights = nonfinite_weights(run)
    if weights:
        shown = ", ".join(weights[:3]) + (f" and {len(weights) - 3} more" if len(weights) > 3 else "")
        err = NonFiniteLoss(
            f"{err.problem}; cause: non-finite weights before the step ({shown})", step=err.step, ids=err.ids
        )
    poisoned = checkpoint_path(run.out_dir, err.step - 1)
    aside = on_main(
        run.accelerator,
        lambda: set_aside(poisoned, "diverged") if poisoned in list_checkpoints(run.out_dir) else None,
    )
    before = latest_checkpoint(run.out_dir)
    lr = run.cfg.train.lr
    retry = f"rerun the same command with --resume train.lr={lr / 10:g} (now {lr:g}) or lower"
    advice = ["training stopped before the update"]
    if aside is not None:
        advice.append(
            f"the weights saved at step {err.step - 1} gave this and would again at any lr, so that "
            f"checkpoint was set aside as {aside}"
        )
    if before is not None:
        advice.append(
            f"the last checkpoint saved before the divergence is {before}: to continue from it with a "
            f"lower learning rate, {retry}"
        )
    else:
        advice.append(
            f"no checkpoint was saved before the divergence: {retry} to train the run again from step 0 "
            "with a lower learning rate"
        )
    advice.append("or check those samples")
    return NonFiniteLoss(err.problem, "; ".join(advice), step=err.step)
