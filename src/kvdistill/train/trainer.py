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
the processes use gloo on CPU). Every input is checked before the run directory is written, and one run writes
it at a time (`kvdistill.train.resume`: the lock, what a resume checks and continues from). `--resume` may change
train.lr and train.steps: the optimizer and the schedule use them from the resumed step on.

A NaN/inf loss on any process, or a non-finite gradient norm, at step s stops every process before the update,
naming the step and samples. The weights of step s-1 gave it, and a resume is exact, so they would give it again
at any lr: their checkpoint, if saved, is set aside (step-N.diverged) and the message names the last checkpoint
before the divergence, where `--resume train.lr=<lower>` continues. `metrics.jsonl` rows are means over
micro-batches and processes (`tokens`: sums), `lr` the student's learning rate used in that step.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvdistill.atomic import write_json_atomic
from kvdistill.config import RunConfig, dump_config, resolve_paths
from kvdistill.errors import ConfigError, KvdistillError
from kvdistill.objectives.ahead import TeachersAhead
from kvdistill.objectives.base import TrainingObjective
from kvdistill.paths import claim, is_disk_full, open_append
from kvdistill.train.checkpoint import (
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    save_checkpoint,
    save_final_student,
    set_aside,
    split_student_state,
    write_text_atomic,
)
from kvdistill.train.distributed import Sharded, sharded_run, unsharded
from kvdistill.train.loader import collated_batches, teachers_ahead
from kvdistill.train.preflight import learning_rate_problems, position_problems, preflight
from kvdistill.train.resume import (
    DATA,
    RunLock,
    apply_configured_lrs,
    check_data,
    data_fingerprint,
    load_resumed,
    note_changes,
    plan_start,
)

__all__ = ["NonFiniteLoss", "Run", "fit", "finish", "latest_checkpoint", "setup", "train"]

log = logging.getLogger(__name__)


class NonFiniteLoss(KvdistillError):
    """A NaN/inf loss or gradient norm at optimizer step `step` (1-based): the run stopped before the update."""

    def __init__(self, problem: str, fix: str | None = None, *, step: int | None = None,
                 ids: list[str] | None = None):
        super().__init__(problem, fix)
        self.step = step
        self.ids = list(ids or [])  # the samples of the failing process's step


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
    """metrics.jsonl and the trackers of train.report_to (through Accelerate), on the main process.

    Tracker names: a teacher's terms under teacher/<name>/ (loss/kv/<name> -> teacher/<name>/kv, weight/<name> ->
    teacher/<name>/weight, eval/kv_error/<name> -> teacher/<name>/eval_kv_error), other training figures under
    train/, held-out ones under eval/; per-layer lists go to metrics.jsonl only.
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
            values = {self.tracker_key(k, row.get("split") == "eval"): v for k, v in row.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
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
    """A nested config as {dotted key: bool | int | float | str} (lists and None as text), what trackers take."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
    return out


def _truncate_log(path: Path, step: int) -> None:
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


@dataclass
class Selection:
    """train.early_stopping's state: the best validation value so far, its step, evaluations since it improved.
    A pure function of the evaluations logged so far, so a resume rebuilds it from metrics.jsonl."""

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


def train(cfg: RunConfig, out_dir: str | Path, *, resume: bool = False, stop_after: int | None = None,
          init_student: str | None = None, progress: bool = True, dataset=None) -> dict:
    """Run (or resume) training; returns the summary also written to DIR/summary.json.

    `dataset`: an in-memory `datasets.Dataset` (or DatasetDict, split by data.split) read with the data section's
    field names (data.source hf, no data.path); it is saved into DIR/dataset and config.yaml points there, so the
    run directory evaluates and resumes on its own.

    `stop_after`: stop after this many optimizer steps as if interrupted (checkpoint written), for resumption.
    `init_student`: start from this student directory instead of `cfg.student` (curriculum phases).
    """
    try:
        run = setup(cfg, out_dir, resume=resume, stop_after=stop_after, init_student=init_student, dataset=dataset)
    except Exception as err:
        if is_disk_full(err, out_dir):
            raise _disk_full(err, Path(out_dir), None) from None
        raise
    try:
        fit(run, progress=progress)
        summary = finish(run)
    except Exception as err:
        if is_disk_full(err, out_dir):
            raise _disk_full(err, run.out_dir, run.last_good) from None
        raise
    finally:
        run.close()  # also on an error or KeyboardInterrupt: the lock is given back
    # not end_training(): it destroys the process group, which the next run in this process (a curriculum
    # phase) still needs; the group is destroyed when the process exits
    run.accelerator.wait_for_everyone()
    return summary


