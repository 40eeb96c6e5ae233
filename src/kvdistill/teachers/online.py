"""An online teacher: a frozen model run under no_grad on every batch."""

from __future__ import annotations

import threading

import torch

from kvdistill.models.geometry import geometry_of
from kvdistill.models.kv_geometry import KVGeometry
from kvdistill.teachers.capture import TeacherInputs, capture_teacher, compress_capture
from kvdistill.teachers.record import TeacherKV


class OnlineTeacher:
    """A frozen model run on every batch; `compression` (a `kvdistill.compress.Compression`, None = full) is
    applied to its capture, keeping `layers` (default all)."""

    kind = "online"

    def __init__(self, name: str, model, tokenizer, *, compression=None, layers: list[int] | None = None):
        self.name = name
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.geometry: KVGeometry = geometry_of(model, name=name)
        self.compression = compression
        self.layers = layers if layers is not None else list(range(self.geometry.num_layers))
        self.lock = threading.Lock()  # one capture at a time: its hooks sit on the module during a call

    def to(self, device) -> OnlineTeacher:
        self.model.to(device)
        return self

    @torch.no_grad()
    def kv(
        self,
        records: list[dict],
        *,
        max_length: int,
        hidden_states=False,
        logits=False,
        attentions=False,
        inputs: TeacherInputs | None = None,
    ) -> TeacherKV:
        """The K/V record of `records`; `inputs`: their `prepare_teacher` tokenization made beforehand (e.g.
        by a DataLoader worker), else the records are tokenized here. Thread-safe: calls on one teacher run
        one at a time (`objectives.ahead` runs them on another thread)."""
        with self.lock:
            return self._kv(
                records,
                max_length=max_length,
                hidden_states=hidden_states,
                logits=logits,
                attentions=attentions,
                inputs=inputs,
            )

    def _kv(self, records, *, max_length, hidden_states, logits, attentions, inputs) -> TeacherKV:
        cap, query = capture_teacher(
            self.model,
            self.tokenizer,
            records,
            max_length=max_length,
            compression=self.compression,
            layers=self.layers,
            hidden_states=hidden_states,
            logits=logits,
            attentions=attentions,
            inputs=inputs,
            geometry=self.geometry,
        )
        if getattr(self.compression, "kind", "full") == "full":
            return TeacherKV.from_capture(cap, self.layers)
        return compress_capture(cap, self.compression, self.layers, query)
