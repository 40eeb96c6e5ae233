"""A cached teacher: K/V read from a directory that `kvdistill extract` wrote.

The reader is passed in (`kvdistill.cache.open_teacher_cache` opens and checks it), so this layer does not
depend on the cache's layout: anything with `meta`, `layers`, `index` and `teacher_kv(ids, device=)` serves.
The read itself (`read_cached`) needs no device, so a DataLoader worker can do it ahead of the step (the
objective's collate does) and the step only copies the batch to the device.
"""

from __future__ import annotations

import dataclasses

import torch

from kvdistill.errors import KvdistillError
from kvdistill.models.kv_geometry import KVGeometry
from kvdistill.teachers.record import TeacherKV


def read_cached(name: str, reader, records: list[dict], *, logits: bool = False) -> TeacherKV:
    """The CPU `TeacherKV` of `records` from `reader` (the cache of teacher `name`); refuses ids it lacks.
    logits: with its stored top-k log-probabilities (`TeacherKV.logits`)."""
    missing = [r["id"] for r in records if r["id"] not in reader.index]
    if missing:
        raise KvdistillError(
            f"cache of teacher '{name}' has no entry for samples {missing[:5]}",
            "extract the cache over the same data config as training",
        )
    return reader.teacher_kv([r["id"] for r in records], device="cpu", logits=logits)


def map_tensors(tkv: TeacherKV, fn) -> TeacherKV:
    """`tkv` with fn applied to its keys, values, spans and masks (and stored logits), once per distinct
    tensor (shared spans stay shared)."""
    done: dict[int, torch.Tensor] = {}

    def once(x: torch.Tensor) -> torch.Tensor:
        if id(x) not in done:
            done[id(x)] = fn(x)
        return done[id(x)]

    return dataclasses.replace(
        tkv,
        **{f: {j: once(x) for j, x in getattr(tkv, f).items()} for f in ("keys", "values", "spans", "mask")},
        logits=None if tkv.logits is None else tkv.logits.map(once),
    )


class CachedTeacher:
    """K/V read from a cache, and its top-k log-probabilities where the cache stores them
    (`reader.meta["logits"]`); hidden states and attentions are refused."""

    kind = "cache"

    def __init__(self, name: str, reader, tokenizer=None):
        self.name = name
        self.reader = reader
        # the one the cache was extracted with (its fingerprint), for logit KD across tokenizers
        self.tokenizer = tokenizer
        self.geometry = KVGeometry.from_dict(reader.meta["teacher"]["geometry"])
        self.layers = reader.layers
        self.device = "cpu"

    def to(self, device) -> CachedTeacher:
        self.device = device
        return self

    def kv(
        self,
        records: list[dict],
        *,
        max_length: int,
        hidden_states=False,
        logits=False,
        attentions=False,
        inputs: TeacherKV | None = None,
    ) -> TeacherKV:
        """The K/V record of `records` on the teacher's device; `inputs`: its `read_cached` CPU record made
        beforehand (e.g. by a DataLoader worker, pinned), else it is read here."""
        if hidden_states or attentions:
            raise KvdistillError(
                f"teacher '{self.name}' comes from a cache, which holds K/V (and top-k logits)",
                "use the kv / cosine / logit_kd losses with cached teachers, or run it online",
            )
        if logits and self.reader.meta.get("logits") is None:
            raise KvdistillError(
                f"teacher '{self.name}' comes from a cache without logits (K/V only)",
                "extract the cache with a logits section (teachers.N.logits), or set "
                "losses.logit_kd.weight: 0",
            )
        tkv = inputs if inputs is not None else read_cached(self.name, self.reader, records, logits=logits)
        return map_tensors(tkv, lambda x: x.to(self.device, non_blocking=True))
