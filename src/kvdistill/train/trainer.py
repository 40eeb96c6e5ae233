"""The training loop: Accelerate for devices, DDP and mixed precision; checkpoints that resume exactly.

Batching: optimizer step s consumes the samples stream[s·G : (s+1)·G] with G = batch_size · grad_accum ·
world_size, where `stream` is a seeded permutation per epoch. Micro-batch m of rank r takes its own slice, so
one process with batch 4 and two processes with batch 2 (or batch 1 × accumulation 4) see the same samples.
Every loss is a mean over samples of per-sample means, so those runs give the same update.

A run is `setup` (check every input, build accelerator, data, objective, optimizer, scheduler, resume state)
→ `fit` (the optimizer steps) → `finish` (last checkpoint, final student, evaluation, summary); `train` calls
the three. Checkpoints (`DIR/checkpoints/step-N/`) and `DIR/final/` are written by
`kvdistill.train.checkpoint` (layout there): under a temporary name, fsynced, renamed when complete, so a
crash never leaves a half-written directory.

Launch: one process, or `torchrun --nproc_per_node N` / `accelerate launch` (DDP; on a machine without a GPU
the processes use gloo on CPU). Every input is checked before the run directory is written, and one run writes
it at a time (`kvdistill.train.resume`: the lock, what a resume checks and continues from). `--resume` may
change train.lr and train.steps: the optimizer and the schedule use them from the resumed step on.

A NaN/inf loss on any process, or a non-finite gradient norm, at step s stops every process before the update,
naming the step and samples. The weights of step s-1 gave it, and a resume is exact, so they would give it
again at any lr: their checkpoint, if saved, is set aside (step-N.diverged) and the message names the last
checkpoint before the divergence, where `--resume train.lr=<lower>` continues. `metrics.jsonl` rows are means
over micro-batches and processes (`tokens`: sums), `lr` the student's learning rate used in that step.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from kvdistill.atomic import write_json_atomic, write_text_atomic
from kvdistill.config import RunConfig, dump_config, resolve_paths
from kvdistill.errors import ConfigError, KvdistillError
from kvdistill.objectives.ahead import TeachersAhead
from kvdistill.paths import claim, is_disk_full
from kvdistill.train.accelerator import make_accelerator, on_main
from kvdistill.train.checkpoint import (
    checkpoint_path,
    latest_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    save_final_student,
    split_student_state,
)
from kvdistill.train.distributed import Sharded, sharded_run, unsharded
from kvdistill.train.divergence import NonFiniteLoss, diverged
from kvdistill.train.evaluation import evaluate
from kvdistill.train.loader import collated_batches, teachers_ahead
from kvdistill.train.metrics_log import MetricsLog, truncate_log
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
from kvdistill.train.run import Run
from kvdistill.train.selection import Selection, selection_at
from kvdistill.train.step import optimizer_step, param_groups, report_memory

__all__ = ["NonFiniteLoss", "Run", "Selection", "fit", "finish", "latest_checkpoint", "setup", "train"]

log = logging.getLogger(__name__)


def train(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    stop_after: int | None = None,
    init_student: str | None = None,
    progress: bool = True,
    dataset=None,
) -> dict:
    """Run (or resume) training; returns the summary also written to DIR/summary.json.

    `dataset`: an in-memory `datasets.Dataset` (or DatasetDict, split by data.split) read with the data
    section's field names (data.source hf, no data.path); it is saved into DIR/dataset and config.yaml points
    there, so the run directory evaluates and resumes on its own.

    `stop_after`: stop after this many optimizer steps as if interrupted (checkpoint written), for resumption.
    `init_student`: start from this student directory instead of `cfg.student` (curriculum phases).
    """
    try:
        run = setup(
            cfg, out_dir, resume=resume, stop_after=stop_after, init_student=init_student, dataset=dataset
        )
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


def setup(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    stop_after: int | None = None,
    init_student: str | None = None,
    dataset=None,
) -> Run:
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
    # a config built in code (model_copy skips the schema): the learning rates' own message before the
    # schema's
    bad_lr = learning_rate_problems(cfg)
    if bad_lr:
        raise ConfigError(bad_lr, source=f"config '{cfg.name}'")
    cfg = resolve_paths(cfg)  # config.yaml means the same run from any directory
    accelerator = make_accelerator(cfg, out_dir)
    main = accelerator.is_main_process
    lock = RunLock(out_dir) if main else None
    on_main(accelerator, lambda: lock.check())  # another run writing DIR: refused before anything else
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
    on_main(accelerator, lambda: lock.acquire())  # the first write: from here on no other run writes DIR
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
            write_text_atomic(
                out_dir / "alignment_sample.json", json.dumps(objective.alignment_sample(train_records[0]))
            )
        # fsdp (several processes, or one offloading to the host): the student sharded before the optimizer
        # sees its parameters
        sharded = (
            Sharded(objective, cfg, accelerator) if sharded_run(cfg, accelerator.num_processes) else None
        )
        # on a GPU the fused AdamW: one kernel over all parameters (the maps are many small tensors)
        fused = True if accelerator.device.type == "cuda" and sharded is None else None
        optimizer = torch.optim.AdamW(
            param_groups(objective, cfg), weight_decay=cfg.train.weight_decay, fused=fused
        )
        scheduler = get_scheduler(
            cfg.train.schedule,
            optimizer,
            num_warmup_steps=cfg.train.warmup_steps,
            num_training_steps=cfg.train.steps,
        )
        if sharded is None:
            objective, optimizer = accelerator.prepare(objective, optimizer)
            split_student_state(accelerator, accelerator.unwrap_model(objective))  # one copy of the student
        else:
            optimizer = sharded.prepare(optimizer)
        ckpt, state = (
            load_resumed(plan, out_dir, accelerator=accelerator, scheduler=scheduler)
            if resume
            else (None, None)
        )
        start, tokens_seen = (state["step"], state["tokens"]) if state else (0, 0)
        if state:
            apply_configured_lrs(optimizer, scheduler, cfg)
        if cfg.train.grad_norms_every and accelerator.num_processes > 1:
            raise KvdistillError(
                "train.grad_norms_every differentiates each term on its own, which DDP's gradient "
                f"hooks do not allow ({accelerator.num_processes} processes)",
                "drop train.grad_norms_every, or run on one process",
            )
        if resume:
            note_changes(plan, out_dir, start)
            if main:
                truncate_log(out_dir / "metrics.jsonl", start)
        selection = selection_at(cfg, out_dir, start)
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
    """Save an in-memory dataset (its data.split) to DIR/dataset (written aside, then renamed); the data
    section that reads it back."""
    import shutil

    from kvdistill.data.rows import dataset_split

    target = out_dir / "dataset"
    if main:
        tmp = out_dir / "dataset.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        dataset_split(dataset, cfg.data).save_to_disk(str(tmp))
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    kept = {k: v for k, v in cfg.data.model_dump(exclude_unset=True).items() if k not in ("size", "split")}
    return cfg.data.model_validate({**kept, "source": "hf", "path": str(target.resolve())})  # one split saved


def fit(run: Run, *, progress: bool = True) -> None:
    """Optimizer steps run.start .. run.end - 1: metrics rows, evaluations every eval_every steps and a
    checkpoint every save_every steps (the one of the last step is `finish`'s).

    Raises NonFiniteLoss on every process before an update with a NaN/inf loss or gradient norm.
    """
    from tqdm.auto import tqdm

    cfg = run.cfg
    bar = tqdm(
        total=cfg.train.steps,
        initial=run.start,
        disable=not (run.main and progress),
        desc=cfg.name,
        dynamic_ncols=True,
    )
    run.t0 = time.time()
    run.objective.train()
    batches = collated_batches(run.inner, run.train_records, cfg, run.start, run.end, run.accelerator)
    run.batches = teachers_ahead(run.inner, batches, cfg, run.accelerator.device)
    try:
        for step in range(run.start, run.end):
            row = optimizer_step(run, step)
            if step == run.start:
                report_memory(run)
            if (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.steps or "grad_norm/ce" in row:
                run.log.write(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
            bar.update(1)
            if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0 and run.eval_records:
                evaluate(run, step + 1, bar if progress else None)
                if run.selection is not None and run.selection.exhausted:
                    run.selection.stopped_at = run.end = step + 1  # early stop: finish ends the run here
                    break
            if cfg.train.save_every and (step + 1) % cfg.train.save_every == 0 and step + 1 < run.end:
                _save(run, step + 1)
    except NonFiniteLoss as err:
        raise diverged(run, err) from None
    finally:
        bar.close()
        if isinstance(run.batches, TeachersAhead):
            run.batches.close()


def _save(run: Run, step: int) -> None:
    """Checkpoint of `step` (every process takes part); it becomes the last good one. With the held-out CE of
    `step` where the run evaluated there (what train.save_total_limit keeps the best by); older checkpoints
    beyond train.save_total_limit are pruned once it is complete."""
    path = checkpoint_path(run.out_dir, step)
    state = {"step": step, "tokens": run.tokens_seen, "config_name": run.cfg.name}
    if run.last_eval is not None and run.last_eval[0] == step and "eval/ce" in run.last_eval[1]:
        state["eval_ce"] = run.last_eval[1]["eval/ce"]
    with unsharded(run.sharded):  # fsdp: process 0 saves the gathered student
        save_checkpoint(
            path,
            accelerator=run.accelerator,
            objective=run.inner,
            scheduler=run.scheduler,
            trainer_state=state,
        )
    run.last_good = path
    if run.cfg.train.save_total_limit is not None:
        on_main(
            run.accelerator, lambda: prune_checkpoints(run.out_dir, run.cfg.train.save_total_limit, step=step)
        )


def finish(run: Run) -> dict:
    """When every configured step is done or early stopping ended the run (not stopped by stop_after): an
    evaluation (with eval data; the one of the last step if `fit` ran it), the last checkpoint (recording it),
    the final student and summary.json. Otherwise the checkpoint of the last step run. Returns the summary."""
    stopped = run.selection is not None and run.selection.stopped_at is not None
    complete = run.end == run.cfg.train.steps or stopped
    ev = None
    if complete and run.eval_records:
        ev = run.last_eval[1] if run.last_eval and run.last_eval[0] == run.end else evaluate(run, run.end)
    _save(run, run.end)
    elapsed = time.time() - run.t0
    summary = {
        "steps": run.end,
        "tokens": run.tokens_seen,
        "elapsed_s": elapsed,
        "train_s": elapsed - run.eval_s,
    }
    if run.memory is not None:
        summary["memory"] = run.memory
    if complete:
        with unsharded(run.sharded):
            if run.main:
                save_final_student(
                    run.out_dir,
                    run.inner,
                    {"step": run.end, "tokens": run.tokens_seen, "config_name": run.cfg.name},
                )
        if ev is not None:
            summary.update({k: v for k, v in ev.items() if k.startswith("eval/")})
        if run.selection is not None:
            summary.update(
                best_step=run.selection.best_step,
                best_value=run.selection.best,
                selected_on=run.selection.metric,
                stopped_early=stopped,
            )
        summary["eval_s"] = run.eval_s
        if run.main:
            write_json_atomic(run.out_dir / "summary.json", summary)
    return summary


def _check_positions(objective, max_length: int) -> None:
    """Refuse, before any step, a data.max_length that some model cannot take (the built models: also a
    student from --init-student)."""
    models = [("student", objective.student_geometry)] + [
        (f"teacher '{t.name}'", t.geometry) for t in objective.teachers
    ]
    problems = position_problems(models, max_length)
    if problems:
        raise KvdistillError(*problems[0].split("; ", 1))
