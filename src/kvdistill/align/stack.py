"""The student → teacher projectors of one teacher's mapped layers as stacked parameters.

Notation: L mapped student layers, B batch, T tokens, H_s/H_t student/teacher KV heads, D_s/D_t head dims,
F_s = H_s·D_s, F_t = H_t·D_t. Index [l, 0] is layer l's key map, [l, 1] its value map.

`KVProjectorStack` is the same function as L separate `KVProjector`s (`heads.project_layers` of them), with
one tensor per kind of parameter per teacher instead of 2·L maps of up to 3 tensors each: the optimizer,
gradient clipping and gradient accumulation then touch a handful of tensors per teacher (each tensor is at
least one kernel launch per step on a GPU), and nothing is stacked per step. It is initialised from L
`KVProjector`s built in order, so its start equals theirs draw for draw, and a state dict of the per-layer
layout (``<layer>.key_map.mix``, ...) loads into it.

One difference from separate tensors: a map that gets no gradient (the value maps under a keys-only loss) now
has a zero gradient in its slots rather than none. AdamW leaves it unchanged (a zero gradient moves nothing)
unless train.weight_decay > 0, which then decays it as it decays every map.
"""

from __future__ import annotations

import torch
from torch import nn

from kvdistill.align.heads import KVProjector, fold_per_head, project_stacked
from kvdistill.errors import KvdistillError

_PARTS = {"per_head": ("mix", "weight", "bias"), "linear": ("weight", "bias"), "identity": ()}
_OLD_NAMES = {
    "per_head": {"mix": "mix", "weight": "weight", "bias": "bias"},
    "linear": {"weight": "linear.weight", "bias": "linear.bias"},
}


class KVProjectorStack(nn.Module):
    """Maps of student layers `layers` into `teacher`'s geometry (kind as `KVProjector`), stacked.

    Parameters: per_head mix (L, 2, H_t, H_s), weight (L, 2, H_t, D_t, D_s), bias (L, 2, H_t, D_t); linear
    weight (L, 2, F_t, F_s), bias (L, 2, F_t); identity none. `project(keys, values)` -> (L, 2, B, T, F_t).
    """

    def __init__(self, student, teacher, kind: str, layers: list[int]):
        super().__init__()
        projectors = [
            KVProjector(student, teacher, kind=kind) for _ in layers
        ]  # the per-layer draws, in order
        p0 = projectors[0]
        self.kind, self.H_s, self.D_s, self.H_t, self.D_t = p0.kind, p0.H_s, p0.D_s, p0.H_t, p0.D_t
        self.geometries = (student, teacher)
        self.layers = list(layers)
        self.position = {i: p for p, i in enumerate(self.layers)}
        for part in _PARTS[self.kind]:
            name = _OLD_NAMES[self.kind][part]
            self.register_parameter(
                part,
                nn.Parameter(
                    torch.stack(
                        [
                            torch.stack([p.key_map.get_parameter(name), p.value_map.get_parameter(name)])
                            for p in projectors
                        ]
                    ).detach()
                ),
            )
        self._register_load_state_dict_pre_hook(self._from_per_layer_layout)

    def __len__(self) -> int:
        return len(self.layers)

    def matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(2L, F_t, F_s) weights and (2L, F_t) biases, keys of layer 0, values of layer 0, keys of layer 1,
        ..."""
        L, F_t, F_s = len(self), self.H_t * self.D_t, self.H_s * self.D_s
        if self.kind == "linear":
            return self.weight.reshape(2 * L, F_t, F_s), self.bias.reshape(2 * L, F_t)
        return fold_per_head(self.mix.flatten(0, 1), self.weight.flatten(0, 1), self.bias.flatten(0, 1))

    def project(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
        """K and V of the L layers, (B, H_s, T, D_s) each, in one batched matmul -> (L, 2, B, T, F_t),
        token-major. Computed in the inputs' dtype for bf16 / fp16, else the parameters'."""
        if len(keys) != len(self) or len(values) != len(self):
            raise KvdistillError(
                f"the projector stack maps {len(self)} layers, got {len(keys)} keys and {len(values)} values",
                "pass one key and one value tensor per mapped layer",
            )
        weight, bias = (
            (None, None) if self.kind == "identity" else self.matrices()
        )  # (2L, F_t, F_s), (2L, F_t)
        return project_stacked(keys, values, weight, bias, self)

    def projector(self, layer: int) -> KVProjector:
        """A standalone `KVProjector` holding a copy of student layer `layer`'s maps (for references and
        reports; training the copy does not train the stack). The global RNG is left as it was."""
        p = self.position[layer]
        with torch.random.fork_rng(devices=[]):
            out = KVProjector(*self.geometries, kind=self.kind)
        with torch.no_grad():
            for side, m in enumerate((out.key_map, out.value_map)):
                for part in _PARTS[self.kind]:
                    m.get_parameter(_OLD_NAMES[self.kind][part]).copy_(getattr(self, part)[p, side])
        return out.to(self.bias.device) if self.kind != "identity" else out

    def _from_per_layer_layout(self, state_dict, prefix, *args) -> None:
        """Checkpoints written before the stack hold ``<prefix><layer>.key_map.<name>``: stacked here."""
        for part in _PARTS[self.kind]:
            name = _OLD_NAMES[self.kind][part]
            old = [[f"{prefix}{i}.{side}.{name}" for side in ("key_map", "value_map")] for i in self.layers]
            if prefix + part not in state_dict and all(k in state_dict for row in old for k in row):
                state_dict[prefix + part] = torch.stack(
                    [torch.stack([state_dict.pop(k) for k in row]) for row in old]
                )
