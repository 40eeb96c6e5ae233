"""Answer-row importance from hooked queries equals `importance_from_attention` of the eager probabilities."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from kvdistill.compress import importance_from_attention
from kvdistill.errors import KvdistillError
from kvdistill.models.capture import capture_kv, forward_kv
from kvdistill.models.geometry import geometry_of
from kvdistill.models.queries import capture_queries, query_importance, supports_queries

from .conftest import TINY

TEXTS = [
    "The quick brown fox jumps over the lazy dog, then sleeps for a while under the warm afternoon sun.",
    "Two plus two is four.",
    "A cache keeps the keys and the values of every layer for later.",
]


def _tiny(family: str, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model(family, **{**TINY[family], **extra})
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval().float()


def _query_mask(mask: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """(B, T) a random subset of real rows, at least the last real token of each sample."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.rand(mask.shape, generator=g) < 0.3).long() * mask
    last = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # (B,) last real index
    q[torch.arange(mask.shape[0]), last] = 1
    return q


def _compare(model, cap_fn, atol=1e-5):
    geometry = geometry_of(model)
    assert supports_queries(geometry)
    with capture_queries(model, geometry) as qc:
        cap = cap_fn(attentions=True)
    query = _query_mask(cap.attention_mask.cpu()).to(cap.attention_mask.device)
    layers = list(range(geometry.num_layers))
    got = query_importance(model, cap, qc.queries, query, layers)
    for layer in layers:
        want = importance_from_attention(
            cap.attentions[layer], query, cap.attention_mask, geometry.num_kv_heads
        )
        assert got[layer].shape == want.shape
        torch.testing.assert_close(got[layer], want.float(), atol=atol, rtol=1e-4, msg=f"layer {layer}")
    return cap


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize(
    "family, extra",
    [
        ("llama", {}),
        ("qwen3", {}),
        ("gemma2", {"attn_logit_softcapping": 5.0, "query_pre_attn_scalar": 24}),  # softcap, window 8
        ("gemma3_text", {"query_pre_attn_scalar": 20}),  # q_norm on (B, H, T, D), sliding layer 0
        ("mistral", {}),  # window 8 on every layer, MQA
        ("qwen2", {}),
    ],
)
def test_tiny_families_equal_eager_attention(family, extra, side):
    model = _tiny(family, **extra)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (3, 21), generator=g)
    mask = torch.ones(3, 21, dtype=torch.long)
    lengths = [21, 9, 14]  # longer than the window of 8, so the window matters
    for b, n in enumerate(lengths):
        if side == "right":
            mask[b, n:] = 0
        else:
            mask[b, : 21 - n] = 0

    def cap_fn(attentions):
        with torch.no_grad():
            return forward_kv(model, ids, mask, attentions=attentions)

    _compare(model, cap_fn)


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["smollm2", "gemma3"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_real_models_equal_eager_attention(request, fixture, side):
    model, tok = request.getfixturevalue(fixture)
    texts = TEXTS
    if fixture == "gemma3":  # texts longer than gemma3-270m's 512-token window, so the window matters
        assert model.config.sliding_window == 512
        texts = [" ".join(TEXTS[i:] + TEXTS[:i]) * (14 - 3 * i) for i in range(3)]
    cap = _compare(
        model, lambda attentions: capture_kv(model, tok, texts, padding_side=side, attentions=attentions)
    )
    if fixture == "gemma3":
        assert int(cap.attention_mask.sum(1).max()) > 512


def test_unsupported_families_are_refused():
    torch.manual_seed(0)
    config = AutoConfig.for_model("gpt_neox", **TINY["gpt_neox"])
    model = AutoModelForCausalLM.from_config(config).eval()
    assert not supports_queries(geometry_of(model))
    with pytest.raises(KvdistillError, match="eager attention"), capture_queries(model):
        pass


def _one_layer(model, cap, queries, query, layer):
    """The importance of one layer without a layer dim: what query_importance computed before it stacked
    layers."""
    from kvdistill.compress.select import importance_from_queries, query_rows
    from kvdistill.models.queries import attention_modules, layer_attention_params
    from kvdistill.models.rope import apply_rope

    geometry = cap.geometry
    rows, valid = query_rows(query, cap.attention_mask)  # (B, Q)
    q = queries[layer]
    B, H_q, _, D = q.shape
    q_rows = q.gather(2, rows[:, None, :, None].expand(B, H_q, rows.shape[1], D))  # (B, H_q, Q, D)
    cos, sin = cap.rotary[layer]  # (B, T, R)
    idx = rows[..., None].expand(*rows.shape, cos.shape[-1])
    params = layer_attention_params(attention_modules(model, geometry)[layer], geometry, layer)
    style = geometry.rope.style
    return importance_from_queries(
        apply_rope(q_rows.float(), cos.gather(1, idx), sin.gather(1, idx), style),
        rows,
        valid,
        apply_rope(cap.keys[layer].float(), cos, sin, style),
        cap.attention_mask,
        scaling=params["scaling"],
        softcap=params["softcap"],
        sliding_window=params["window"],
    )


@pytest.mark.parametrize(
    "family, extra",
    [
        ("llama", {"num_hidden_layers": 3}),
        ("gemma3_text", {"query_pre_attn_scalar": 20}),  # a sliding and a global layer: two tables
        ("mistral", {}),
    ],
)
def test_stacked_layers_equal_one_layer_at_a_time(family, extra):
    """query_importance stacks the layers that share their rotary table and attention parameters over a layer
    dim (and takes query rows made on the host); every layer equals its own unstacked computation exactly."""
    from kvdistill.compress.select import query_rows

    model = _tiny(family, **extra)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 128, (3, 21), generator=g)
    mask = torch.ones(3, 21, dtype=torch.long)
    mask[1, 9:] = 0
    mask[2, 14:] = 0
    geometry = geometry_of(model)
    with capture_queries(model, geometry) as qc, torch.no_grad():
        cap = forward_kv(model, ids, mask)
    query = _query_mask(mask)
    layers = list(range(geometry.num_layers))
    for group in (1, 2, 8):
        got = query_importance(model, cap, qc.queries, query, layers, group=group)
        rows = query_rows(query, mask)
        given = query_importance(model, cap, qc.queries, query, layers, rows=rows, group=group)
        assert list(got) == layers
        for layer in layers:
            want = _one_layer(model, cap, qc.queries, query, layer)
            assert torch.equal(got[layer], want), (group, layer)
            assert torch.equal(given[layer], want), (group, layer)
    assert list(query_importance(model, cap, qc.queries, query, layers[::-1])) == layers[::-1]


