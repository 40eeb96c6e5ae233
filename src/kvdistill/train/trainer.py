"""The training loop: Accelerate for devices, DDP and mixed precision; checkpoints that resume exactly.

Batching: optimizer step s consumes the samples stream[s·G : (s+1)·G] with G = batch_size · grad_accum ·
world_size, where `stream` is a seeded permutation per epoch. Micro-batch m of rank r takes its own slice, so
one process with batch 4 and two processes with batch 2 (or batch 1 × accumulation 4) see the same samples.
Every loss is a mean over samples of per-sample means, so those runs give the same update.

Checkpoints (`DIR/checkpoints/step-N/`): `student/` (Hugging Face format), `state/` (Accelerate: model with
projectors and routers, optimizer, RNG), `scheduler.pt`, `trainer_state.json`. A checkpoint directory is written
under a temporary name and renamed when complete, so a crash never leaves a half-written `step-N`.

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
import shutil
import time
from pathlib import Path

import torch

from kvdistill.config import RunConfig, dump_config, semantic_problems
from kvdistill.errors import ConfigError, KvdistillError


class NonFiniteLoss(KvdistillError):
    pass


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


def micro_batch(
    records: list[dict], cfg: RunConfig, step: int, micro: int, rank: int, world: int
) -> list[dict]:
    b, accum = cfg.train.batch_size, cfg.train.grad_accum
    per_step = b * accum * world
    ids = sample_stream(len(records), cfg.data.seed, step * per_step, per_step)
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


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete `step-N` (a crash may leave `step-N.tmp` behind, which never counts)."""
    ckpts = [
        c
        for c in (out_dir / "checkpoints").glob("step-*")
        if c.name.split("-", 1)[1].isdigit() and (c / "trainer_state.json").is_file()
    ]
    return max(ckpts, key=lambda c: int(c.name.split("-", 1)[1]), default=None)


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
                    self.tb.add_scalar(
                        prefix + key if not key.startswith("eval/") else key, value, row["step"]
                    )

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _truncate_log(path: Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint so the log matches an uninterrupted run."""
    if not path.is_file():
        return
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= step))


def train(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    stop_after: int | None = None,
    init_student: str | None = None,
    progress: bool = True,
) -> dict:
    """Run (or resume) training; returns the summary also written to DIR/summary.json.

    `stop_after`: stop after this many optimizer steps as if interrupted (checkpoint written), for resumption.
    `init_student`: start from this student directory instead of `cfg.student` (curriculum phases).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedDataParallelKwargs, set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from kvdistill.data import load_records
    from kvdistill.train.objective import build_objective

    out_dir = Path(out_dir)
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
    main = accelerator.is_main_process
    ckpt = latest_checkpoint(out_dir) if resume else None
    if resume and ckpt is None:
        raise KvdistillError(
            f"--resume: no complete checkpoint in {out_dir}/checkpoints",
            "start without --resume, or point --out at the run to continue",
        )
    if not resume:  # checked on every process, so none is left waiting for the others
        held = [name for name in ("metrics.jsonl", "checkpoints", "final") if (out_dir / name).exists()]
        if held:
            raise KvdistillError(
                f"--out {out_dir} already holds a run ({', '.join(held)})",
                "pass --resume to continue it, or choose another --out",
            )
    # every input is checked before anything is written: a bad one leaves no run directory behind
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
        sample = objective.alignment_sample(train_records[0])
        (out_dir / "alignment_sample.json").write_text(json.dumps(sample))
    optimizer = torch.optim.AdamW(_param_groups(objective, cfg), weight_decay=cfg.train.weight_decay)
    scheduler = get_scheduler(
        cfg.train.schedule,
        optimizer,
        num_warmup_steps=cfg.train.warmup_steps,
        num_training_steps=cfg.train.steps,
    )
    objective, optimizer = accelerator.prepare(objective, optimizer)
    inner = accelerator.unwrap_model(objective)

    start = 0
    tokens_seen = 0
    if ckpt is not None:
        accelerator.load_state(str(ckpt / "state"))
        scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
        state = json.loads((ckpt / "trainer_state.json").read_text())
        start, tokens_seen = state["step"], state["tokens"]
        if main:
            _truncate_log(out_dir / "metrics.jsonl", start)
    log = MetricsLog(out_dir, main, cfg.train.tensorboard)
    last_good = ckpt

    def save(step: int) -> Path:
        nonlocal last_good
        final = out_dir / "checkpoints" / f"step-{step}"
        tmp = out_dir / "checkpoints" / f"step-{step}.tmp"
        if main and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp / "state"))
        accelerator.wait_for_everyone()  # every process has written its RNG state before tmp is renamed
        if main:
            inner.save_student(tmp / "student")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            (tmp / "trainer_state.json").write_text(
                json.dumps({"step": step, "tokens": tokens_seen, "config_name": cfg.name})
            )
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        accelerator.wait_for_everyone()
        last_good = final
        return final

    world, rank = accelerator.num_processes, accelerator.process_index
    bar = tqdm(
        total=cfg.train.steps,
        initial=start,
        disable=not (main and progress),
        desc=cfg.name,
        dynamic_ncols=True,
    )
    t0 = time.time()
    objective.train()
    end = cfg.train.steps if stop_after is None else min(cfg.train.steps, stop_after)
    try:
        for step in range(start, end):
            sums: dict[str, float] = {}
            step_ids: list[str] = []
            step_t0 = time.time()
            lr = scheduler.get_last_lr()[0]  # the student's lr for this step
            for micro in range(cfg.train.grad_accum):
                records = micro_batch(train_records, cfg, step, micro, rank, world)
                step_ids += [r["id"] for r in records]
                with accelerator.accumulate(objective):
                    loss, metrics = objective(records)
                    _stop_if_non_finite(
                        accelerator, float(loss.detach()), metrics, step, micro, records, last_good
                    )
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        norm = accelerator.clip_grad_norm_(
                            objective.parameters(), cfg.train.max_grad_norm or math.inf
                        )
                        metrics["grad_norm"] = float(norm)
                        # gradients are reduced over processes by now: every process sees the same norm;
                        # fp16's loss scaler skips such steps itself
                        if not math.isfinite(metrics["grad_norm"]) and cfg.train.mixed_precision != "fp16":
                            raise NonFiniteLoss(
                                f"gradient norm is {metrics['grad_norm']} at step {step + 1} (loss "
                                f"{metrics['loss']:.4g}; samples of this process {step_ids})",
                                f"training stopped before the update; last good checkpoint: "
                                f"{last_good or 'none written yet'}. Lower train.lr, or check those samples",
                            )
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + v
            scheduler.step()
            n = cfg.train.grad_accum
            row = {k: (v if k in ("tokens", "grad_norm") else v / n) for k, v in sums.items()}
            if world > 1:  # mean over processes (tokens: sum), so the row describes the whole combined batch
                keys = list(row)  # the same keys in the same order on every process
                total = accelerator.reduce(
                    torch.tensor([row[k] for k in keys], device=accelerator.device), reduction="sum"
                )
                row = {
                    k: float(v) if k == "tokens" else float(v) / world
                    for k, v in zip(keys, total, strict=True)
                }
            tokens_seen += int(row["tokens"])
            row.update(
                step=step + 1,
                lr=lr,
                tokens_per_s=row["tokens"] / (time.time() - step_t0),
                elapsed_s=time.time() - t0,
            )
            if (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.steps:
                log.write(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
            bar.update(1)
            if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0 and eval_records:
                log.write({"step": step + 1, "split": "eval", **inner.evaluate(eval_records)})
            if cfg.train.save_every and (step + 1) % cfg.train.save_every == 0 and step + 1 < end:
                save(step + 1)
        bar.close()
        save(end)
        summary = {"steps": end, "tokens": tokens_seen, "elapsed_s": time.time() - t0}
        if end == cfg.train.steps:
            if main:  # written under a temporary name, like checkpoints
                tmp = out_dir / "final.tmp"
                if tmp.exists():
                    shutil.rmtree(tmp)
                inner.save_student(tmp / "student")
                if (out_dir / "final").exists():
                    shutil.rmtree(out_dir / "final")
                tmp.rename(out_dir / "final")
            if eval_records:
                ev = inner.evaluate(eval_records)
                summary.update(ev)
                log.write({"step": end, "split": "eval", **ev})
            if main:
                (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    finally:
        bar.close()
        log.close()
    # not end_training(): it destroys the process group, which the next run in this process (a curriculum
    # phase) still needs; the group is destroyed when the process exits
    accelerator.wait_for_everyone()
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
    models = [("student", objective.student_geometry)] + [
        (f"teacher '{t.name}'", t.geometry) for t in objective.teachers
    ]
    short = [(who, g.max_positions) for who, g in models if g.max_positions and g.max_positions < max_length]
    if short:
        limit = min(m for _, m in short)
        raise KvdistillError(
            f"data.max_length = {max_length} is longer than the maximum positions of "
            + ", ".join(f"{who} ({m})" for who, m in short),
            f"set data.max_length to at most {limit} (texts are truncated to it), or use models with longer contexts",
        )


def _stop_if_non_finite(
    accelerator,
    loss: float,
    metrics: dict,
    step: int,
    micro: int,
    records: list[dict],
    last_good: Path | None,
) -> None:
    """Raise NonFiniteLoss on every process when the loss of any process is NaN/inf (before any backward).

    The failing process's samples are named; the others learn which process failed, so none of them is left
    waiting in the gradient all-reduce.
    """
    bad = not math.isfinite(loss)
    world = accelerator.num_processes
    if world > 1:
        flag = accelerator.reduce(torch.tensor([float(bad)], device=accelerator.device), reduction="sum")
        if float(flag[0]) == 0:
            return
        from accelerate.utils import gather_object

        where = gather_object(
            [
                (
                    accelerator.process_index,
                    loss,
                    [r["id"] for r in records],
                    sorted(k for k, v in metrics.items() if not math.isfinite(v)),
                )
            ]
            if bad
            else []
        )
    elif not bad:
        return
    else:
        where = [
            (
                0,
                loss,
                [r["id"] for r in records],
                sorted(k for k, v in metrics.items() if not math.isfinite(v)),
            )
        ]
    parts = []
    for proc, value, ids, terms in where:
        on = f" on process {proc}" if world > 1 else ""
        terms = [t for t in terms if t != "loss"]
        parts.append(
            f"loss is {value}{on} at step {step + 1}, micro-batch {micro} (samples {ids}); "
            f"non-finite terms: {terms or 'total only'}"
        )
    raise NonFiniteLoss(
        "; ".join(parts),
        f"training stopped before the update; last good checkpoint: {last_good or 'none written yet'} "
        "(continue from it with --resume). Lower train.lr, or check those samples",
    )
