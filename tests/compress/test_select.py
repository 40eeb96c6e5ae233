"""Selection equals brute-force references written with Python loops over (b, h) and tokens."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvdistill.compress import (
    Compression,
    gather_kv,
    gather_spans,
    importance_finite,
    importance_from_attention,
    importance_from_queries,
    query_rows,
    right_crop,
    rkv_select,
    select_full,
)
from kvdistill.errors import KvdistillError

# ---------------------------------------------------------------------------------------------- references


def ref_canonical(chosen: list[int], real: list[bool], M: int, T: int) -> tuple[list[int], list[bool]]:
    reals = sorted(t for t in chosen if real[t])
    pads = sorted(t for t in chosen if not real[t])
    idx = reals + pads
    kept = [True] * len(reals) + [False] * len(pads)
    while len(idx) < M:
        idx.append(0)
        kept.append(False)
    return idx, kept


def ref_minmax(vals: dict[int, float]) -> dict[int, float]:
    lo, hi = min(vals.values()), max(vals.values())
    return {t: (v - lo) / (hi - lo) if hi > lo else 0.0 for t, v in vals.items()}


def ref_rkv_row(keys: torch.Tensor, imp: torch.Tensor, real: list[bool], M: int, lam: float):
    """keys (T, D), imp (T,) of one (b, h) row; pairwise cosines, no vectorisation."""
    T = keys.shape[0]
    ts = [t for t in range(T) if real[t]]
    unit = {t: keys[t] / max(float(keys[t].norm()), 1e-8) for t in ts}
    red = {}
    for t in ts:
        others = [float(unit[t] @ unit[s]) for s in ts if s != t]
        red[t] = sum(others) / len(others) if others else 0.0
    i_n = ref_minmax({t: float(imp[t]) for t in ts})
    r_n = ref_minmax(red)
    score = [lam * i_n[t] + (1 - lam) * (1 - r_n[t]) if real[t] else -math.inf for t in range(T)]
    order = sorted(range(T), key=lambda t: (-score[t], t))
    return ref_canonical(order[: min(M, T)], real, M, T)


def random_mask(gen: torch.Generator, B: int, T: int, left: bool) -> torch.Tensor:
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    t = torch.arange(T)
    if left:
        return (t.unsqueeze(0) >= (T - lengths).unsqueeze(1)).long()
    return (t.unsqueeze(0) < lengths.unsqueeze(1)).long()


# ----------------------------------------------------------------------------------------------------- rkv


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    B=st.integers(1, 3),
    H=st.integers(1, 3),
    T=st.integers(1, 12),
    D=st.integers(2, 6),  # D=1 makes every cosine ±1: exact ties that rounding breaks either way
    M=st.integers(1, 14),
    left=st.booleans(),
    lam=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
)
def test_rkv_select_matches_bruteforce(seed, B, H, T, D, M, left, lam):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(B, H, T, D, generator=gen, dtype=torch.float64)
    imp = torch.rand(B, H, T, generator=gen, dtype=torch.float64)
    mask = random_mask(gen, B, T, left)
    idx, kept = rkv_select(keys, imp, mask, M, lam=lam)
    assert idx.shape == (B, H, M) and idx.dtype == torch.long and kept.dtype == torch.bool
    for b in range(B):
        real = [bool(x) for x in mask[b]]
        for h in range(H):
            ref_idx, ref_kept = ref_rkv_row(keys[b, h], imp[b, h], real, M, lam)
            assert idx[b, h].tolist() == ref_idx, (b, h)
            assert kept[b, h].tolist() == ref_kept, (b, h)


def test_rkv_stacked_layers_equals_per_layer():
    gen = torch.Generator().manual_seed(0)
    B, L, H, T, D, M = 2, 3, 2, 10, 4, 4
    keys = torch.randn(B, L, H, T, D, generator=gen, dtype=torch.float64)
    imp = torch.rand(B, L, H, T, generator=gen, dtype=torch.float64)
    mask = random_mask(gen, B, T, left=False)
    idx, kept = rkv_select(keys, imp, mask, M)
    for layer in range(L):
        i1, k1 = rkv_select(keys[:, layer], imp[:, layer], mask, M)
        assert torch.equal(idx[:, layer], i1) and torch.equal(kept[:, layer], k1)


def test_rkv_prefers_distinct_and_important():
    # three copies of one key and one distinct key: with lam=0 the distinct one is kept first
    k = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]).view(1, 1, 4, 2)
    mask = torch.ones(1, 4, dtype=torch.long)
    idx, _ = rkv_select(k, torch.zeros(1, 1, 4), mask, 2, lam=0.0)
    assert idx.tolist() == [[[0, 3]]]  # distinct token 3, then the earliest of the tie
    # lam=1: importance alone decides
    idx, _ = rkv_select(k, torch.tensor([[[0.0, 0.0, 5.0, 1.0]]]), mask, 1, lam=1.0)
    assert idx.tolist() == [[[2]]]


def test_rkv_padding_never_kept_before_real_and_flagged():
    keys = torch.randn(2, 1, 5, 3)
    imp = torch.full((2, 1, 5), 100.0)
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 1, 1]])
    idx, kept = rkv_select(keys, imp, mask, 4)
    assert idx[0, 0, :2].tolist() == [0, 1] and idx[1, 0, :2].tolist() == [3, 4]
    assert kept.tolist() == [[[True, True, False, False]]] * 2
    assert not mask.gather(1, idx[:, 0, 2:]).any()  # the unkept slots point at padding


def test_rkv_bf16_input_and_errors():
    keys = torch.randn(1, 2, 6, 4).bfloat16()
    idx, kept = rkv_select(keys, torch.rand(1, 2, 6).bfloat16(), torch.ones(1, 6), 3)
    assert idx.shape == (1, 2, 3) and kept.all()
    with pytest.raises(KvdistillError, match="budget"):
        rkv_select(keys, torch.rand(1, 2, 6), torch.ones(1, 6), 0)
    with pytest.raises(KvdistillError, match="importance"):
        rkv_select(keys, torch.rand(1, 2, 5), torch.ones(1, 6), 3)
    bad = torch.rand(1, 2, 6)
    bad[0, 0, 1] = float("nan")
    with pytest.raises(KvdistillError, match="NaN"):
        rkv_select(keys, bad, torch.ones(1, 6), 3)


# ------------------------------------------------------------------------------------------ crop and full


@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("M", [1, 3, 7, 12])
def test_right_crop_exact(left, M):
    gen = torch.Generator().manual_seed(M)
    B, T = 5, 8
    mask = random_mask(gen, B, T, left)
    idx, kept = right_crop(mask, M)
    assert idx.shape == (B, M)
    for b in range(B):
        real = [bool(x) for x in mask[b]]
        first = [t for t in range(T) if real[t]][:M]
        ref_idx, ref_kept = ref_canonical(
            first + [t for t in range(T) if not real[t]][: M - len(first)], real, M, T
        )
        assert idx[b].tolist() == ref_idx and kept[b].tolist() == ref_kept


def test_select_full():
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    idx, kept = select_full(mask)
    assert idx.tolist() == [[0, 1, 2], [0, 1, 2]] and kept.tolist() == mask.bool().tolist()


# ------------------------------------------------------------------------------------------- importance


@pytest.mark.parametrize(("H_q", "H_kv"), [(4, 4), (4, 2), (6, 1), (9, 3)])
def test_importance_gqa_matches_loops(H_q, H_kv):
    gen = torch.Generator().manual_seed(H_q * 10 + H_kv)
    B, T = 3, 7
    attn = torch.rand(B, H_q, T, T, generator=gen, dtype=torch.float64).softmax(-1)
    mask = random_mask(gen, B, T, left=False)
    query = (torch.rand(B, T, generator=gen) > 0.5).long()
    query[2] = 0  # a sample with no query row
    imp = importance_from_attention(attn, query, mask, H_kv)
    g = H_q // H_kv
    for b in range(B):
        rows = [q for q in range(T) if query[b, q] and mask[b, q]]
        for hk in range(H_kv):
            for t in range(T):
                vals = [float(attn[b, h, q, t]) for h in range(hk * g, (hk + 1) * g) for q in rows]
                ref = sum(vals) / len(vals) if vals and mask[b, t] else 0.0
                assert imp[b, hk, t].item() == pytest.approx(ref, abs=1e-12)
    with pytest.raises(KvdistillError, match=r"num_heads \(4\) must be divisible by num_kv_heads \(3\)"):
        importance_from_attention(torch.rand(1, 4, 2, 2), torch.ones(1, 2), torch.ones(1, 2), 3)


# ---------------------------------------------------------------------------------------------- gathering


def test_gather_kv_and_spans():
    x = torch.randn(2, 3, 5, 4)
    idx = torch.randint(0, 5, (2, 3, 2))
    out = gather_kv(x, idx)
    spans = torch.randint(0, 50, (2, 5, 2))
    sp = gather_spans(spans, idx)
    for b in range(2):
        for h in range(3):
            for m in range(2):
                assert torch.equal(out[b, h, m], x[b, h, idx[b, h, m]])
                assert torch.equal(sp[b, h, m], spans[b, idx[b, h, m]])
    shared = gather_kv(x, idx[:, 0])  # (B, M) shared over heads
    assert shared.shape == (2, 3, 2, 4)
    for b in range(2):
        assert torch.equal(shared[b], x[b][:, idx[b, 0]])


# -------------------------------------------------------------------------------------------- Compression


def test_compression_roundtrip_and_validation():
    c = Compression(kind="rkv", budget=16, lam=0.2, layers=[0, 2], dtype="float16")
    assert Compression.from_dict(c.to_dict()) == c
    assert c.torch_dtype == torch.float16 and c.resolve_layers(4) == [0, 2]
    with pytest.raises(KvdistillError, match=r"out of range"):
        c.resolve_layers(2)
    with pytest.raises(KvdistillError) as err:
        Compression(kind="rkvv", budget=-1, lam=2.0, layers=[1, 1], dtype="int8")
    msg = str(err.value)
    for part in (
        "compression.kind: 'rkvv'",
        "compression.lam: 2.0",
        "compression.layers: [1, 1]",
        "compression.dtype: 'int8'",
        "4 problem(s)",
    ):
        assert part in msg
    with pytest.raises(KvdistillError, match="compression.budget: None must be a positive integer"):
        Compression(kind="right_crop")
    with pytest.raises(KvdistillError, match="kind 'full'"):
        Compression(kind="full", budget=3)
    with pytest.raises(KvdistillError, match="unknown key"):
        Compression.from_dict({"kind": "full", "budgett": 3})


def test_rkv_ignores_padding_content_even_nonfinite():
    gen = torch.Generator().manual_seed(3)
    keys = torch.randn(2, 2, 6, 4, generator=gen)
    imp = torch.rand(2, 2, 6, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    junk = keys.clone()
    junk[0, :, 4:] = float("nan")
    junk[0, 0, 5] = float("inf")
    a, b = rkv_select(keys, imp, mask, 3), rkv_select(junk, imp, mask, 3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_importance_finite_flags_real_tokens_only_and_defers_the_check():
    """The extraction checks finiteness later (host_samples), so the selection itself needs no device
    read-back: check_finite=False selects exactly as the checked call does on finite input."""
    gen = torch.Generator().manual_seed(4)
    keys = torch.randn(2, 3, 2, 6, 4, generator=gen)  # (B, L, H, T, D)
    imp = torch.rand(2, 3, 2, 6, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    assert importance_finite(imp, mask).shape == () and bool(importance_finite(imp, mask))
    checked, unchecked = rkv_select(keys, imp, mask, 3), rkv_select(keys, imp, mask, 3, check_finite=False)
    assert torch.equal(checked[0], unchecked[0]) and torch.equal(checked[1], unchecked[1])
    padded = imp.clone()
    padded[0, :, :, 4:] = float("nan")  # padding only: still finite where it counts
    assert bool(importance_finite(padded, mask))
    bad = imp.clone()
    bad[1, 2, 0, 5] = float("inf")
    assert not bool(importance_finite(bad, mask))
    with pytest.raises(KvdistillError, match="NaN or inf"):
        rkv_select(keys, bad, mask, 3)
    rkv_select(keys, bad, mask, 3, check_finite=False)  # left to the caller


@pytest.mark.parametrize("window, softcap", [(None, None), (4, 3.0)])
def test_importance_from_queries_layer_dim_equals_each_layer(window, softcap):
    """Stacked layers (B, L, ...) give, layer by layer, exactly the unstacked (B, H, ...) result."""
    gen = torch.Generator().manual_seed(5)
    B, L, H_q, H_kv, T, D = 3, 4, 4, 2, 9, 8
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, :3] = 0
    query = torch.zeros(B, T, dtype=torch.long)
    query[0, [2, 8]] = 1
    query[1, 5] = 1
    query[2, 4:7] = 1
    rows, valid = query_rows(query, mask)
    keys = torch.randn(B, L, H_kv, T, D, generator=gen)
    q_rows = torch.randn(B, L, H_q, rows.shape[1], D, generator=gen)
    kw = dict(scaling=D**-0.5, softcap=softcap, sliding_window=window)
    stacked = importance_from_queries(q_rows, rows, valid, keys, mask, **kw)
    assert stacked.shape == (B, L, H_kv, T)
    for n in range(L):
        alone = importance_from_queries(q_rows[:, n], rows, valid, keys[:, n], mask, **kw)
        assert torch.equal(stacked[:, n], alone)
    with pytest.raises(KvdistillError, match="do not match"):
        importance_from_queries(q_rows[0], rows, valid, keys[0], mask, **kw)
    with pytest.raises(KvdistillError, match="must be"):
        importance_from_queries(q_rows, rows, valid, keys[0], mask, **kw)
