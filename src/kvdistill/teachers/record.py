"""The teacher-side K/V record of one batch, what every teacher source (online model or on-disk cache)
returns.

Notation: B batch, H teacher KV heads, M kept tokens per layer (M = T_t when uncompressed), D head dim.

Per stored layer l: keys[l], values[l] (B, H, M, D) pre-rotation; spans[l] (B, H, M, 2) spans of the kept
tokens; mask[l] (B, H, M) 1 where a real token is kept. Uncompressed teachers share one (B, T_t, 2) span
tensor and one (B, T_t) mask across layers and heads (`shared_spans`), so the token alignment is computed once
per batch. An online teacher's logits are in its capture (B, T_t, V); a cached one's, when its cache stores
them, in `logits` (`kvdistill.teachers.logits.TeacherLogits`: top-k log-probabilities, (B, T_t, k)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvdistill.models.capture import KVCapture
from kvdistill.teachers.logits import TeacherLogits


@dataclass
class TeacherKV:
    keys: dict[int, torch.Tensor]  # layer -> (B, H, M, D)
    values: dict[int, torch.Tensor]  # layer -> (B, H, M, D)
    spans: dict[int, torch.Tensor]  # layer -> (B, H, M, 2) or the shared (B, T_t, 2)
    mask: dict[int, torch.Tensor]  # layer -> (B, H, M) or the shared (B, T_t)
    shared_spans: bool = True
    capture: KVCapture | None = None  # online, uncompressed: hidden states, logits, attentions
    compression: dict | None = None  # Compression.to_dict() of the selection that produced it; None = full
    sample_ids: list[str] | None = None  # cached teachers: the ids the batch was read for
    logits: TeacherLogits | None = None  # cached teachers with stored logits: top-k log-probabilities
    nll_per_byte: torch.Tensor | None = (
        None  # (B,) fusion.kind confidence: the teacher's NLL per byte of each
    )
    # sample's scored text (`kvdistill.fuse.confidence.byte_nll`), NaN where none was scored

    def host_spans(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Spans and mask of `layer` on the CPU, without a device-to-host copy when the capture kept CPU
        copies of the shared ones (token alignment is built on the CPU)."""
        cap = self.capture
        if cap is not None and self.spans[layer] is cap.spans and cap.spans_cpu is not None:
            return cap.spans_cpu, cap.attention_mask_cpu
        return self.spans[layer].cpu(), self.mask[layer].cpu()

    @classmethod
    def from_capture(cls, cap: KVCapture, layers: list[int]) -> TeacherKV:
        """The uncompressed record of `layers` of a capture: its K/V as they are, shared spans (B, T, 2)."""
        return cls(
            keys={i: cap.keys[i] for i in layers},
            values={i: cap.values[i] for i in layers},
            spans=dict.fromkeys(layers, cap.spans),
            mask=dict.fromkeys(layers, cap.attention_mask),
            shared_spans=True,
            capture=cap,
        )
