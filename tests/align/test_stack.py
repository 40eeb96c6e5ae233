"""KVProjectorStack: the same start, function and gradients as the per-layer KVProjectors it replaces, a state
dict of the per-layer layout loads into it, and `projector(layer)` is a faithful standalone copy."""

from __future__ import annotations

import pytest
import torch
from tests.align.test_heads import GQA_9_3, MQA_4_1
from torch import nn

from kvdistill.align.heads import KVProjector, project_layers
from kvdistill.align.stack import KVProjectorStack
from kvdistill.errors import KvdistillError

LAYERS = [0, 2, 5]


def geometries(kind):
    return (GQA_9_3, MQA_4_1) if kind != "identity" else (GQA_9_3, GQA_9_3)


def pair(kind, seed=0):
    """A stack and the per-layer projectors built from the same seed, both moved off their start alike."""
    student, teacher = geometries(kind)
    torch.manual_seed(seed)
    stack = KVProjectorStack(student, teacher, kind, LAYERS)
    torch.manual_seed(seed)
    per_layer = nn.ModuleDict({str(i): KVProjector(student, teacher, kind=kind) for i in LAYERS})
    start = {k: v.clone() for k, v in per_layer.state_dict().items()}
    stack.load_state_dict(start)  # the per-layer layout loads (and is what both start from)
    return stack, per_layer, start


@pytest.mark.parametrize("kind", ["per_head", "linear", "identity"])
def test_same_start_function_and_gradients_as_per_layer_projectors(kind):
    student, teacher = geometries(kind)
    torch.manual_seed(3)
    fresh = KVProjectorStack(student, teacher, kind, LAYERS)
    torch.manual_seed(3)
    per_layer = [KVProjector(student, teacher, kind=kind) for _ in LAYERS]
    for name, param in fresh.named_parameters():  # the same draws, in order
        ref = torch.stack(
            [
                torch.stack(
                    [
                        dict(m.named_parameters())[
                            {"mix": "mix", "weight": "weight", "bias": "bias"}[name]
                            if kind == "per_head"
                            else f"linear.{name}"
                        ]
                        for m in (p.key_map, p.value_map)
                    ]
                )
                for p in per_layer
            ]
        )
        assert torch.equal(param, ref), name
    stack, layers, _ = pair(kind)
    with torch.no_grad():  # layers, keys and values differ
        for p in layers.parameters():
            p.add_(0.1 * torch.randn_like(p))
    stack.load_state_dict(layers.state_dict())
    ks = [torch.randn(2, 5, 3, 64).transpose(1, 2).requires_grad_() for _ in LAYERS]  # (B, H_s, T, D_s)
    vs = [torch.randn(2, 3, 5, 64, requires_grad=True) for _ in LAYERS]
    got = stack.project(ks, vs)  # (L, 2, B, T, F_t)
    ref = project_layers([layers[str(i)] for i in LAYERS], ks, vs)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    if kind == "identity":
        assert not list(stack.parameters())
        return
    w = torch.randn_like(got)
    g_stack = torch.autograd.grad((got * w).sum(), [*ks, *vs, *stack.parameters()])
    g_ref = torch.autograd.grad((ref * w).sum(), [*ks, *vs, *layers.parameters()])
    for a, b in zip(g_stack[: 2 * len(LAYERS)], g_ref[: 2 * len(LAYERS)], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the stacked parameters' gradients, unstacked, are the per-layer ones
    loaded = dict(zip([n for n, _ in layers.named_parameters()], g_ref[2 * len(LAYERS) :], strict=True))
    probe = KVProjectorStack(student, teacher, kind, LAYERS)
    probe.load_state_dict(loaded)
    for (name, g), ref_g in zip(
        zip([n for n, _ in stack.named_parameters()], g_stack[2 * len(LAYERS) :], strict=True),
        probe.parameters(),
        strict=True,
    ):
        torch.testing.assert_close(g, ref_g, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("kind", ["per_head", "linear"])
def test_projector_of_a_layer_is_a_copy_of_its_maps(kind):
    stack, layers, _ = pair(kind)
    with torch.no_grad():
        for p in stack.parameters():
            p.add_(0.1 * torch.randn_like(p))
    state = torch.random.get_rng_state()
    one = stack.projector(5)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    x = torch.randn(2, 3, 4, 64)
    ks, vs = [x] * 3, [x + 1] * 3
    full = stack.project(ks, vs)  # (L, 2, B, T, F_t)
    for side, (which, inp) in enumerate((("keys", x), ("values", x + 1))):
        got = one(inp, which=which).transpose(1, 2).reshape(full.shape[2:])
        torch.testing.assert_close(got, full[2, side], rtol=1e-5, atol=1e-5)
    assert not any(p is q for p in one.parameters() for q in stack.parameters())


def test_wrong_layer_count_and_shapes_are_refused():
    stack, _, _ = pair("per_head")
    x = torch.randn(2, 3, 4, 64)
    with pytest.raises(KvdistillError, match="maps 3 layers, got 2 keys"):
        stack.project([x, x], [x, x])
    with pytest.raises(KvdistillError, match=r"expects student keys and values \(B, 3, T, 64\)"):
        stack.project([torch.randn(2, 4, 4, 64)] * 3, [torch.randn(2, 4, 4, 64)] * 3)
