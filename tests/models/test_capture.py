"""K/V capture on tiny random models of every family: rotary round trip, shift invariance, padding."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvdistill.errors import KvdistillError
from kvdistill.models.capture import forward_kv, hook_plan, positions_from_mask
from kvdistill.models.geometry import geometry_of
from kvdistill.models.hf_forward import cache_layers, enable_checkpointing, returned_cache
from kvdistill.models.rope import apply_rope, rope_cos_sin

from .conftest import ROTARY, TINY

T = 20  # longer than the tiny sliding windows (8)


def _batch(B=2, T=T, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (B, T), generator=g), torch.ones(B, T, dtype=torch.long)


def _raw_cache(model, ids, mask, positions):
    """The model's own cache, every layer a plain DynamicLayer (keeps every token, also past a window)."""
    out = model.base_model(
        input_ids=ids, attention_mask=mask, position_ids=positions, cache=DynamicCache(), use_cache=True
    )
    return cache_layers(returned_cache(out))


@pytest.mark.parametrize("family", ROTARY)
def test_rotary_round_trip_reproduces_model_cache(tiny_models, family):
    model = tiny_models(family)
    geom = geometry_of(model)
    ids, mask = _batch()
    with torch.no_grad():
        cap = forward_kv(model, ids, mask)
        raw = _raw_cache(model, ids, mask, positions_from_mask(mask))
    assert len(cap.keys) == geom.num_layers
    for layer, (k_raw, v_raw) in enumerate(raw):
        assert cap.keys[layer].shape == (2, geom.num_kv_heads, T, geom.head_dim)
        cos, sin = cap.rotary[layer]  # the tables the model handed this layer's attention
        rerotated = apply_rope(cap.keys[layer], cos, sin, geom.rope.style, geom.rope.offset)
        assert (rerotated - k_raw).abs().max() <= 1e-4
        assert not torch.allclose(cap.keys[layer], k_raw, atol=1e-3)  # the rotation really was undone
        assert torch.equal(cap.values[layer], v_raw)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gptj", "phi"])
def test_rope_cos_sin_equals_the_tables_of_a_capture(tiny_models, family):
    model = tiny_models(family)
    geom = geometry_of(model)
    ids, mask = _batch()
    positions = positions_from_mask(mask) + 5
    with torch.no_grad():
        cap = forward_kv(model, ids, mask, positions=positions)
    for layer in range(geom.num_layers):
        cos, sin = rope_cos_sin(model, geom, positions, layer)
        assert torch.allclose(cos, cap.rotary[layer][0]) and torch.allclose(sin, cap.rotary[layer][1])