def _disk_full(err: BaseException, out_dir: Path, last_good: Path | None) -> KvdistillError:
    """A write of the run that failed for lack of space, as the user can act on it (an unfinished checkpoint
    or file was written under a temporary name and removed: what was saved before is intact)."""
    where = getattr(err, "filename", None) or out_dir
    kept = f"the newest intact checkpoint is {last_good}" if last_good else "no checkpoint was saved yet"
    return KvdistillError(
        f"the disk holding {out_dir} is full: no space left on the device while writing {where} "
        f"({type(err).__name__}); nothing half-written was kept, {kept}",
        f"free space on that disk (`df -h {out_dir}`), then rerun the same command with --resume to continue",
    )


def setup(cfg: RunConfig, out_dir: str | Path, *, resume: bool = False, stop_after: int | None = None,
          init_student: str | None = None, dataset=None) -> Run:
    """Check every input, then build the run: accelerator, data, objective (fitted maps prepared), optimizer,
    scheduler and, with `resume`, the state of the newest intact checkpoint (or step 0 when the run stopped
    before its first checkpoint). The caller ends the run with `Run.close()` (`train` does).

    Nothing is written before every input is checked (a refused resume leaves DIR as it was); then the main
    process takes DIR's lock and writes config.yaml, data.json, plan.json and alignment_sample.json.
    """
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    from kvdistill.objectives import build_objective

    out_dir = Path(out_dir)
    # a config built in code (model_copy skips the schema): the learning rates' own message before the schema's
    bad_lr = learning_rate_problems(cfg)
    if bad_lr:
        raise ConfigError(bad_lr, source=f"config '{cfg.name}'")
    cfg = resolve_paths(cfg)  # config.yaml means the same run from any directory
    accelerator = _accelerator(cfg, out_dir)
    main = accelerator.is_main_process
    lock = RunLock(out_dir) if main else None
    _on_main(accelerator, lambda: lock.check())  # another run writing DIR: refused before anything else
    plan_start(out_dir, cfg, resume)  # checked on every process, so none is left waiting for the others
    checked = preflight(cfg, dataset=dataset)  # every check `kvdistill validate` runs, data included
    if checked.problems:
        raise ConfigError(checked.problems, source=f"config '{cfg.name}'")
    for note in checked.data_notes:
        log.warning(note)
    set_seed(cfg.train.seed)
    train_records, eval_records = checked.train_records, checked.eval_records
    fingerprint = data_fingerprint(train_records, eval_records)
    if resume:
        check_data(out_dir, fingerprint, cfg)

    objective = build_objective(cfg, device=accelerator.device, init_student=init_student)
    _check_positions(objective, cfg.data.max_length)
    # fitted (not trained) maps, e.g. the latent space: the same records, so the same maps, on every process
    objective.prepare(train_records[: cfg.fusion.latent.fit_samples])
    _on_main(accelerator, lambda: lock.acquire())  # the first write: from here on no other run writes DIR
    try:
        plan = plan_start(out_dir, cfg, resume)  # again, now that DIR cannot change under us
        if main:
            claim(out_dir, "run")  # DIR/.kvdistill-run: this directory is a run, its files ours to replace
        if dataset is not None:  # the run directory keeps its data: config.yaml names the saved copy
            cfg = cfg.model_copy(update={"data": _save_dataset(dataset, cfg, out_dir, main)})
        if main:
            write_text_atomic(out_dir / "config.yaml", dump_config(cfg))
            write_json_atomic(out_dir / DATA, fingerprint)
            write_text_atomic(out_dir / "plan.json", json.dumps(objective.plan(), indent=1))
            write_text_atomic(out_dir / "alignment_sample.json",
                              json.dumps(objective.alignment_sample(train_records[0])))
        # fsdp (several processes, or one offloading to the host): the student sharded before the optimizer sees its parameters
        sharded = Sharded(objective, cfg, accelerator) if sharded_run(cfg, accelerator.num_processes) else None
        # on a GPU the fused AdamW: one kernel over all parameters (the maps are many small tensors)
        fused = True if accelerator.device.type == "cuda" and sharded is None else None
        optimizer = torch.optim.AdamW(_param_groups(objective, cfg), weight_decay=cfg.train.weight_decay, fused=fused)
        scheduler = get_scheduler(cfg.train.schedule, optimizer, num_warmup_steps=cfg.train.warmup_steps,
                                  num_training_steps=cfg.train.steps)
        if sharded is None:
            objective, optimizer = accelerator.prepare(objective, optimizer)
            split_student_state(accelerator, accelerator.unwrap_model(objective))  # one copy of the student
        else:
            optimizer = sharded.prepare(optimizer)
        ckpt, state = load_resumed(plan, out_dir, accelerator=accelerator, scheduler=scheduler) if resume else (
            None, None)
        start, tokens_seen = (state["step"], state["tokens"]) if state else (0, 0)
        if state:
            apply_configured_lrs(optimizer, scheduler, cfg)
        if cfg.train.grad_norms_every and accelerator.num_processes > 1:
            raise KvdistillError("train.grad_norms_every differentiates each term on its own, which DDP's gradient "
                                 f"hooks do not allow ({accelerator.num_processes} processes)",
                                 "drop train.grad_norms_every, or run on one process")
        if resume:
            note_changes(plan, out_dir, start)
            if main:
                _truncate_log(out_dir / "metrics.jsonl", start)
        selection = _selection(cfg, out_dir, start)
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
            log=MetricsLog(out_dir, main, accelerator, cfg),
            start=start,
            end=cfg.train.steps if stop_after is None else min(cfg.train.steps, stop_after),
            tokens_seen=tokens_seen,
            last_good=ckpt,
            lock=lock,
            selection=selection,
            sharded=sharded,
        )
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _save_dataset(dataset, cfg: RunConfig, out_dir: Path, main: bool):
    """Save an in-memory dataset (its data.split) to DIR/dataset (written aside, then renamed); the data section
    that reads it back."""
    import shutil

    from kvdistill.data.records import dataset_split

    target = out_dir / "dataset"
    if main:
        tmp = out_dir / "dataset.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        dataset_split(dataset, cfg.data).save_to_disk(str(tmp))
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    kept = {k: v for k, v in cfg.data.model_dump(exclude_unset=True).items() if k not in ("size", "split")}
    return cfg.data.model_validate({**kept, "source": "hf", "path": str(target.resolve())})  # one split saved


