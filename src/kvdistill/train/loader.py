"""The trainer's data pipeline: which records each micro-batch holds (a pure function of the step, the rank
and the seeds, so a resume or another world size sees the same samples), their collation on DataLoader
workers, and the teachers' pass run one micro-batch ahead (`objectives.ahead`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from kvdistill.config import RunConfig
from kvdistill.errors import KvdistillError
from kvdistill.objectives.ahead import TeachersAhead
from kvdistill.objectives.base import Batch, TrainingObjective


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
    """The records of micro-batch `micro` of process `rank` (of `world`) in optimizer step `step`.

    The order is seeded by data.seed and train.seed together, so runs that differ only in train.seed (the
    seeds of an experiment) see the same records in different orders, and runs with the same seeds the same
    order."""
    b, accum = cfg.train.batch_size, cfg.train.grad_accum
    per_step = b * accum * world
    order_seed = cfg.data.seed + 1_000_003 * cfg.train.seed  # = data.seed when train.seed is 0 (as before)
    ids = sample_stream(len(records), order_seed, step * per_step, per_step)
    lo = (micro * world + rank) * b
    return [records[i] for i in ids[lo : lo + b]]


class MicroBatches(torch.utils.data.Dataset):
    """Item k: micro-batch k % grad_accum of optimizer step k // grad_accum of process `rank`, as
    `micro_batch` picks it (so the order is a pure function of the step: a resume or another world size sees
    the same samples), run through `collate` (on a DataLoader worker when there are some), tagged with its
    step."""

    def __init__(
        self,
        records: list[dict],
        cfg: RunConfig,
        rank: int,
        world: int,
        collate: Callable[[list[dict]], Batch],
    ):
        self.records, self.cfg, self.rank, self.world, self.collate = records, cfg, rank, world, collate

    def __len__(self) -> int:
        return self.cfg.train.steps * self.cfg.train.grad_accum

    def __getitem__(self, k: int) -> Batch:
        step, micro = divmod(k, self.cfg.train.grad_accum)
        collated = self.collate(micro_batch(self.records, self.cfg, step, micro, self.rank, self.world))
        return dataclasses.replace(collated, step=step)


def _as_is(batch):
    return batch


def collated_batches(
    objective: TrainingObjective, records: list[dict], cfg: RunConfig, start: int, end: int, accelerator
):
    """The collated micro-batches of optimizer steps start..end-1 in order, from a DataLoader
    (train.num_workers processes collating train.prefetch batches ahead each, with the objective's `collator`;
    pinned memory on a GPU). objective: the unwrapped one."""
    t, acc = cfg.train, accelerator
    accum = t.grad_accum
    loader = torch.utils.data.DataLoader(
        MicroBatches(records, cfg, acc.process_index, acc.num_processes, objective.collator),
        batch_size=None,
        sampler=range(start * accum, end * accum),
        collate_fn=_as_is,
        num_workers=t.num_workers,
        prefetch_factor=t.prefetch if t.num_workers else None,
        pin_memory=acc.device.type == "cuda",
    )
    return iter(loader)


def teachers_ahead(objective: TrainingObjective, batches, cfg: RunConfig, device: torch.device):
    """`batches` with the teachers one micro-batch ahead (`TeachersAhead`) where train.teachers_ahead asks for
    it (None: on a GPU, when the objective has teachers), else `batches` as they are. objective: the unwrapped
    one."""
    want = cfg.train.teachers_ahead
    able = bool(objective.teachers)
    if want and not able:
        raise KvdistillError(
            "train.teachers_ahead is true, but this run has no teachers whose pass could run ahead "
            "(a latent student's self teacher is its own backbone, run in its step)",
            "drop train.teachers_ahead (or set it to false)",
        )
    if not able or not (want or (want is None and device.type == "cuda")):
        return batches
    return TeachersAhead(objective, batches, device=device, mixed_precision=cfg.train.mixed_precision)
