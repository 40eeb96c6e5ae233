"""The training objective: the one interface the trainer types, and the skeleton its objectives share.

An objective owns the student, its tokenizer and its frozen teachers, and turns one micro-batch into a loss.
The trainer calls, in this order:

    batch = objective.collator(records)        host side, picklable: on DataLoader workers (`train.loader`)
    records = objective.teacher_pass(batch)    the teachers' part, a pure function of the batch (frozen
                                               teachers): run one batch ahead on a thread where
                                               `train.teachers_ahead` asks
    loss, metrics = objective(batch)           forward: the student, the teachers (or their pass ahead),
                                               the loss
    objective.evaluate(records)                held-out figures
    objective.plan(), alignment_sample(r)      what the run directory records of it
    objective.save_student(dir)                the student as a model directory

A batch is a dataclass with `records` (the micro-batch's records), `step` (the optimizer step the trainer
collated it for, or None) and `ahead` (the teachers' pass run ahead of the step, `objectives.ahead.Pending`,
or None). `kvdistill.objectives.text.TextObjective` (a text student) and
`kvdistill.objectives.kava.KavaObjective` (a latent-reasoning student) implement it; a new objective is a new
module registered in `kvdistill.objectives.build.OBJECTIVES`, not a new branch in the trainer.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from torch import nn

from kvdistill.errors import KvdistillError
from kvdistill.models.geometry import geometry_of
from kvdistill.objectives.pairs import LayerPairs
from kvdistill.student import save_student, unwrap_student


class Batch(Protocol):
    """What `TrainingObjective.collator` makes of a micro-batch's records (a dataclass)."""

    records: list[dict]
    step: int | None
    ahead: Any


class TrainingObjective(nn.Module, metaclass=abc.ABCMeta):
    """Base of the objectives (module docstring). The shared skeleton: the student's geometry (of `backbone`,
    the causal LM inside the student), the teachers' layer pairs with the refusal of layers a teacher lacks,
    the move to the device, the evaluation mode switch, and saving the student."""

    kind = "objective"

    def __init__(
        self, cfg, student: nn.Module, tokenizer, teachers: list, *, backbone: nn.Module | None = None
    ):
        super().__init__()
        self.cfg = cfg
        self.student = student
        self.tokenizer = tokenizer
        self.teachers = teachers  # plain list: frozen, not part of the trained / checkpointed module
        self.student_geometry = geometry_of(
            unwrap_student(student if backbone is None else backbone),
            name=str(cfg.student.model or "student"),
        )
        self.train_step = (
            0  # the optimizer step being run (set by the trainer): schedules, on-policy sampling
        )
        self.last_terms: dict[
            str, torch.Tensor
        ] = {}  # graph-attached per-term means (train.grad_norms_every)

    @property
    def backbone(self) -> nn.Module:
        """The causal LM inside the student (the student itself for a text student): what `save_student`
        saves."""
        return self.student

    def layer_pairs(self, tcfg, teacher, weights_cfg, device) -> LayerPairs:
        """Teacher `teacher`'s layer pairs (its config `tcfg`'s layer map; key / value weights of
        `weights_cfg`), refused when the map uses layers the teacher does not hold (a cache extracted with a
        layer subset)."""
        pairs = LayerPairs.of(
            self.student_geometry.num_layers, teacher.geometry.num_layers, tcfg.layer_map, weights_cfg, device
        )
        missing = sorted(set(pairs.teacher_layers) - set(teacher.layers))
        if missing:
            raise KvdistillError(
                f"teacher '{teacher.name}' lacks layers {missing} that the layer map uses",
                "re-extract the cache with those layers, or change the teacher's layer_map",
            )
        return pairs

    def to_device(self, device) -> None:
        """The objective's modules and every (frozen) teacher onto `device`."""
        self.to(device)
        for teacher in self.teachers:
            teacher.to(device)

    # ---------------------------------------------------------------------------------------------- one step
    @property
    @abc.abstractmethod
    def collator(self) -> Callable[[list[dict]], Batch]:
        """records -> a batch: picklable (tokenizers, geometries, settings, no model), CPU only."""

    def collate(self, records: list[dict]) -> Batch:
        return self.collator(records)

    def as_batch(self, batch: Batch | list[dict]) -> Batch:
        """A batch as it is, records collated here."""
        return self.collate(batch) if isinstance(batch, list) else batch

    @abc.abstractmethod
    def teacher_pass(self, batch: Batch, *, training: bool = True) -> Any:
        """The teachers' part of a batch (their K/V, or what is made of them), a pure function of the
        batch."""

    def runs_teachers_ahead(self, batch: Batch) -> bool:
        """Whether the teachers' pass of `batch` can run ahead of its step
        (`objectives.ahead.TeachersAhead`)."""
        return True

    def teachers_of(self, batch: Batch, *, training: bool = True) -> Any:
        """The teachers' pass of `batch`: the one run ahead of the step where there is one, else run here."""
        if batch.ahead is not None and training:
            return batch.ahead.take()
        return self.teacher_pass(batch, training=training)

    @abc.abstractmethod
    def forward(self, batch: Batch | list[dict]) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss, metrics) of a batch (or records, collated here): loss 0-dim, metrics floats (per-sample
        means; `tokens` a count)."""

    # ---------------------------------------------------------------------------------------------- held out
    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Evaluation mode for the duration, the previous mode restored after."""
        was = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was)

    @abc.abstractmethod
    def evaluate(self, records: list[dict], batch_size: int | None = None) -> dict:
        """Held-out figures of `records`: eval/ce and eval/ppl at least."""

    def prepare(self, records: list[dict]) -> None:  # noqa: B027 (optional hook: nothing to fit by default)
        """Fit what is fitted rather than trained, or check the training records, before the first step."""

    # ---------------------------------------------------------------------------------------------- reports
    @abc.abstractmethod
    def plan(self) -> dict:
        """The geometries, layer pairs and maps of the run (plan.json)."""

    @abc.abstractmethod
    def alignment_sample(self, record: dict) -> dict:
        """How one record is tokenized and aligned (alignment_sample.json)."""

    def save_student(self, out_dir) -> None:
        """The student as a model directory that loads with transformers (LoRA merged)."""
        save_student(self.backbone, self.tokenizer, str(out_dir))


def read_metrics(metrics: dict[str, torch.Tensor], counted: torch.Tensor) -> dict[str, float]:
    """Scalar metric tensors as floats, read from the device in one transfer; `tokens`: the sum of `counted`
    (a mask, preferably on the CPU)."""
    names = list(metrics)
    values = torch.stack([metrics[k].float().reshape(()) for k in names]).tolist() if names else []
    return {"tokens": float(counted.sum()), **dict(zip(names, values, strict=True))}