def _on_main(accelerator, fn: Callable[[], Any]) -> Any:
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

        shared = [(result, None if error is None else (getattr(error, "problem", f"process 0: {error!r}"),
                                                       getattr(error, "fix", None)))]
        broadcast_object_list(shared, from_process=0)
        result, message = shared[0]
        if error is None and message is not None:
            error = KvdistillError(*message)
    if error is not None:
        raise error
    return result


def _accelerator(cfg: RunConfig, out_dir: Path):
    """A fresh Accelerator for this run with its trackers (not started yet), refusing a launch that Accelerate did
    not see as one."""
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
        log_with=_trackers(cfg, out_dir) or None,
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
    batches = collated_batches(run.inner, run.train_records, cfg, run.start, run.end, run.accelerator)
    run.batches = teachers_ahead(run.inner, batches, cfg, run.accelerator.device)
    try:
        for step in range(run.start, run.end):
            row = _step(run, step)
            if step == run.start:
                _report_memory(run)
            if (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.steps or "grad_norm/ce" in row:
                run.log.write(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
            bar.update(1)
            if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0 and run.eval_records:
                _evaluate(run, step + 1, bar if progress else None)
                if run.selection is not None and run.selection.exhausted:
                    run.selection.stopped_at = run.end = step + 1  # early stop: finish ends the run here
                    break
            if cfg.train.save_every and (step + 1) % cfg.train.save_every == 0 and step + 1 < run.end:
                _save(run, step + 1)
    except NonFiniteLoss as err:
        raise _diverged(run, err) from None
    finally:
        bar.close()
        if isinstance(run.batches, TeachersAhead):
            run.batches.close()


def _step(run: Run, step: int) -> dict:
    """One optimizer step over grad_accum micro-batches -> its metrics row (means over micro-batches and
    processes; tokens: sums), with step, lr (the student's, as used), tokens_per_s and elapsed_s. The micro-batches
    come from `run.batches` (collated, this step's next ones)."""
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
            _stop_if_non_finite(accelerator, float(loss.detach()), metrics, step, micro, records)
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
    row.update(step=step + 1, lr=lr, tokens_per_s=row["tokens"] / (time.time() - step_t0),
               elapsed_s=time.time() - run.t0)
    return row


def _report_memory(run: Run) -> None:
    """The memory report of every process (`kvdistill.train.memory`) after the first step run: logged by the main
    process, kept for summary.json."""
    from accelerate.utils import gather_object

    from kvdistill.train.memory import memory_report

    mine = {"process": run.accelerator.process_index,
            **memory_report(run.inner, run.optimizer, run.accelerator.device)}
    run.memory = gather_object([mine]) if run.accelerator.num_processes > 1 else [mine]
    if run.main:
        for r in run.memory:
            peak = "" if r["peak_allocated_bytes"] is None else f", peak allocated {r['peak_allocated_bytes'] / 2**20:.1f} MiB"
            log.info("memory of process %d after step %d: student %.1f MiB, maps %.1f MiB, teachers %.1f MiB, "
                     "gradients %.1f MiB, optimizer state %.1f MiB%s", r["process"], run.start + 1,
                     r["student_params_bytes"] / 2**20, r["maps_params_bytes"] / 2**20,
                     r["teacher_params_bytes"] / 2**20, r["grad_bytes"] / 2**20,
                     r["optimizer_state_bytes"] / 2**20, peak)


def _term_grad_norms(run: Run) -> dict[str, float]:
    """The L2 norm of each loss term's gradient w.r.t. the student's parameters (`grad_norm/ce`, `grad_norm/kd`),
    from the objective's graph-attached per-term means of this micro-batch (`Objective.last_terms`), before
    clipping; the graph is kept for the step's own backward."""
    params = [p for p in run.inner.student.parameters() if p.requires_grad]
    out = {}
    for name, term in run.inner.last_terms.items():
        if not term.requires_grad:
            continue
        grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        out[f"grad_norm/{name}"] = float(torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g.float()) for g in grads if g is not None])))
    return out


