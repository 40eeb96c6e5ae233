"""MoE blocks found in every MoE family; the captured per-expert outputs recombined with the router weights
reproduce the untouched MoE layer's output, and each is the expert's own FFN on its token."""

from __future__ import annotations

import pytest
import torch
from tests.moe_tiny import FAMILIES, moe_model

from kvdistill.errors import KvdistillError
from kvdistill.models.moe import capture_moe, moe_layers, require_moe


def _block_outputs(model, ids, mask):
    """The routed experts' output (N, F) of every MoE block, from the untouched model (hooks that only
    read)."""
    got = {}
    handles = [
        layer.experts.register_forward_hook(lambda m, a, out, i=i: got.__setitem__(i, out.detach()))
        for i, layer in enumerate(moe_layers(model))
    ]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    for h in handles:
        h.remove()
    return got, logits


@pytest.mark.parametrize("family", list(FAMILIES))
def test_captured_expert_outputs_recombine_to_the_layer_output(family):
    model = moe_model(family)
    layers = moe_layers(model)
    assert [x.layer for x in layers] == [0, 1] and all(x.num_experts == 4 and x.top_k == 2 for x in layers)
    assert {x.scoring for x in layers} == {"sigmoid" if family == "deepseek_v3" else "softmax"}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    reference, ref_logits = _block_outputs(model, ids, mask)
    with torch.no_grad(), capture_moe(model, experts=True) as cap:
        logits = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)  # the capture changes nothing
    for i in range(len(layers)):
        out, w, idx = cap.outputs[i], cap.weights[i], cap.index[i]  # (N, k, F), (N, k), (N, k)
        assert out.shape == (14, 2, 32) and idx.shape == (14, 2)
        recombined = (out * w[..., None]).sum(1)  # Σ_j w_j · expert_j(x)
        torch.testing.assert_close(recombined, reference[i], rtol=1e-5, atol=1e-6)
        assert cap.router_logits[i].shape == (14, 4)
        # the routing follows the router's logits: the chosen experts are the top-k by score
        if family != "deepseek_v3":
            top = cap.router_logits[i].topk(2, dim=-1).indices.sort(-1).values
            assert torch.equal(top, idx.sort(-1).values)


def test_each_captured_output_is_that_experts_ffn():
    """Mixtral: slot j of token n == down_e(act(gate_e x) · up_e x) with e = index[n, j], by hand."""
    model = moe_model("mixtral")
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    inputs = {}
    block = model.model.layers[1].mlp
    h = block.experts.register_forward_pre_hook(lambda m, a: inputs.__setitem__("x", a[0].detach()))
    with torch.no_grad(), capture_moe(model, experts=True) as cap:
        model(input_ids=ids)
    h.remove()
    x = inputs["x"]  # (N, F): this hook runs before the capture's, so it sees the block's own input
    ex = block.experts
    for n in range(6):
        for j in range(2):
            e = int(cap.index[1][n, j])
            gate, up = (x[n] @ ex.gate_up_proj[e].T).chunk(2)
            want = (torch.nn.functional.silu(gate) * up) @ ex.down_proj[e].T
            torch.testing.assert_close(cap.outputs[1][n, j], want, rtol=1e-5, atol=1e-6)


def test_capture_keeps_the_graph_and_detaches_cleanly():
    model = moe_model("qwen2_moe").train()
    ids = torch.randint(3, 128, (2, 5))
    with capture_moe(model, experts=True) as cap:
        model(input_ids=ids)
    (cap.outputs[0].sum() + cap.router_logits[1].sum()).backward()
    assert model.model.layers[0].mlp.experts.down_proj.grad.abs().sum() > 0
    assert model.model.layers[1].mlp.gate.weight.grad.abs().sum() > 0
    layer = moe_layers(model)[0]
    assert not layer.gate._forward_hooks and not layer.experts._forward_hooks
    assert not layer.experts._forward_pre_hooks


def test_dense_models_have_no_moe_blocks():
    from transformers import AutoConfig, AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(
            "llama",
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    assert moe_layers(dense) == []
    with pytest.raises(KvdistillError, match="no sparse MoE block"):
        require_moe(dense, "the student")
