"""The training loop: Accelerate for devices, DDP and mixed precision; checkpoints that resume exactly.

Batching: optimizer step s consumes the samples stream[s·G : (s+1)·G] with G = batch_size · grad_accum ·
world_size, where `stream` is a seeded permutation per epoch. Micro-batch m of rank r takes its own slice, so
one process with batch 4 and two processes with batch 2 (or batch 1 × accumulation 4) see the same samples.
Every loss is a mean over samples of per-sample means, so those runs give the same update.

A run is `setup` (check every input, build accelerator, data, objective, optimizer, scheduler, resume state)
→ `fit` (the optimizer steps) → `finish` (last checkpoint, final student, evaluation, summary); `train` calls
the three. Checkpoints (`DIR/checkpoints/step-N/`) and `DIR/final/` are written by `kvdistill.train.checkpoint`
(layout there): under a temporary name, fsynced, renamed when complete, so a crash never leaves a
half-written directory.

Launch: one process, or `torchrun --nproc_per_node N` / `accelerate launch` (DDP; on a machine without a GPU
the processes use gloo on CPU). Every input is checked before the run directory is written. A NaN/inf loss on
any process, or a non-finite gradient norm, stops every process before the update, naming the step and samples;
the last checkpoint stays as it was (continue with `--resume`). `metrics.jsonl` rows are means over micro-batches
and processes (`tokens`: sums), `lr` the student's learning rate used in that step.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvdistill.cache.manifest import write_json_atomic
from kvdistill.config import RunConfig, dump_config, semantic_problems
from kvdistill.errors import ConfigError, KvdistillError
from kvdistill.train.checkpoint import (
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    save_final_student,
)

__all__ = ["NonFiniteLoss", "Run", "fit", "finish", "latest_checkpoint", "micro_batch", "sample_stream", "setup",
           "train"]


class NonFiniteLoss(KvdistillError):
    """A NaN/inf loss or gradient norm: the run stopped before the update."""


def sample_stream(num_records: int, seed: int, start: int, count: int) -> list[int]:
    """Indices start..start+count of the endless stream of per-epoch seeded permutations of range(n)."""
    out = []
    pos = start
    while len(out) < count:
        epoch, offset = divmod(pos, num_records)
        perm = torch.randperm(num_records, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        take = min(count - len(out), num_records - offset)
        out.extend(perm[offset : offset + take].tolist())
        pos += take
    return out


def micro_batch(records: list[dict], cfg: RunConfig, step: int, micro: int, rank: int, world: int) -> list[dict]:
    """The records of micro-batch `micro` of process `rank` (of `world`) in optimizer step `step`.

    The order is seeded by data.seed and train.seed together, so runs that differ only in train.seed (the seeds
    of an experiment) see the same records in different orders, and runs with the same seeds the same order."""
    b, accum = cfg.train.batch_size, cfg.train.grad_accum
    per_step = b * accum * world
    order_seed = cfg.data.seed + 1_000_003 * cfg.train.seed  # = data.seed when train.seed is 0 (as before)
    ids = sample_stream(len(records), order_seed, step * per_step, per_step)
    lo = (micro * world + rank) * b
    return [records[i] for i in ids[lo : lo + b]]


def _param_groups(objective, cfg: RunConfig):
    student, other = [], []
    for name, p in objective.named_parameters():
        if p.requires_grad:
            (student if name.startswith("student.") else other).append(p)
    groups = [{"params": student, "lr": cfg.train.lr, "name": "student"}]
    if other:
        groups.append({"params": other, "lr": cfg.train.projector_lr or cfg.train.lr, "name": "maps"})
    return groups


class MetricsLog:
    """metrics.jsonl (+ TensorBoard) on the main process."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tb"))
            except ImportError:  # tensorboard not installed: JSONL only
                self.tb = None

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            prefix = "eval/" if row.get("split") == "eval" else "train/"
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(prefix + key if not key.startswith("eval/") else key, value, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _truncate_log(path: Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint so the log matches an uninterrupted run."""
    if not path.is_file():
        return
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= step))


@dataclass
class Run:
    """What a training run holds between `setup`, `fit` and `finish`."""

    cfg: RunConfig
    out_dir: Path
    accelerator: Any
    objective: Any  # as prepared by Accelerate (DDP-wrapped when launched on several processes): the loss
    inner: Any  # the unwrapped objective: evaluate, save_student
    optimizer: Any
    scheduler: Any
    train_records: list[dict]
    eval_records: list[dict]
    log: MetricsLog
    start: int  # the first optimizer step to run (0, or the resumed checkpoint's step)
    end: int  # run steps start..end-1: cfg.train.steps, or fewer with stop_after
    tokens_seen: int = 0
    last_good: Path | None = None  # the newest checkpoint written or resumed from
    t0: float = field(default_factory=time.time)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def train(cfg: RunConfig, out_dir: str | Path, *, resume: bool = False, stop_after: int | None = None,
          init_student: str | None = None, progress: bool = True) -> dict:
    """Run (or resume) training; returns the summary also written to DIR/summary.json.

    `stop_after`: stop after this many optimizer steps as if interrupted (checkpoint written), for resumption.
    `init_student`: start from this student directory instead of `cfg.student` (curriculum phases).
    """
    run = setup(cfg, out_dir, resume=resume, stop_after=stop_after, init_student=init_student)
    try:
        fit(run, progress=progress)
        summary = finish(run)
    finally:
        run.log.close()
    # not end_training(): it destroys the process group, which the next run in this process (a curriculum
    # phase) still needs; the group is destroyed when the process exits
    run.accelerator.wait_for_everyone()
    return summary


def setup(cfg: RunConfig, out_dir: str | Path, *, resume: bool = False, stop_after: int | None = None,
          init_student: str | None = None) -> Run:
    """Check every input, then build the run: accelerator, data, objective (fitted maps prepared), optimizer,
    scheduler and, with `resume`, the state of the newest complete checkpoint.

    Nothing is written before every input is checked; then the main process writes config.yaml, plan.json
    and alignment_sample.json.
    """
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    from kvdistill.data import load_records
    from kvdistill.objectives import build_objective

    out_dir = Path(out_dir)
    accelerator = _accelerator(cfg)
    main = accelerator.is_main_process
    ckpt = _checkpoint_to_resume(out_dir, resume)
    problems = semantic_problems(cfg)  # teachers found, layer maps possible, data path present
    if problems:
        raise ConfigError(problems, source=f"config '{cfg.name}'")
    set_seed(cfg.train.seed)
    train_records = load_records(cfg.data, split="train")
    eval_records = load_records(cfg.data, split="eval") if cfg.data.eval_size else []

    objective = build_objective(cfg, device=accelerator.device, init_student=init_student)
    _check_positions(objective, cfg.data.max_length)
    # fitted (not trained) maps, e.g. the latent space: the same records, so the same maps, on every process
    objective.prepare(train_records[: cfg.fusion.latent.fit_samples])
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(dump_config(cfg))
        (out_dir / "plan.json").write_text(json.dumps(objective.plan(), indent=1))
        (out_dir / "alignment_sample.json").write_text(json.dumps(objective.alignment_sample(train_records[0])))
    optimizer = torch.optim.AdamW(_param_groups(objective, cfg), weight_decay=cfg.train.weight_decay)
    scheduler = get_scheduler(cfg.train.schedule, optimizer, num_warmup_steps=cfg.train.warmup_steps,
                              num_training_steps=cfg.train.steps)
    objective, optimizer = accelerator.prepare(objective, optimizer)

    start, tokens_seen = 0, 0
    if ckpt is not None:
        state = load_checkpoint(ckpt, accelerator=accelerator, scheduler=scheduler)
        start, tokens_seen = state["step"], state["tokens"]
        if main:
            _truncate_log(out_dir / "metrics.jsonl", start)
    return Run(
        cfg=cfg,
        out_dir=out_dir,
        accelerator=accelerator,
        objective=objective,
        inner=accelerator.unwrap_model(objective),
        optimizer=optimizer,
        scheduler=scheduler,
        train_records=train_records,
        eval_records=eval_records,
        log=MetricsLog(out_dir, main, cfg.train.tensorboard),
        start=start,
        end=cfg.train.steps if stop_after is None else min(cfg.train.steps, stop_after),
        tokens_seen=tokens_seen,
        last_good=ckpt,
    )


def _accelerator(cfg: RunConfig):
    """A fresh Accelerator for this run, refusing a launch that Accelerate did not see as one."""
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
        cpu=launched > 1 and not _has_accelerator(),
        gradient_accumulation_steps=cfg.train.grad_accum,
        kwargs_handlers=[ddp],
    )
    if accelerator.num_processes != launched:
        raise KvdistillError(
            f"launched as {launched} processes (WORLD_SIZE) but Accelerate set up {accelerator.num_processes} "
            f"({accelerator.distributed_type}): each process would train alone and overwrite the others' files",
            "launch with `torchrun --nproc_per_node N` or `accelerate launch` configured for N processes",
        )
    if accelerator.num_processes > 1:
        atexit.register(_destroy_process_group)  # registering twice is harmless: it checks first
    return accelerator


def _checkpoint_to_resume(out_dir: Path, resume: bool) -> Path | None:
    """With resume: the newest complete checkpoint (required). Without: refuse an --out holding a run."""
    if resume:
        ckpt = latest_checkpoint(out_dir)
        if ckpt is None:
            raise KvdistillError(
                f"--resume: no complete checkpoint in {out_dir}/checkpoints",
                "start without --resume, or point --out at the run to continue",
            )
        return ckpt
    # checked on every process, so none is left waiting for the others
    held = [name for name in ("metrics.jsonl", "checkpoints", "final") if (out_dir / name).exists()]
    if held:
        raise KvdistillError(
            f"--out {out_dir} already holds a run ({', '.join(held)})",
            "pass --resume to continue it, or choose another --out",
        )
    return None


def fit(run: Run, *, progress: bool = True) -> None:
    """Optimizer steps run.start .. run.end - 1: metrics rows, evaluations every eval_every steps and a
    checkpoint every save_every steps (the one of the last step is `finish`'s).

    Raises NonFiniteLoss on every process before an update with a NaN/inf loss or gradient norm.
    """
    from tqdm.auto import tqdm

    cfg = run.cfg
    bar = tqdm(total=cfg.train.steps, initial=run.start, disable=not (run.main and progress), desc=cfg.name,
               dynamic_ncols=True)
    run.t0 = time.time()
    run.objective.train()
    try:
        for step in range(run.start, run.end):
            row = _step(run, step)
            if (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.steps:
                run.log.write(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
            bar.update(1)
            if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0 and run.eval_records:
                run.log.write({"step": step + 1, "split": "eval", **run.inner.evaluate(run.eval_records)})
            if cfg.train.save_every and (step + 1) % cfg.train.save_every == 0 and step + 1 < run.end:
                _save(run, step + 1)
    finally:
        bar.close()


def _step(run: Run, step: int) -> dict:
    """One optimizer step over grad_accum micro-batches -> its metrics row (means over micro-batches and
    processes; tokens: sums), with step, lr (the student's, as used), tokens_per_s and elapsed_s."""
    cfg, accelerator = run.cfg, run.accelerator
    world, rank = accelerator.num_processes, accelerator.process_index
    sums: dict[str, float] = {}
    step_ids: list[str] = []
    step_t0 = time.time()
    lr = run.scheduler.get_last_lr()[0]  # the student's lr for this step
    for micro in range(cfg.train.grad_accum):
        records = micro_batch(run.train_records, cfg, step, micro, rank, world)
        step_ids += [r["id"] for r in records]
        with accelerator.accumulate(run.objective):
            loss, metrics = run.objective(records)
            _stop_if_non_finite(accelerator, float(loss.detach()), metrics, step, micro, records, run.last_good)
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
    row.update(step=step + 1, lr=lr, tokens_per_s=row["tokens"] / (time.time() - step_t0),
               elapsed_s=time.time() - run.t0)
    return row


def _clip_gradients(run: Run, step: int, metrics: dict, step_ids: list[str]) -> float:
    """Clip to max_grad_norm; the norm before clipping. Refuses a non-finite norm (but fp16's loss scaler
    skips such steps itself). Gradients are reduced over processes by now: every process sees one norm."""
    cfg = run.cfg
    norm = float(run.accelerator.clip_grad_norm_(run.objective.parameters(), cfg.train.max_grad_norm or math.inf))
    if not math.isfinite(norm) and cfg.train.mixed_precision != "fp16":
        raise NonFiniteLoss(
            f"gradient norm is {norm} at step {step + 1} (loss "
            f"{metrics['loss']:.4g}; samples of this process {step_ids})",
            f"training stopped before the update; last good checkpoint: "
            f"{run.last_good or 'none written yet'}. Lower train.lr, or check those samples",
        )
    return norm


def _mean_row(accelerator, sums: dict[str, float], n: int) -> dict[str, float]:
    """Per-step sums over n micro-batches -> means (tokens, grad_norm: as summed / as is), then over processes."""
    row = {k: (v if k in ("tokens", "grad_norm") else v / n) for k, v in sums.items()}
    world = accelerator.num_processes
    if world > 1:  # mean over processes (tokens: sum), so the row describes the whole combined batch
        keys = list(row)  # the same keys in the same order on every process
        total = accelerator.reduce(torch.tensor([row[k] for k in keys], device=accelerator.device), reduction="sum")
        row = {k: float(v) if k == "tokens" else float(v) / world for k, v in zip(keys, total, strict=True)}
    return row


def _save(run: Run, step: int) -> None:
    """Checkpoint of `step` (every process takes part); it becomes the last good one."""
    path = checkpoint_path(run.out_dir, step)
    save_checkpoint(path, accelerator=run.accelerator, objective=run.inner, scheduler=run.scheduler,
                    trainer_state={"step": step, "tokens": run.tokens_seen, "config_name": run.cfg.name})
    run.last_good = path


def finish(run: Run) -> dict:
    """Checkpoint the last step run; when every configured step is done (not stopped by stop_after), also
    the final student, an evaluation (with eval data) and summary.json. Returns the summary."""
    _save(run, run.end)
    summary = {"steps": run.end, "tokens": run.tokens_seen, "elapsed_s": time.time() - run.t0}
    if run.end == run.cfg.train.steps:
        if run.main:
            save_final_student(run.out_dir, run.inner)
        if run.eval_records:
            ev = run.inner.evaluate(run.eval_records)
            summary.update(ev)
            run.log.write({"step": run.end, "split": "eval", **ev})
        if run.main:
            write_json_atomic(run.out_dir / "summary.json", summary)
    return summary


def _destroy_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _has_accelerator() -> bool:
    """A GPU (or other accelerator) is present; without one, Accelerate must be told to run DDP on CPU (gloo)."""
    if hasattr(torch, "accelerator"):
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


def _check_positions(objective, max_length: int) -> None:
    """Refuse, before any step, a data.max_length that some model cannot take (its position table is shorter)."""
    models = [("student", objective.student_geometry)] + [(f"teacher '{t.name}'", t.geometry)
                                                          for t in objective.teachers]
    short = [(who, g.max_positions) for who, g in models if g.max_positions and g.max_positions < max_length]
    if short:
        limit = min(m for _, m in short)
        raise KvdistillError(
            f"data.max_length = {max_length} is longer than the maximum positions of "
            + ", ".join(f"{who} ({m})" for who, m in short),
            f"set data.max_length to at most {limit} (texts are truncated to it), or use models with longer contexts",
        )


def _stop_if_non_finite(accelerator, loss: float, metrics: dict, step: int, micro: int, records: list[dict],
                        last_good: Path | None) -> None:
    """Raise NonFiniteLoss on every process when the loss of any process is NaN/inf (before any backward).

    The failing process's samples are named; the others learn which process failed, so none of them is left
    waiting in the gradient all-reduce.
    """
    bad = not math.isfinite(loss)
    mine = (accelerator.process_index, loss, [r["id"] for r in records],
            sorted(k for k, v in metrics.items() if not math.isfinite(v)))
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
        parts.append(f"loss is {value}{on} at step {step + 1}, micro-batch {micro} (samples {ids}); "
                     f"non-finite terms: {terms or 'total only'}")
    raise NonFiniteLoss(
        "; ".join(parts),
        f"training stopped before the update; last good checkpoint: {last_good or 'none written yet'} "
        "(continue from it with --resume). Lower train.lr, or check those samples",
    )