def _clip_gradients(run: Run, step: int, metrics: dict, step_ids: list[str]) -> float:
    """Clip to max_grad_norm; the norm before clipping. Refuses a non-finite norm (but fp16's loss scaler
    skips such steps itself). Gradients are reduced over processes by now: every process sees one norm."""
    cfg = run.cfg
    max_norm = cfg.train.max_grad_norm or math.inf
    norm = run.sharded.clip(max_norm) if run.sharded else float(
        run.accelerator.clip_grad_norm_(run.objective.parameters(), max_norm))
    if not math.isfinite(norm) and cfg.train.mixed_precision != "fp16":
        raise NonFiniteLoss(
            f"gradient norm is {norm} at step {step + 1} (loss "
            f"{metrics['loss']:.4g}; samples of this process {step_ids})",
            step=step + 1, ids=step_ids,
        )
    return norm


STEP_SUMS = ("tokens", "grad_norm", "on_policy/new_tokens", "on_policy/generate_s")  # not averaged over micro-batches
PROCESS_SUMS = ("tokens", "on_policy/new_tokens")  # summed over processes (the others: means)


def _mean_row(accelerator, sums: dict[str, float], n: int) -> dict[str, float]:
    """Per-step sums over n micro-batches -> means (tokens, the on-policy generation's tokens and seconds: sums;
    grad_norm: as is), then over processes (token counts summed, the rest averaged)."""
    row = {k: (v if k in STEP_SUMS or k.startswith("grad_norm") else v / n) for k, v in sums.items()}
    world = accelerator.num_processes
    if world > 1:  # mean over processes (tokens: sum), so the row describes the whole combined batch
        keys = list(row)  # the same keys in the same order on every process
        total = accelerator.reduce(torch.tensor([row[k] for k in keys], device=accelerator.device), reduction="sum")
        row = {k: float(v) if k in PROCESS_SUMS else float(v) / world for k, v in zip(keys, total, strict=True)}
    return row