@pytest.mark.parametrize("family", ROTARY)
def test_prerotation_keys_do_not_depend_on_absolute_position(tiny_models, family):
    """RoPE attention is shift-invariant, so shifting every position leaves pre-rotation keys unchanged:
    an independent check that the cos/sin we invert with are the ones the model applied."""
    model = tiny_models(family)
    ids, mask = _batch()
    with torch.no_grad():
        base = forward_kv(model, ids, mask)
        shifted = forward_kv(model, ids, mask, positions=positions_from_mask(mask) + 11)
        raw_a = _raw_cache(model, ids, mask, positions_from_mask(mask))[0][0]
        raw_b = _raw_cache(model, ids, mask, positions_from_mask(mask) + 11)[0][0]
    assert not torch.allclose(raw_a, raw_b, atol=1e-3)
    for a, b in zip(base.keys, shifted.keys, strict=True):
        assert (a - b).abs().max() <= 1e-4


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text", "phi3", "mistral", "gptj"])
def test_prerotation_keys_equal_key_projection(tiny_models, family):
    """Where the key is one projection (+ per-head norm), hook it and compare to the captured keys."""
    model = tiny_models(family)
    geom = geometry_of(model)
    ids, mask = _batch()
    seen = []
    norm_layers = [m for n, m in model.named_modules() if n.endswith("self_attn.k_norm")]
    proj_layers = [m for n, m in model.named_modules() if n.endswith(("self_attn.k_proj", "attn.k_proj"))]
    hooked = norm_layers or proj_layers
    handles = [m.register_forward_hook(lambda _m, _i, out: seen.append(out)) for m in hooked]
    with torch.no_grad():
        cap = forward_kv(model, ids, mask)
    for h in handles:
        h.remove()
    for layer, out in enumerate(seen):
        ref = out.reshape(2, T, geom.num_kv_heads, geom.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        assert (ref - cap.keys[layer]).abs().max() <= 1e-4


@pytest.mark.parametrize("family", list(TINY))
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_sample_alone(tiny_models, family, side):
    model = tiny_models(family)
    lengths = [T, 13, 6]
    ids, _ = _batch(B=3)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, n in enumerate(lengths):
        if side == "right":
            mask[i, :n] = 1
        else:
            mask[i, T - n :] = 1
    ids = ids * mask  # pad id 0
    with torch.no_grad():
        batch = forward_kv(model, ids, mask)
        for i in range(3):
            real = mask[i].bool()
            alone = forward_kv(model, ids[i : i + 1, real], mask[i : i + 1, real])
            sample = batch.select(i)
            for a, b in zip(alone.keys + alone.values, sample.keys + sample.values, strict=True):
                assert a.shape == b.shape
                assert (a - b).abs().max() <= 1e-4, (family, side, i)


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3_text"])
def test_sliding_window_keeps_every_token(tiny_models, family):
    model = tiny_models(family)
    geom = geometry_of(model)
    assert geom.sliding_window == 8
    ids, mask = _batch(T=30)
    with torch.no_grad():
        cap = forward_kv(model, ids, mask)
    assert all(k.shape[2] == 30 for k in cap.keys)


def test_gemma3_uses_two_bases(tiny_models):
    model = tiny_models("gemma3_text")
    geom = geometry_of(model)
    assert geom.rope.theta == [10000.0, 1000000.0]
    pos = torch.arange(10)[None]
    cos_local, _ = rope_cos_sin(model, geom, pos, 0)
    cos_global, _ = rope_cos_sin(model, geom, pos, 1)
    assert not torch.allclose(cos_local, cos_global)
    # lowest frequency pair: angle = pos * theta^(-(R-2)/R)
    R = geom.rope.rotary_dim
    expected = torch.cos(pos[0].float() * 1000000.0 ** (-(R - 2) / R))
    assert torch.allclose(cos_global[0, :, R // 2 - 1], expected, atol=1e-5)


def test_optional_outputs_and_router_logits(tiny_models):
    model = tiny_models("mixtral")
    ids, mask = _batch()
    with torch.no_grad():
        cap = forward_kv(
            model, ids, mask, hidden_states=True, logits=True, attentions=True, router_logits=True
        )
    assert len(cap.hidden_states) == 3 and cap.hidden_states[0].shape == (2, T, 64)
    assert cap.logits.shape == (2, T, 128)
    assert len(cap.attentions) == 2 and cap.attentions[0].shape == (2, 4, T, T)
    assert cap.router_logits is not None and cap.router_logits[0].shape[-1] == 4


def test_encoder_keys_from_projection_hooks(tiny_models):
    model = tiny_models("bert")
    ids, mask = _batch()
    with torch.no_grad():
        cap = forward_kv(model, ids, mask, hidden_states=True)
        h = cap.hidden_states[0]
        ref = model.encoder.layer[0].attention.self.key(h).view(2, T, 4, 16).transpose(1, 2)
    assert cap.geometry.is_encoder
    assert (cap.keys[0] - ref).abs().max() <= 1e-5


def test_mismatched_batch_shapes_are_rejected(tiny_models):
    model = tiny_models("llama")
    with pytest.raises(KvdistillError, match=r"input_ids \(2, 5\) and attention_mask \(2, 4\)"):
        forward_kv(model, torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text"])
def test_gradient_checkpointing_capture_matches_cache_capture(family):
    from .conftest import build_tiny

    model = build_tiny(family)
    ids, mask = _batch()
    with torch.no_grad():
        ref = forward_kv(model, ids, mask)
    enable_checkpointing(model)
    model.train()
    cap = forward_kv(model, ids, mask, logits=True)
    for a, b in zip(ref.keys + ref.values, cap.keys + cap.values, strict=True):
        assert (a - b).abs().max() <= 1e-4
    loss = sum(k.square().mean() for k in cap.keys) + cap.logits.mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad and p.dim() > 1)


# ------------------------------------------------------------------------------------------ hooks vs cache
HOOK_FAMILIES = [f for f in TINY if f != "bert"]  # every one of them: k_proj / k_norm / a fused qkv split


def _hooks_equal_cache(model, ids, mask, tol=1e-5):
    geom = geometry_of(model)
    with torch.no_grad():
        hooked = forward_kv(model, ids, mask, source="hooks", logits=True)
        cached = forward_kv(model, ids, mask, source="cache", logits=True)
    assert len(hooked.keys) == len(cached.keys) == geom.num_layers
    for a, b in zip(hooked.keys + hooked.values, cached.keys + cached.values, strict=True):
        assert a.shape == b.shape == (ids.shape[0], geom.num_kv_heads, ids.shape[1], geom.head_dim)
        assert (a - b).abs().max() <= tol
    assert torch.equal(hooked.logits, cached.logits)


@pytest.mark.parametrize("family", HOOK_FAMILIES)
def test_hook_source_equals_cache_inversion(tiny_models, family):
    model = tiny_models(family)
    assert hook_plan(model, geometry_of(model)) is not None
    ids, mask = _batch(B=3)
    mask[1, 13:] = 0  # right padding on one sample
    _hooks_equal_cache(model, ids * mask, mask)


@pytest.mark.parametrize(
    "family, overrides",
    [
        # several KV heads: the (B, H, T, D) output of gemma3's k_norm must not be read as (B, T, H, D)
        ("gemma3_text", dict(num_key_value_heads=2)),
        ("qwen3", dict(num_key_value_heads=4)),
        ("phi", dict(qk_layernorm=True, partial_rotary_factor=0.5)),
    ],
)
def test_hook_source_layouts_with_several_kv_heads(family, overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(family, **{**TINY[family], **overrides})
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    ids, mask = _batch()
    _hooks_equal_cache(model, ids, mask)


def test_auto_source_uses_hooks_and_builds_no_cache(tiny_models, monkeypatch):
    import kvdistill.models.capture as capture

    def no_cache(*_a, **_k):
        raise AssertionError("the cache path ran")

    monkeypatch.setattr(capture, "cached_decoder_kv", no_cache)
    ids, mask = _batch()
    with torch.no_grad():
        cap = forward_kv(tiny_models("llama"), ids, mask)
    assert len(cap.keys) == 2


def test_hooks_refused_where_no_module_holds_the_key(tiny_models):
    """Latent attention caches a latent: no module's output is the per-head pre-rotation key."""
    from .tiny import build

    ids, mask = _batch()
    with pytest.raises(KvdistillError, match="no module per layer whose output is the pre-rotation key"):
        forward_kv(build("deepseek_v3"), ids, mask, source="hooks")
    with pytest.raises(KvdistillError, match="source 'x' is unknown"):
        forward_kv(tiny_models("llama"), ids, mask, source="x")


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma3_text", "gpt2"])
@pytest.mark.parametrize("source", ["cache", "hooks"])
def test_capture_calls_nothing_deprecated(tiny_models, family, source):
    """transformers 5.24 deprecates `past_key_values=` (removed in 5.40): capture passes `cache=` /
    use_cache."""
    import warnings

    ids, mask = _batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        with torch.no_grad():
            forward_kv(tiny_models(family), ids, mask, source=source)
