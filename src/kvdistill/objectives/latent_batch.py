"""The host side of a latent student's batch (`kvdistill.objectives.kava`): the student-mode view (question,
M latent slots, answer: `kvdistill.student.latent.latent_view`) and each model's CoT-mode view (question,
chain of thought, answer), built from tokenizers and records alone, so on DataLoader workers in training.

Notation: B batch, T tokens of a CoT-mode text, P prefix columns, M latent slots, S suffix tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from kvdistill.data.segments import Segments, segments
from kvdistill.errors import KvdistillError
from kvdistill.models.capture import tokenize_for
from kvdistill.student.latent import LatentView, latent_view


@dataclass
class CotView:
    """One model's CoT-mode batch (right-padded, CPU): ids, mask (B, T), candidates (B, T) the CoT tokens,
    answer_rows (B, T) the answer tokens, pre_answer (B,) the token before the answer, after_prefix (B, T) the
    tokens predicted in CoT CE (the last prefix token on)."""

    ids: torch.Tensor
    mask: torch.Tensor
    candidates: torch.Tensor
    answer_rows: torch.Tensor
    pre_answer: torch.Tensor
    after_prefix: torch.Tensor


def cot_view(tokenizer, geometry, records: list[dict], segs: list[Segments], max_length: int) -> CotView:
    """Tokenize the full texts (question, CoT, answer) and mark CoT, answer and the token before the
    answer."""
    ids, mask, spans = tokenize_for(
        geometry, tokenizer, [s.text for s in segs], max_length=max_length, padding_side="right"
    )  # (B, T), (B, T), (B, T, 2) bytes
    start, end = spans[..., 0], spans[..., 1]
    content = (end > start) & mask.bool()
    cand, answer, pre, after = [], [], [], []
    for b, s in enumerate(segs):
        lo, hi, ans, pfx = s.byte(s.cot_start), s.byte(s.cot_end), s.byte(s.answer_start), s.byte(s.cot_line)
        c = content[b] & (start[b] < hi) & (end[b] > lo)
        a = content[b] & (end[b] > ans)  # tokens reaching into the answer (BPE: " 42" starts at the space)
        before = (content[b] & (end[b] <= ans)).nonzero().flatten()
        if not c.any() or not a.any() or not len(before):
            raise KvdistillError(
                f"record '{records[b].get('id')}': after truncation to data.max_length = {max_length} tokens "
                "its "
                "chain of thought or answer is missing",
                "raise data.max_length or drop the longest records",
            )
        rest = content[b] & (start[b] >= pfx)
        rest = rest | torch.cat(
            [rest[1:], rest.new_zeros(1)]
        )  # the last prefix token predicts the first CoT token
        cand.append(c)
        answer.append(a)
        pre.append(before.max())
        after.append(rest)
    return CotView(
        ids,
        mask,
        torch.stack(cand).long(),
        torch.stack(answer).long(),
        torch.stack(pre),
        torch.stack(after).long(),
    )


def _pinned(view):
    """A view (a dataclass of CPU tensors) in pinned memory; None as it is."""
    if view is None:
        return None
    return dataclasses.replace(
        view, **{f.name: getattr(view, f.name).pin_memory() for f in dataclasses.fields(view)}
    )


@dataclass
class LatentBatch:
    """One micro-batch of a latent student (CPU): its records and their segments, the student-mode view, the
    backbone's own CoT-mode view (None where no term reads it) and, per teacher in order, an online teacher's
    CoT-mode view (None: a cached teacher, whose target is read from its cache, or no latent K/V term)."""

    records: list[dict]
    segments: list[Segments]
    student: LatentView
    own_cot: CotView | None
    teachers: list[CotView | None]
    ahead: Any = (
        None  # in the training process: the teachers' targets computed ahead (`objectives.ahead.Pending`)
    )
    step: int | None = None  # the optimizer step the trainer collated it for (`train.loader.MicroBatches`)

    def pin_memory(self) -> LatentBatch:
        """The same batch in pinned memory (the DataLoader's pin_memory thread calls this)."""
        return dataclasses.replace(
            self,
            student=_pinned(self.student),
            own_cot=_pinned(self.own_cot),
            teachers=[_pinned(v) for v in self.teachers],
        )


class LatentCollator:
    """records -> `LatentBatch`: picklable (tokenizers, geometries and settings, no model), CPU only.

    tokenizer, geometry: the backbone's; template: data.template; tokens: M; own_cot: whether the backbone's
    CoT view is made (CoT CE, CODI, the self teacher); teachers: per teacher (tokenizer, geometry) of an
    online one whose CoT view is made, None for one that needs none."""

    def __init__(
        self,
        tokenizer,
        geometry,
        *,
        template: str,
        tokens: int,
        max_length: int,
        own_cot: bool,
        teachers: list[tuple[Any, Any] | None],
    ):
        self.tokenizer, self.geometry = tokenizer, geometry
        self.template, self.tokens, self.max_length = template, tokens, max_length
        self.own_cot, self.teachers = own_cot, teachers

    def __call__(self, records: list[dict], *, own_cot: bool | None = None) -> LatentBatch:
        """The batch of `records`; `own_cot` overrides whether the backbone's CoT view is made (held out: only
        for the self teacher's target)."""
        segs = [segments(r, self.template) for r in records]
        view = latent_view(self.tokenizer, segs, self.tokens)
        own = self.own_cot if own_cot is None else own_cot
        own_view = cot_view(self.tokenizer, self.geometry, records, segs, self.max_length) if own else None
        teachers = [
            None if t is None else cot_view(t[0], t[1], records, segs, self.max_length) for t in self.teachers
        ]
        return LatentBatch(records, segs, view, own_view, teachers)