def _save(run: Run, step: int) -> None:
    """Checkpoint of `step` (every process takes part); it becomes the last good one. With the held-out CE of
    `step` where the run evaluated there (what train.save_total_limit keeps the best by); older checkpoints
    beyond train.save_total_limit are pruned once it is complete."""
    path = checkpoint_path(run.out_dir, step)
    state = {"step": step, "tokens": run.tokens_seen, "config_name": run.cfg.name}
    if run.last_eval is not None and run.last_eval[0] == step and "eval/ce" in run.last_eval[1]:
        state["eval_ce"] = run.last_eval[1]["eval/ce"]
    with unsharded(run.sharded):  # fsdp: process 0 saves the gathered student
        save_checkpoint(path, accelerator=run.accelerator, objective=run.inner, scheduler=run.scheduler,
                        trainer_state=state)
    run.last_good = path
    if run.cfg.train.save_total_limit is not None:
        _on_main(run.accelerator, lambda: prune_checkpoints(run.out_dir, run.cfg.train.save_total_limit, step=step))


def finish(run: Run) -> dict:
    """When every configured step is done or early stopping ended the run (not stopped by stop_after): an
    evaluation (with eval data; the one of the last step if `fit` ran it), the last checkpoint (recording it),
    the final student and summary.json. Otherwise the checkpoint of the last step run. Returns the summary."""
    stopped = run.selection is not None and run.selection.stopped_at is not None
    complete = run.end == run.cfg.train.steps or stopped
    ev = None
    if complete and run.eval_records:
        ev = run.last_eval[1] if run.last_eval and run.last_eval[0] == run.end else _evaluate(run, run.end)
    _save(run, run.end)
    elapsed = time.time() - run.t0
    summary = {"steps": run.end, "tokens": run.tokens_seen, "elapsed_s": elapsed, "train_s": elapsed - run.eval_s}
    if run.memory is not None:
        summary["memory"] = run.memory
    if complete:
        with unsharded(run.sharded):
            if run.main:
                save_final_student(run.out_dir, run.inner, {"step": run.end, "tokens": run.tokens_seen,
                                                            "config_name": run.cfg.name})
        if ev is not None:
            summary.update({k: v for k, v in ev.items() if k.startswith("eval/")})
        if run.selection is not None:
            summary.update(best_step=run.selection.best_step, best_value=run.selection.best,
                           selected_on=run.selection.metric, stopped_early=stopped)
        summary["eval_s"] = run.eval_s
        if run.main:
            write_json_atomic(run.out_dir / "summary.json", summary)
    return summary


