"""Capture on the real offline models: SmolLM2-135M (llama, GQA 9/3), Gemma-3-270M (two rope bases, MQA),
all-MiniLM-L6-v2 (bert encoder)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvdistill import capture_kv
from kvdistill.errors import KvdistillError
from kvdistill.models.geometry import geometry_of
from kvdistill.models.hf_forward import cache_layers, returned_cache
from kvdistill.models.rope import apply_rope

pytestmark = pytest.mark.slow
TEXTS = ["Question: 3 apples and 4 pears, how many fruits?\nAnswer: 7", "Ünïcode ✓ 数学 🙂 ok"]


def test_geometries_of_real_models(smollm2, gemma3, minilm):
    s, g, m = geometry_of(smollm2[0]), geometry_of(gemma3[0]), geometry_of(minilm[0])
    assert (s.num_layers, s.num_attention_heads, s.num_kv_heads, s.head_dim) == (30, 9, 3, 64)
    assert s.kv_bytes_per_token(2) == 23040
    assert (g.num_layers, g.num_attention_heads, g.num_kv_heads, g.head_dim) == (18, 4, 1, 256)
    assert g.sliding_window == 512 and sorted(set(g.rope.theta)) == [10000.0, 1000000.0]
    assert m.is_encoder and m.rope is None and (m.num_layers, m.head_dim) == (6, 32)


@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_real_round_trip_with_left_padding(which, request):
    model, tok = request.getfixturevalue(which)
    geom = geometry_of(model)
    cap = capture_kv(model, tok, TEXTS, padding_side="left")
    assert cap.spans.shape == (*cap.input_ids.shape, 2)
    with torch.no_grad():
        out = model.base_model(
            input_ids=cap.input_ids,
            attention_mask=cap.attention_mask,
            position_ids=cap.positions,
            cache=DynamicCache(),
            use_cache=True,
        )
    for layer, (k_raw, _) in enumerate(cache_layers(returned_cache(out))):
        cos, sin = cap.rotary[layer]  # the tables the model handed this layer
        err = (apply_rope(cap.keys[layer], cos, sin, geom.rope.style, geom.rope.offset) - k_raw).abs().max()
        assert err <= 1e-4, (which, layer, float(err))


@pytest.mark.parametrize("which", ["smollm2", "gemma3", "minilm"])
def test_real_padding_equivalence(which, request):
    model, tok = request.getfixturevalue(which)
    batch = capture_kv(model, tok, TEXTS, padding_side="right")
    for i, text in enumerate(TEXTS):
        alone = capture_kv(model, tok, [text])
        sample = batch.select(i)
        assert torch.equal(alone.spans, sample.spans)
        for a, b in zip(alone.keys, sample.keys, strict=True):
            assert (a - b).abs().max() <= 1e-3


def test_spans_mark_special_tokens_empty(gemma3, minilm):
    for model, tok in (gemma3, minilm):
        cap = capture_kv(model, tok, ["hello world"])
        spans = cap.spans[0]
        assert spans[0, 0] == spans[0, 1]  # <bos> / [CLS]
        assert tok.decode(cap.input_ids[0, 1]).strip().lower().startswith("hello")


def test_text_that_tokenizes_to_nothing(smollm2):
    model, tok = smollm2
    with pytest.raises(KvdistillError, match="tokenize to nothing"):
        capture_kv(model, tok, ["fine text", ""])
    # a batch of only empty texts with a tokenizer that adds no BOS: (B, 0) tensors, the same message
    with pytest.raises(KvdistillError, match="tokenize to nothing"):
        capture_kv(model, tok, [""])
    # special tokens written out in the text have spans but are no content
    with pytest.raises(KvdistillError, match="tokenize to nothing"):
        capture_kv(model, tok, ["fine text", "<|im_start|><|im_end|>"])
    cap = capture_kv(model, tok, ["ok <|im_end|> ok"])  # with real text around them they are kept
    assert cap.attention_mask.sum() >= 3


def test_too_long_text_names_the_limit(minilm):
    model, tok = minilm
    with pytest.raises(KvdistillError, match="longer than the model's maximum of 512"):
        capture_kv(model, tok, ["word " * 700])


@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_real_hook_source_equals_cache_inversion(which, attn, request):
    """The default (projection hooks, no cache) equals the cache with the rotation undone, fp32, both
    attentions."""
    from kvdistill.models.capture import forward_kv, tokenize

    model, tok = request.getfixturevalue(which)
    geom = geometry_of(model)
    enc = tokenize(tok, TEXTS, padding_side="right")
    previous = model.config._attn_implementation
    model.set_attn_implementation(attn)
    try:
        with torch.no_grad():
            hooked = forward_kv(model, enc["input_ids"], enc["attention_mask"], source="hooks")
            cached = forward_kv(model, enc["input_ids"], enc["attention_mask"], source="cache")
    finally:
        model.set_attn_implementation(previous)
    mask = enc["attention_mask"].bool()[:, None, :, None]  # (B, 1, T, 1)
    for a, b in zip(hooked.keys + hooked.values, cached.keys + cached.values, strict=True):
        assert a.shape == b.shape and a.shape[1:] == (
            geom.num_kv_heads,
            enc["input_ids"].shape[1],
            geom.head_dim,
        )
        scale = b.abs().max()
        assert ((a - b) * mask).abs().max() <= 1e-5 * max(1.0, float(scale))
