"""The sparse MoE blocks of a transformers model, and a capture of their routing and per-expert outputs.

Notation: N = B·T tokens (the blocks flatten the batch), E experts, k experts chosen per token, F hidden
width.

Families (transformers 5): Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3 (shared + routed experts) and
their kin lay a sparse block out the same way: a router `gate` returning (router_logits (N, E), top_k_weights
(N, k), top_k_index (N, k)) and a fused experts module `experts(hidden (N, F), top_k_index, top_k_weights)`
holding every expert's weights as batched tensors (dispatched to an eager loop, grouped_mm, ... by
`use_experts_implementation`). Shared experts (Qwen2-MoE `shared_expert`, DeepSeek `shared_experts`) see every
token and are not part of the routed capture.

Capture (`capture_moe`): a forward hook on each router keeps its logits, weights and choices; with
experts=True the experts module is run, for the capture's duration, on every (token, slot) pair as its own row
with weight 1 (through the module's own forward, whatever kernel it dispatches to), so each chosen expert's
output for each of its tokens is kept before the router weight, and the block's output is their
router-weighted sum, the function the block computes (tests/models/test_moe.py checks both against the
untouched model).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from kvdistill.errors import KvdistillError

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class MoELayer:
    """One sparse MoE block: its decoder layer, router and experts, E, k and how the router scores experts."""

    layer: int
    name: str
    gate: nn.Module
    experts: nn.Module
    num_experts: int
    top_k: int
    scoring: str  # "softmax" | "sigmoid" (DeepSeek-V3-style routers with a score-correction bias)
    width: int


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """The sparse MoE blocks of `model` (a causal LM or its base model), in layer order; [] for a dense
    model."""
    out = []
    for name, module in model.named_modules():
        gate, experts = getattr(module, "gate", None), getattr(module, "experts", None)
        if not isinstance(gate, nn.Module) or not isinstance(experts, nn.Module):
            continue
        num = getattr(experts, "num_experts", None) or getattr(gate, "num_experts", None)
        top_k = getattr(gate, "top_k", None) or getattr(module, "top_k", None)
        m = _LAYER.search(name + ".")
        if num is None or top_k is None or m is None:
            continue
        scoring = "sigmoid" if hasattr(gate, "e_score_correction_bias") else "softmax"
        width = getattr(experts, "hidden_dim", None) or getattr(gate, "hidden_dim", None)
        out.append(MoELayer(int(m.group(1)), name, gate, experts, int(num), int(top_k), scoring, int(width)))
    return sorted(out, key=lambda x: x.layer)


def require_moe(model: nn.Module, what: str) -> list[MoELayer]:
    """`moe_layers(model)`, refused when it has none."""
    layers = moe_layers(model)
    if not layers:
        name = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise KvdistillError(
            f"{what} ({name}) has no sparse MoE block (a router `gate` and fused `experts`)",
            "use an MoE family (mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3) or upcycle a "
            "dense student (student.upcycle), or set losses.routing.weight / losses.expert.weight 0",
        )
    return layers


@dataclass
class MoECapture:
    """Per MoE block i (the order of `layers`): router_logits[i] (N, E), weights[i] (N, k), index[i] (N, k)
    and, with experts, outputs[i] (N, k, F) the chosen experts' outputs before the router weight. Tensors keep
    their graph (a student's capture is differentiated)."""

    layers: list[MoELayer]
    router_logits: list[torch.Tensor | None] = field(default_factory=list)
    weights: list[torch.Tensor | None] = field(default_factory=list)
    index: list[torch.Tensor | None] = field(default_factory=list)
    outputs: list[torch.Tensor | None] = field(default_factory=list)

    def by_token(self, i: int, B: int, T: int) -> dict[str, torch.Tensor | None]:
        """Block i's capture as (B, T, ...) tensors."""
        out = self.outputs[i]
        return {
            "router_logits": self.router_logits[i].reshape(B, T, -1),
            "weights": self.weights[i].reshape(B, T, -1),
            "index": self.index[i].reshape(B, T, -1),
            "outputs": None if out is None else out.reshape(B, T, out.shape[-2], out.shape[-1]),
        }


def attach_capture(layers: list[MoELayer], *, experts: bool = False) -> tuple[MoECapture, list]:
    """Hooks that record every forward's routing (and, with experts, per-expert outputs) of `layers` into the
    returned `MoECapture` (a later forward overwrites an earlier one), and their handles (`h.remove()`
    detaches).

    Experts: a pre-hook hands the experts module every (token, slot) pair as its own row, routed to that one
    expert with weight 1; the hook keeps those (N, k, F) outputs and returns their router-weighted sum (N, F)
    as the module's output. Hooks, not a patched forward: they hold no reference to the module, so a deep copy
    of the model (a LoRA merge) computes with its own weights.
    """
    cap = MoECapture(
        layers, [None] * len(layers), [None] * len(layers), [None] * len(layers), [None] * len(layers)
    )
    pending: dict[int, tuple[torch.Tensor, torch.dtype]] = {}
    handles = []

    def on_gate(slot):
        def store(module, args, output):
            cap.router_logits[slot], cap.weights[slot], cap.index[slot] = output[0], output[1], output[2]

        return store

    def before_experts(slot):
        def rows(module, args, kwargs):
            names = ("hidden_states", "top_k_index", "top_k_weights")
            given = list(args) + [kwargs.pop(n) for n in names[len(args) :]]
            hidden, index, weights = given[:3]
            N, k = index.shape
            pending[slot] = (weights, hidden.dtype)
            ones = torch.ones(N * k, 1, dtype=weights.dtype, device=weights.device)
            # (N·k, F): row n·k + j is token n sent to its j-th expert alone
            return (hidden.repeat_interleave(k, dim=0), index.reshape(N * k, 1), ones, *given[3:]), kwargs

        return rows

    def after_experts(slot):
        def combine(module, args, output):
            weights, dtype = pending.pop(slot)
            N, k = weights.shape
            outs = output.view(N, k, -1)  # (N, k, F) each chosen expert's output before its router weight
            cap.outputs[slot] = outs
            return (outs * weights[..., None]).sum(1).to(dtype)  # (N, F) the block's routed output

        return combine

    for slot, layer in enumerate(layers):
        handles.append(layer.gate.register_forward_hook(on_gate(slot)))
        if experts:
            handles.append(layer.experts.register_forward_pre_hook(before_experts(slot), with_kwargs=True))
            handles.append(layer.experts.register_forward_hook(after_experts(slot)))
    return cap, handles


@contextmanager
def capture_moe(
    model: nn.Module, *, experts: bool = False, layers: list[MoELayer] | None = None
) -> Iterator[MoECapture]:
    """Within the block, every forward of `model` records its MoE blocks' routing (and, with experts,
    per-expert outputs) into the yielded `MoECapture` (`attach_capture`)."""
    cap, handles = attach_capture(layers if layers is not None else moe_layers(model), experts=experts)
    try:
        yield cap
    finally:
        for h in handles:
            h.remove()