def _evaluate(run: Run, step: int, bar=None) -> dict:
    """Held-out figures of the student after `step` (CE / ppl, per-layer K/V errors, and exact match where
    train.eval_exact_match asks), logged as an eval row with the time so far; train.early_stopping takes them and,
    on a new best, the student is saved to DIR/best/student. Its time counts to `eval_s`, not to `train_s`.
    With a progress `bar` (main process), the figures are printed above it as one line."""
    t0 = time.time()
    cfg = run.cfg
    ev = run.inner.evaluate(run.eval_records)
    if cfg.train.eval_exact_match:
        from kvdistill.eval.decode import cot_exact_match, exact_match, latent_exact_match

        student, tok, bs = run.inner.student, run.inner.tokenizer, max(cfg.train.batch_size, 256)
        was = student.training
        student.eval()
        try:
            if cfg.student.latent is not None:  # a latent student answers in latent mode
                em = latent_exact_match(student, tok, run.eval_records, cfg.data.template,
                                        max_new_tokens=cfg.train.eval_max_new_tokens, batch_size=bs)
                ev["eval/gen_tokens"] = em["gen_tokens"]
            elif cfg.train.eval_cot:
                em = cot_exact_match(student, tok, run.eval_records, cfg.data.template,
                                     max_new_tokens=cfg.train.eval_max_new_tokens, batch_size=bs)
            else:
                em = exact_match(student, tok, run.eval_records, max_new_tokens=cfg.train.eval_max_new_tokens,
                                 batch_size=bs)
        finally:
            student.train(was)
        ev["eval/exact_match"] = em["exact_match"]
    if run.selection is not None and run.selection.update(step, ev) and run.main:
        _save_best(run, step)
    run.eval_s += time.time() - t0
    elapsed = time.time() - run.t0
    row = {"step": step, "split": "eval", **ev, "elapsed_s": elapsed, "train_s": elapsed - run.eval_s}
    run.log.write(row)
    run.last_eval = (step, ev)
    if bar is not None and run.main:
        shown = [f"held-out CE {ev['eval/ce']:.4f}"] if "eval/ce" in ev else []
        if "eval/exact_match" in ev and ev["eval/exact_match"] is not None:
            shown.append(f"exact match {ev['eval/exact_match']:.3f}")
        kv = ", ".join(f"{k.removeprefix('eval/kv_error/')} {v:.4f}" for k, v in ev.items()
                       if k.startswith("eval/kv_error/"))
        bar.write(f"step {step}: " + "; ".join(shown + ([f"KV error {kv}"] if kv else [])))
    return ev


def _save_best(run: Run, step: int) -> None:
    """The student of `step` as DIR/best/student (replacing the previous best: written aside, then renamed) and
    DIR/best.json {step, metric, value}."""
    import shutil

    best, tmp = run.out_dir / "best", run.out_dir / "best.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    run.inner.save_student(tmp / "student")
    shutil.rmtree(best, ignore_errors=True)
    tmp.rename(best)
    sel = run.selection
    write_json_atomic(run.out_dir / "best.json", {"step": step, "metric": sel.metric, "value": sel.best})


def _selection(cfg: RunConfig, out_dir: Path, start: int) -> Selection | None:
    """train.early_stopping's state at step `start`: rebuilt from the eval rows logged up to it (a resume), and a
    best student saved after it (by evaluations a resume replays) forgotten."""
    es = cfg.train.early_stopping
    if es is None:
        return None
    metric = "eval/exact_match" if es.metric == "exact_match" else "eval/ce"
    sel = Selection(metric=metric, higher=es.metric == "exact_match", min_delta=es.min_delta, patience=es.patience)
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


def _destroy_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _has_accelerator() -> bool:
    """A GPU (or other accelerator) is present; without one, Accelerate must be told to run DDP on CPU (gloo)."""
    if hasattr(torch, "accelerator"):
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


