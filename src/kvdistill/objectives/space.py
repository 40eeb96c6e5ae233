"""The interface every fusion space implements, and what one step hands it.

A space turns the student's K/V and every teacher's K/V into one per-sample distillation loss (B,), together
with the fusion weights it used and its metrics. `kvdistill.objectives.text.TextObjective` composes a space
with the student's CE, the per-teacher terms (`terms.TeacherTerms`) and the router's regulariser. A new space
is a new module registered in `kvdistill.objectives.text.SPACES`, not a new branch.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch
from torch import nn

from kvdistill.models.capture import KVCapture
from kvdistill.objectives.batch import StudentBatch
from kvdistill.objectives.fusion import Fusion
from kvdistill.objectives.pairs import LayerPairs
from kvdistill.teachers.record import TeacherKV


@dataclass
class Step:
    """What a space sees of one step: the student's batch and capture (K/V, hidden states, logits), the
    teachers, their K/V records (one per teacher, in order), their layer pairs by name, and the fusion."""

    batch: StudentBatch
    student: KVCapture
    teachers: list
    records: list[TeacherKV]
    pairs: dict[str, LayerPairs]
    fusion: Fusion

    @property
    def hidden(self) -> torch.Tensor | None:
        """The student's last hidden states (B, T_s, F_s), when captured."""
        hs = self.student.hidden_states
        return hs[-1] if hs is not None else None

    @property
    def teacher_nll(self) -> torch.Tensor | None:
        """(B, N) every teacher's NLL per byte of each sample's scored text (`TeacherKV.nll_per_byte`), when
        the teachers' pass computed it (fusion.kind confidence, or a router trained toward it)."""
        if not self.records or any(r.nll_per_byte is None for r in self.records):
            return None
        return torch.stack([r.nll_per_byte for r in self.records], -1)


@dataclass
class SpaceOutput:
    """kd (B,): the space's distillation loss per sample (already weighted by the fusion and the loss
    weights); weights: (B, N) or (B, T_s, N) as used; metrics: name -> 0-dim detached tensors (per-sample
    means)."""

    kd: torch.Tensor
    weights: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class FusionSpace(nn.Module, metaclass=abc.ABCMeta):
    """Base of the spaces. Subclasses implement `forward(step) -> SpaceOutput`; they may override `prepare`
    (fit frozen maps before training) and `layer_errors` (held-out per-layer K/V error)."""

    name = "space"
    reports_layer_errors = False  # whether `layer_errors` gives held-out per-layer K/V errors

    @abc.abstractmethod
    def forward(self, step: Step) -> SpaceOutput:
        """The space's per-sample distillation loss of one step."""

    @torch.no_grad()
    def prepare(
        self,
        records: list[dict],
        teachers: list,
        pairs: dict[str, LayerPairs],
        max_length: int,
        batch_size: int,
    ) -> None:
        """Fit what is fitted rather than trained, on training records; nothing by default."""

    def layer_errors(self, step: Step) -> dict[str, dict[int, torch.Tensor]] | None:
        """Per teacher and mapped student layer, the per-sample (B,) held-out K/V error; None if not
        defined."""
        return None
