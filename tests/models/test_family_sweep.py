"""K/V capture over every causal-LM family the installed transformers ships, each as a tiny random model.

For each family (`transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, built by
`tests/models/tiny.py`): does the model keep a K/V cache at all (its own forward with `use_cache=True`,
independent of kvdistill)? If it does, kvdistill must
  - derive the same geometry from the config alone as from the model, matching the cache's (H_kv, D),
  - give a right-padded batch the K/V each sample gets alone,
  - return pre-rotation keys that, rotated again with the tables the model applied, are the model's own cache
    keys (learned / no positions: keys equal the cache), values equal to the cache's,
  - return first-layer pre-rotation keys that do not move when every position is shifted (an independent check
    that the rotation undone is the one the model applied: the layer's input holds no position),
  - give the same K/V from projection hooks as from the cache, where hooks are found.
A family without a K/V cache (state-space, recurrent) must be refused with "no attention layers to capture".
Coverage is P/B over the buildable families that keep a K/V cache; families that cannot be built tiny are
listed.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass

import pytest
import torch
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from kvdistill.errors import KvdistillError
from kvdistill.models.capture import forward_kv, hook_plan
from kvdistill.models.geometry import decoder_attention_modules, geometry_of
from kvdistill.models.rope import apply_rope

from .tiny import VOCAB, build

FAMILIES = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
COVERAGE_FLOOR = 0.95  # of the buildable families with a K/V cache (172/175 = 0.98 with transformers 5.24)
# must pass whatever else happens: the families supported before the sweep, and the ones the issue names
REQUIRED = {
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3",
    "gemma3_text",
    "phi",
    "phi3",
    "gpt_neox",
    "gptj",
    "gpt2",
    "opt",
    "falcon",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "smollm3",
    "olmo2",
    "olmoe",
    "granite",
    "cohere2",
    "starcoder2",
    "stablelm",
    "deepseek_v3",
    "gpt_oss",
    "llama4_text",
    "glm4",
    "exaone4",
    "bloom",
    "gpt_bigcode",
    "mpt",
    "codegen",
}
T = 20  # longer than the tiny windows (8)
SHIFT = 11


@dataclass
class Result:
    family: str
    status: str  # pass | fail | no_cache | unbuilt
    reason: str = ""
    seconds: float = 0.0
    source: str = ""


def _cache_of(out):
    keys = out.keys()
    for name in ("cache", "past_key_values"):
        if name in keys and out[name] is not None:
            return out[name]
    return None


def _reference_cache(model, ids, positions, keep_all: bool):
    """(keys, values) per decoder layer from the model's own forward; sliding layers asked to keep their
    past."""
    from transformers import DynamicCache

    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    if positions is not None:
        kwargs["position_ids"] = positions
    if keep_all:
        cache = DynamicCache(config=model.config)
        for layer in cache.layers:
            if hasattr(layer, "activate_past_recording"):
                layer.activate_past_recording()
        kwargs["cache"] = cache
    cache = _cache_of(model(**kwargs))
    if cache is None:
        return None
    cache = getattr(cache, "self_attention_cache", cache)
    return [(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in cache.layers]


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max(1, max |b|); inf when the shapes differ."""
    if a.shape != b.shape:
        return float("inf")
    return float((a.float() - b.float()).abs().max()) / max(1.0, float(b.float().abs().max()))