def _check_positions(objective, max_length: int) -> None:
    """Refuse, before any step, a data.max_length that some model cannot take (the built models: also a student
    from --init-student)."""
    models = [("student", objective.student_geometry)] + [(f"teacher '{t.name}'", t.geometry)
                                                          for t in objective.teachers]
    problems = position_problems(models, max_length)
    if problems:
        raise KvdistillError(*problems[0].split("; ", 1))


def _stop_if_non_finite(accelerator, loss: float, metrics: dict, step: int, micro: int, records: list[dict],
                        last_good: Path | None = None) -> None:
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
    raise NonFiniteLoss("; ".join(parts), step=step + 1, ids=[i for _, _, ids, _ in where for i in ids])


def _nonfinite_config(cfg: RunConfig) -> list[str]:
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


def _nonfinite_inputs(run: Run, ids: list[str]) -> list[str]:
    """The cached teacher K/V of samples `ids` that hold NaN/inf (what a damaged or badly extracted cache feeds
    the loss), as 'teacher t, sample s: keys_l0'."""
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
            bad = [n for n, x in tensors.items() if x.is_floating_point() and not bool(torch.isfinite(x).all())]
            if bad:
                found.append(f"teacher '{teacher.name}' (cache {reader.dir}), sample {sid!r}: {', '.join(bad)}")
    return found


def _nonfinite_weights(run: Run) -> list[str]:
    return [name for name, p in run.inner.named_parameters() if not bool(torch.isfinite(p.detach()).all())]


def _diverged(run: Run, err: NonFiniteLoss) -> NonFiniteLoss:
    """`err` (raised at step s on every process) with advice that names the cause it finds: a non-finite number
    in the config, non-finite teacher inputs (a damaged cache), or non-finite weights. Where the config and the
    inputs are finite, the weights of step s-1 gave the non-finite value, and a resume is exact, so from them
    it comes back at any lr: their checkpoint, if saved, is set aside (step-N.diverged, kept); the advice names
    the newest checkpoint before it and the lower train.lr to resume with."""
    in_config = _nonfinite_config(run.cfg)
    if in_config:
        return NonFiniteLoss(f"{err.problem}; cause: the config holds non-finite numbers ({'; '.join(in_config)})",
                             "give those keys finite values (the checkpoints are fine; nothing was set aside), "
                             "then rerun with --resume", step=err.step, ids=err.ids)
    inputs = _nonfinite_inputs(run, err.ids)
    if inputs:
        return NonFiniteLoss(f"{err.problem}; cause: non-finite teacher K/V in the input ({'; '.join(inputs[:5])})",
                             "the cache is damaged, not the run (nothing was set aside): run `kvdistill cache "
                             "verify` on it and re-extract it, then rerun with --resume", step=err.step, ids=err.ids)
    weights = _nonfinite_weights(run)
    if weights:
        shown = ", ".join(weights[:3]) + (f" and {len(weights) - 3} more" if len(weights) > 3 else "")
        err = NonFiniteLoss(f"{err.problem}; cause: non-finite weights before the step ({shown})",
                            step=err.step, ids=err.ids)
    poisoned = checkpoint_path(run.out_dir, err.step - 1)
    aside = _on_main(run.accelerator, lambda: set_aside(poisoned, "diverged")
                     if poisoned in list_checkpoints(run.out_dir) else None)
    before = latest_checkpoint(run.out_dir)
    lr = run.cfg.train.lr
    retry = f"rerun the same command with --resume train.lr={lr / 10:g} (now {lr:g}) or lower"
    advice = ["training stopped before the update"]
    if aside is not None:
        advice.append(f"the weights saved at step {err.step - 1} gave this and would again at any lr, so that "
                      f"checkpoint was set aside as {aside}")
    if before is not None:
        advice.append(f"the last checkpoint saved before the divergence is {before}: to continue from it with a "
                      f"lower learning rate, {retry}")
    else:
        advice.append(f"no checkpoint was saved before the divergence: {retry} to train the run again from step 0 "
                      "with a lower learning rate")
    advice.append("or check those samples")
    return NonFiniteLoss(err.problem, "; ".join(advice), step=err.step)
