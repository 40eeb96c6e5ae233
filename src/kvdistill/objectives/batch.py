"""The student side of one batch, and the token alignment of a teacher's (kept) tokens onto it.

Notation: B batch, T_s student tokens, M kept teacher tokens of a layer (T_t uncompressed), H_t teacher KV
heads, K nonzeros per alignment row.

The host side of a batch (tokenization with byte spans for the student and every teacher, the K/V-independent
token alignments, the rkv answer-query masks) is a `Collated`, made by a `Collator` from tokenizers and
records alone: on DataLoader workers in training, inline when the objective is called on records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvdistill.align.tokens import teacher_alignment_sparse
from kvdistill.models.capture import tokenize
from kvdistill.models.geometry import KVGeometry
from kvdistill.teachers.cached import map_tensors, read_cached
from kvdistill.teachers.capture import TeacherInputs, prepare_teacher
from kvdistill.teachers.record import TeacherKV


@dataclass
class StudentBatch:
    """Token ids, mask (B, T_s) and spans (B, T_s, 2) on the device, and CPU copies of spans and mask (the
    token alignment is built on the CPU); `alignments`: per teacher (in order) the collated (index, weight,
    covered) of `Collated.alignments` on the device (one, or one per teacher layer), or None (the space aligns
    that teacher itself)."""

    records: list[dict]
    ids: torch.Tensor
    mask: torch.Tensor
    spans: torch.Tensor
    spans_cpu: torch.Tensor
    mask_cpu: torch.Tensor
    alignments: list | None = None


def student_batch(
    tokenizer, records: list[dict], *, max_length: int | None, max_positions: int | None, device
) -> StudentBatch:
    """Tokenize `records` for the student (right padding, the model's position limit): a `Collator` without
    teachers."""
    return Collator(tokenizer, [], max_length=max_length, max_positions=max_positions)(records).student_batch(
        device
    )


Alignment = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # index, weight (..., M, K), covered (..., M)


def _aligned(
    spans_t: torch.Tensor, mask_t: torch.Tensor, spans_s: torch.Tensor, mask_s: torch.Tensor
) -> Alignment:
    """The sparse alignment of teacher tokens onto the student's, on the CPU: shared spans (B, M, 2) / mask
    (B, M) -> index, weight (B, M, K), covered (B, M); per head (B, H, M, 2) / (B, H, M) -> (B, H, M, K), (B,
    H, M). covered: 1 on real teacher tokens that overlap a student token."""
    index, weight = teacher_alignment_sparse(spans_t, mask_t, spans_s, mask_s, device="cpu")  # (B, H|1, M, K)
    if spans_t.dim() == 3:
        index, weight = index[:, 0], weight[:, 0]  # (B, M, K)
    return index, weight, (weight.sum(-1) > 0).long() * mask_t.long()


def _map_alignment(a: Alignment | dict[int, Alignment] | None, fn):
    if a is None:
        return None
    if isinstance(a, dict):
        return {j: tuple(fn(x) for x in v) for j, v in a.items()}
    return tuple(fn(x) for x in a)


@dataclass
class Collated:
    """The host side of one batch, built from tokenizers, cache readers and records alone (so on a DataLoader
    worker), all CPU: the student's ids, mask (B, T_s) and byte spans (B, T_s, 2); per teacher (in order) what
    it needs before its forward: an online teacher's `TeacherInputs`, a cached teacher's `TeacherKV` as read
    from its cache (`read_cached`), None for another kind; and the alignment of its tokens onto the student's
    where it does not depend on the teacher's K/V (`_aligned`): one for a teacher that keeps every token
    (online without compression, or a full cache), one per used layer {j: ...} for a cache of per-head kept
    tokens, else None.

    An online teacher with right_crop or rkv picks tokens per head (rkv from its K/V), so its alignment is
    built in the step from the kept tokens' spans; its tokenization and the rkv answer-query mask are collated
    here.
    """

    records: list[dict]
    ids: torch.Tensor
    mask: torch.Tensor
    spans: torch.Tensor
    teachers: list[TeacherInputs | TeacherKV | None]
    alignments: list[Alignment | dict[int, Alignment] | None]
    ahead: Any = (
        None  # in the training process: the teachers' K/V computed ahead (`objectives.ahead.Pending`)
    )
    step: int | None = None  # the optimizer step the trainer collated it for (`train.loader.MicroBatches`)

    def pin_memory(self) -> Collated:
        """The same batch in pinned memory (the DataLoader's pin_memory thread calls this)."""

        def pin(x):
            return None if x is None else x.pin_memory()

        teachers = []
        for t in self.teachers:
            if isinstance(t, TeacherInputs):
                t = t.pin_memory()
            elif isinstance(t, TeacherKV):
                t = map_tensors(t, pin)
            teachers.append(t)
        alignments = [_map_alignment(a, pin) for a in self.alignments]
        return Collated(
            self.records, pin(self.ids), pin(self.mask), pin(self.spans), teachers, alignments, step=self.step
        )

    def student_batch(self, device) -> StudentBatch:
        """The student's side on `device` (non-blocking copies), the alignments with it by teacher
        position."""

        def to(x):
            return x.to(device, non_blocking=True)

        alignments = [_map_alignment(a, to) for a in self.alignments]
        return StudentBatch(
            self.records, to(self.ids), to(self.mask), to(self.spans), self.spans, self.mask, alignments
        )


@dataclass
class TeacherSide:
    """What the collate needs of a teacher: its name, tokenizer (online teachers), geometry (position limit),
    compression (rkv needs the answer-query mask), the cache reader (cached teachers) and the teacher layers
    the layer map uses. Pickled (a spawned worker) without the reader's open files: the worker reopens the
    directory."""

    name: str
    tokenizer: object | None
    geometry: KVGeometry
    compression: object | None
    reader: object | None = None
    layers: list[int] | None = None
    logits: bool = False  # cached: read the stored top-k log-probabilities too (logit KD)

    @property
    def keeps_all(self) -> bool:
        return getattr(self.compression, "kind", "full") == "full"

    def __getstate__(self):
        state = dict(self.__dict__)
        if self.reader is not None:
            state["reader"] = str(self.reader.dir)  # reopened by `cache_reader`
        return state

    def cache_reader(self):
        if isinstance(self.reader, str):
            from kvdistill.cache import CacheReader

            self.reader = CacheReader(self.reader)
        return self.reader


class Collator:
    """records -> `Collated`: picklable (tokenizers, geometries, cache directories and settings, no model),
    CPU-only, so a DataLoader worker process runs it while the device runs the previous batch."""

    def __init__(
        self, tokenizer, teachers: list[TeacherSide], *, max_length: int | None, max_positions: int | None
    ):
        self.tokenizer = tokenizer
        self.teachers = teachers
        self.max_length = max_length
        self.max_positions = max_positions

    def __call__(self, records: list[dict]) -> Collated:
        enc = tokenize(
            self.tokenizer,
            [r["text"] for r in records],
            max_length=self.max_length,
            padding_side="right",
            max_positions=self.max_positions,
        )
        ids, mask, spans = (
            enc["input_ids"],
            enc["attention_mask"],
            enc["offset_mapping"],
        )  # (B, T_s), (B, T_s, 2)
        inputs, alignments = [], []
        for t in self.teachers:
            if t.reader is not None:  # cached: K/V and spans from the cache
                tkv = read_cached(t.name, t.cache_reader(), records, logits=t.logits)
                used = t.layers if t.layers is not None else list(tkv.keys)
                if tkv.shared_spans:
                    aligned = _aligned(tkv.spans[used[0]], tkv.mask[used[0]], spans, mask)
                else:
                    aligned = {j: _aligned(tkv.spans[j], tkv.mask[j], spans, mask) for j in used}
                inputs.append(tkv)
                alignments.append(aligned)
            elif t.tokenizer is not None:  # online
                ti = prepare_teacher(
                    t.tokenizer,
                    records,
                    geometry=t.geometry,
                    max_length=self.max_length,
                    compression=t.compression,
                )
                inputs.append(ti)
                alignments.append(_aligned(ti.spans, ti.attention_mask, spans, mask) if t.keeps_all else None)
            else:
                inputs.append(None)
                alignments.append(None)
        return Collated(records, ids, mask, spans, inputs, alignments)