@pytest.mark.parametrize(
    "family, extra", [("llama", {"num_key_value_heads": 4}), ("qwen3", {"num_key_value_heads": 4})]
)
def test_window_logits_give_the_eager_attention_rows(family, extra):
    """R-KV's window logits: with one query head per KV head (the group max is the head itself), their softmax
    over the keys a window row sees is the model's own eager attention row (rotation, scaling and q_norm
    included)."""
    from kvdistill.compress import query_rows
    from kvdistill.compress.latent import window_rows
    from kvdistill.models.queries import window_logits

    model = _tiny(family, **extra)
    geometry = geometry_of(model)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 128, (2, 15), generator=g)
    mask = torch.ones(2, 15, dtype=torch.long)
    mask[1, 11:] = 0  # right padding
    with capture_queries(model, geometry) as qc, torch.no_grad():
        cap = forward_kv(model, ids, mask, attentions=True)
    rows, valid = query_rows(window_rows(mask, 3), mask)  # (B, Q)
    got = window_logits(model, cap, qc.queries, rows, list(range(geometry.num_layers)))
    for layer, logits in got.items():
        assert logits.shape == (2, geometry.num_kv_heads, 3, 15)
        for b in range(2):
            for q in range(3):
                row = int(rows[b, q])
                seen = mask[b, : row + 1].bool()
                want = cap.attentions[layer][b, :, row, : row + 1][:, seen]
                torch.testing.assert_close(
                    logits[b, :, q, : row + 1][:, seen].softmax(-1), want.float(), atol=1e-5, rtol=1e-4
                )