def _keeps_kv(model) -> bool:
    """The model's own forward (use_cache=True) returns a cache holding keys: independent of kvdistill."""
    ids = torch.randint(3, VOCAB, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        probe = _reference_cache(model, ids, None, keep_all=False)
    return probe is not None and any(isinstance(k, torch.Tensor) for k, _ in probe)


def _check(family: str, model) -> str:
    """The source kvdistill used (hooks | cache) when the family passes; raises AssertionError naming what
    failed."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, T), generator=g)
    geom = geometry_of(model)
    from_config = geometry_of(model.config)
    assert from_config.to_dict() == geom.to_dict(), "geometry from the config differs from the model's"
    accepts_positions = "position_ids" in __import__("inspect").signature(model.forward).parameters
    positions = torch.arange(T)[None].expand(2, T)
    sliding = any(t in ("sliding_attention", "hybrid_sliding", "chunked_attention") for t in geom.layer_types)
    with torch.no_grad():
        ref = _reference_cache(model, ids, positions if accepts_positions else None, keep_all=sliding)
        cap = forward_kv(model, ids, torch.ones_like(ids))
    attns = decoder_attention_modules(model)
    rope = geom.rope
    assert len(cap.keys) == geom.num_layers
    for i, layer in enumerate(geom.decoder_layers):
        k_ref, v_ref = ref[layer]
        if callable(getattr(attns.get(layer), "expand_kv", None)):  # latent attention: compare expanded K/V
            with torch.no_grad():
                k_ref, v_ref = attns[layer].expand_kv(k_ref, v_ref)
        assert k_ref.shape[1] == geom.kv_heads_of(i) and k_ref.shape[-1] == geom.head_dim_of(i), (
            f"layer {layer}: cache K {tuple(k_ref.shape)} vs geometry H_kv={geom.kv_heads_of(i)}, "
            f"D={geom.head_dim_of(i)}"
        )
        keys = cap.keys[i]
        if rope is not None and rope.rotates(i):
            cos, sin = cap.rotary[i]
            keys = apply_rope(keys.float(), cos, sin, rope.style, rope.offset)
            assert _err(cap.keys[i], k_ref) > 1e-3, f"layer {layer}: the rotation was not undone"
        assert _err(keys, k_ref) <= 1e-4, (
            f"layer {layer}: re-rotated keys differ from the cache by {_err(keys, k_ref):.1e}"
        )
        assert _err(cap.values[i], v_ref) <= 1e-4, f"layer {layer}: values differ from the cache"
    # right padding: each sample alone gives the same K/V
    lengths = [T, 13, 6]
    padded = torch.randint(3, VOCAB, (3, T), generator=g)
    mask = torch.zeros(3, T, dtype=torch.long)
    for j, n in enumerate(lengths):
        mask[j, :n] = 1
    padded = padded * mask
    with torch.no_grad():
        batch = forward_kv(model, padded, mask)
        for j, n in enumerate(lengths):
            alone = forward_kv(model, padded[j : j + 1, :n], mask[j : j + 1, :n])
            sample = batch.select(j)
            for a, b in zip(alone.keys + alone.values, sample.keys + sample.values, strict=True):
                assert _err(b, a) <= 1e-4, (
                    f"sample {j} (length {n}): padded batch differs from alone by {_err(b, a):.1e}"
                )
    # shift invariance of the first rotated layer
    if rope is not None and accepts_positions and any(rope.rotates(i) for i in range(geom.num_layers)):
        first = next(i for i in range(geom.num_layers) if rope.rotates(i))
        with torch.no_grad():
            shifted = forward_kv(model, ids, torch.ones_like(ids), positions=positions + SHIFT)
        assert _err(shifted.keys[first], cap.keys[first]) <= 1e-4, (
            "first rotated layer: pre-rotation keys move by "
            f"{_err(shifted.keys[first], cap.keys[first]):.1e} "
            f"when positions shift by {SHIFT}"
        )
    plan = hook_plan(model, geom)
    if plan is not None:
        with torch.no_grad():
            hooked = forward_kv(model, padded, mask, source="hooks")
            cached = forward_kv(model, padded, mask, source="cache")
        m = mask.bool()[:, None, :, None]
        for a, b in zip(hooked.keys + hooked.values, cached.keys + cached.values, strict=True):
            assert _err(a * m, b * m) <= 1e-4, "hooks and cache disagree"
        return "hooks"
    return "cache"


def _refusal(model) -> str | None:
    """The first line of the KvdistillError kvdistill refuses a model without a K/V cache with, None if it
    does not."""
    try:
        geom = geometry_of(model)
        with torch.no_grad():
            forward_kv(
                model, torch.randint(3, VOCAB, (1, 8)), torch.ones(1, 8, dtype=torch.long), geometry=geom
            )
    except KvdistillError as err:
        return str(err).splitlines()[0]
    return None


def sweep_family(family: str) -> Result:
    start = time.perf_counter()
    try:  # built, and runs its own forward: else listed as not buildable tiny (not hidden)
        model = build(family)
        keeps_kv = _keeps_kv(model)
    except Exception as err:
        return Result(
            family,
            "unbuilt",
            f"{type(err).__name__}: {str(err).splitlines()[0][:120]}",
            time.perf_counter() - start,
        )
    try:
        if not keeps_kv:
            refusal = _refusal(model)
            if refusal is None:
                return Result(
                    family, "fail", "no K/V cache, yet K/V were returned", time.perf_counter() - start
                )
            return Result(family, "no_cache", refusal[:140], time.perf_counter() - start)
        source = _check(family, model)
        return Result(family, "pass", "", time.perf_counter() - start, source)
    except AssertionError as err:
        return Result(family, "fail", str(err).splitlines()[0][:160], time.perf_counter() - start)
    except Exception as err:
        where = traceback.extract_tb(err.__traceback__)[-1]
        return Result(
            family,
            "fail",
            f"{type(err).__name__}: {str(err).splitlines()[0][:120]} "
            f"({where.filename.split('/')[-1]}:{where.lineno})",
            time.perf_counter() - start,
        )


def report(results: list[Result]) -> str:
    kv = [r for r in results if r.status in ("pass", "fail")]
    passed = [r for r in kv if r.status == "pass"]
    lines = [
        f"KV capture coverage {len(passed)}/{len(kv)} families "
        f"(buildable families with a K/V cache; {sum(r.source == 'hooks' for r in passed)} through hooks)"
    ]
    for status, title in (
        ("fail", "failing"),
        ("no_cache", "no K/V cache, refused as such"),
        ("unbuilt", "not buildable tiny"),
    ):
        group = [r for r in results if r.status == status]
        lines.append(f"{title} ({len(group)}):")
        lines += [f"  {r.family}: {r.reason}" if r.reason else f"  {r.family}" for r in group]
    lines.append(f"total {sum(r.seconds for r in results):.1f}s over {len(results)} families")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def sweep() -> list[Result]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: more threads only contend (CI has 2 cores)
    try:
        return [sweep_family(f) for f in FAMILIES]
    finally:
        torch.set_num_threads(threads)


def test_every_family_with_a_kv_cache_is_captured(sweep):
    print("\n" + report(sweep))
    kv = [r for r in sweep if r.status in ("pass", "fail")]
    passed = [r.family for r in kv if r.status == "pass"]
    assert len(passed) >= COVERAGE_FLOOR * len(kv), report(sweep)
    missing = sorted(REQUIRED - set(passed))
    assert not missing, f"required families fail: {missing}\n{report(sweep)}"
