"""One optimizer step: grad_accum micro-batches through the objective, the backward, gradient clipping, the
update, and the step's metrics row (means over micro-batches and processes); the optimizer's parameter
groups."""

from __future__ import annotations

import logging
import math
import time

import torch

from kvdistill.config import RunConfig
from kvdistill.train.divergence import NonFiniteLoss, stop_if_non_finite
from kvdistill.train.run import Run

log = logging.getLogger(__name__)


def param_groups(objective, cfg: RunConfig):
    student, other = [], []
    for name, p in objective.named_parameters():
        if p.requires_grad:
            (student if name.startswith("student.") else other).append(p)
    groups = [{"params": student, "lr": cfg.train.lr, "name": "student"}]
    if other:
        groups.append({"params": other, "lr": cfg.train.projector_lr or cfg.train.lr, "name": "maps"})
    return groups


def optimizer_step(run: Run, step: int) -> dict:
    """One optimizer step over grad_accum micro-batches -> its metrics row (means over micro-batches and
    processes; tokens: sums), with step, lr (the student's, as used), tokens_per_s and elapsed_s. The
    micro-batches come from `run.batches` (collated, this step's next ones)."""
    cfg, accelerator = run.cfg, run.accelerator
    sums: dict[str, float] = {}
    step_ids: list[str] = []
    step_t0 = time.time()
    lr = run.scheduler.get_last_lr()[0]  # the student's lr for this step
    run.inner.train_step = step  # what step-dependent terms (the logit KD τ schedule) read
    for micro in range(cfg.train.grad_accum):
        batch = next(run.batches)
        records = batch.records
        step_ids += [r["id"] for r in records]
        with accelerator.accumulate(run.objective):
            loss, metrics = run.objective(batch)
            stop_if_non_finite(accelerator, float(loss.detach()), metrics, step, micro, records)
            every = cfg.train.grad_norms_every
            if every and micro == 0 and (step + 1) % every == 0:
                metrics.update(_term_grad_norms(run))
            run.inner.last_terms = {}
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                metrics["grad_norm"] = _clip_gradients(run, step, metrics, step_ids)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v
    run.scheduler.step()
    row = _mean_row(accelerator, sums, cfg.train.grad_accum)
    run.tokens_seen += int(row["tokens"])
    row.update(
        step=step + 1,
        lr=lr,
        tokens_per_s=row["tokens"] / (time.time() - step_t0),
        elapsed_s=time.time() - run.t0,
    )
    return row


def report_memory(run: Run) -> None:
    """The memory report of every process (`kvdistill.train.memory`) after the first step run: logged by the
    main process, kept for summary.json."""
    from accelerate.utils import gather_object

    from kvdistill.train.memory import memory_report

    mine = {
        "process": run.accelerator.process_index,
        **memory_report(run.inner, run.optimizer, run.accelerator.device),
    }
    run.memory = gather_object([mine]) if run.accelerator.num_processes > 1 else [mine]
    if run.main:
        for r in run.memory:
            peak = (
                ""
                if r["peak_allocated_bytes"] is None
                else f", peak allocated {r['peak_allocated_bytes'] / 2**20:.1f} MiB"
            )
            log.info(
                "memory of process %d after step %d: student %.1f MiB, maps %.1f MiB, teachers %.1f MiB, "
                "gradients %.1f MiB, optimizer state %.1f MiB%s",
                r["process"],
                run.start + 1,
                r["student_params_bytes"] / 2**20,
                r["maps_params_bytes"] / 2**20,
                r["teacher_params_bytes"] / 2**20,
                r["grad_bytes"] / 2**20,
                r["optimizer_state_bytes"] / 2**20,
                peak,
            )


def _term_grad_norms(run: Run) -> dict[str, float]:
    """The L2 norm of each loss term's gradient w.r.t. the student's parameters (`grad_norm/ce`,
    `grad_norm/kd`), from the objective's graph-attached per-term means of this micro-batch
    (`Objective.last_terms`), before clipping; the graph is kept for the step's own backward."""
    params = [p for p in run.inner.student.parameters() if p.requires_grad]
    out = {}
    for name, term in run.inner.last_terms.items():
        if not term.requires_grad:
            continue
        grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        out[f"grad_norm/{name}"] = float(
            torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g.float()) for g in grads if g is not None])
            )
        )
    return out


def _clip_gradients(run: Run, step: int, metrics: dict, step_ids: list[str]) -> float:
    """Clip to max_grad_norm; the norm before clipping. Refuses a non-finite norm (but fp16's loss scaler
    skips such steps itself). Gradients are reduced over processes by now: every process sees one norm."""
    cfg = run.cfg
    max_norm = cfg.train.max_grad_norm or math.inf
    norm = (
        run.sharded.clip(max_norm)
        if run.sharded
        else float(run.accelerator.clip_grad_norm_(run.objective.parameters(), max_norm))
    )
    if not math.isfinite(norm) and cfg.train.mixed_precision != "fp16":
        raise NonFiniteLoss(
            f"gradient norm is {norm} at step {step + 1} (loss "
            f"{metrics['loss']:.4g}; samples of this process {step_ids})",
            step=step + 1,
            ids=step_ids,
        )
    return norm


STEP_SUMS = (
    "tokens",
    "grad_norm",
    "on_policy/new_tokens",
    "on_policy/generate_s",
)  # not averaged over micro-batches
PROCESS_SUMS = ("tokens", "on_policy/new_tokens")  # summed over processes (the others: means)


def _mean_row(accelerator, sums: dict[str, float], n: int) -> dict[str, float]:
    """Per-step sums over n micro-batches -> means (tokens, the on-policy generation's tokens and seconds:
    sums; grad_norm: as is), then over processes (token counts summed, the rest averaged)."""
    row = {k: (v if k in STEP_SUMS or k.startswith("grad_norm") else v / n) for k, v in sums.items()}
    world = accelerator.num_processes
    if world > 1:  # mean over processes (tokens: sum), so the row describes the whole combined batch
        keys = list(row)  # the same keys in the same order on every process
        total = accelerator.reduce(
            torch.tensor([row[k] for k in keys], device=accelerator.device), reduction="sum"
        )
        row = {
            k: float(v) if k in PROCESS_SUMS else float(v) / world for k, v in zip(keys, total, strict=True)
        }
    return row
