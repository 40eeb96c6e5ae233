"""The latent targets (kvdistill.compress.latent) against brute-force references written with Python loops."""

from __future__ import annotations

import math

import pytest
import torch

from kvdistill.compress.latent import latent_target, resample_full, window_rows

B, H, T, D, M = 3, 2, 11, 4, 4


def batch():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    importance = torch.rand(B, H, T, generator=g, dtype=torch.float64)
    cand = torch.zeros(B, T, dtype=torch.long)
    cand[0, 2:9] = 1  # 7 CoT tokens
    cand[1, 3:6] = 1  # 3 < M: entries left without a token
    cand[2, [1, 4, 5, 7, 8, 10]] = 1  # scattered (padding / other text in between)
    return keys, importance, cand


def brute_scores(keys, importance, cand, lam, scoring):
    """score[b][h][t] with explicit loops (None where t is no candidate)."""
    out = []
    for b in range(B):
        ts = [t for t in range(T) if cand[b, t]]
        rows = []
        for h in range(H):
            r = {}
            for t in ts:
                others = [s for s in ts if s != t]
                sims = [float(torch.nn.functional.cosine_similarity(keys[b, h, t], keys[b, h, s], dim=0))
                        for s in others]
                r[t] = sum(sims) / len(sims) if sims else 0.0
            if scoring == "kava":
                z = sum(math.exp(-r[t]) for t in ts)
                score = {t: lam * float(importance[b, h, t]) + (1 - lam) * math.exp(-r[t]) / z for t in ts}
            elif scoring == "rkv":
                score = {t: lam * float(importance[b, h, t]) - (1 - lam) * r[t] for t in ts}
            else:
                imp = [float(importance[b, h, t]) for t in ts]
                red = [r[t] for t in ts]

                def mm(xs, x, tol=0.0):
                    lo, hi = min(xs), max(xs)
                    return (x - lo) / (hi - lo) if hi - lo > tol else 0.0

                score = {t: lam * mm(imp, float(importance[b, h, t]))
                         + (1 - lam) * (1 - mm(red, r[t], 1e3 * 2.2e-16)) for t in ts}
            rows.append(score)
        out.append(rows)
    return out


def brute_select(scores):
    """Top-M per (b, h) (ties: the earlier token), kept ones in time order, then empty entries."""
    idx = torch.zeros(B, H, M, dtype=torch.long)
    kept = torch.zeros(B, H, M, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            ranked = sorted(scores[b][h], key=lambda t: (-scores[b][h][t], t))[:M]
            for m, t in enumerate(sorted(ranked)):
                idx[b, h, m], kept[b, h, m] = t, True
    return idx, kept


@pytest.mark.parametrize("scoring", ["kava", "rkv", "minmax"])
@pytest.mark.parametrize("lam", [0.1, 0.0, 1.0])
def test_rkv_latent_selection_equals_brute_force(scoring, lam):
    keys, importance, cand = batch()
    plan = latent_target("rkv", cand, M, keys=keys, importance=importance, lam=lam, scoring=scoring)
    idx, kept = brute_select(brute_scores(keys, importance, cand, lam, scoring))
    assert torch.equal(plan.kept, kept)
    assert torch.equal(plan.index[..., 0][kept], idx[kept])
    # gathered entries are the chosen tokens' K/V; empty entries are zero
    got = plan.gather(keys)
    for b in range(B):
        for h in range(H):
            for m in range(M):
                want = keys[b, h, idx[b, h, m]] if kept[b, h, m] else torch.zeros(D, dtype=keys.dtype)
                torch.testing.assert_close(got[b, h, m], want)


def test_never_keeps_a_non_cot_token_and_variants_differ():
    keys, importance, cand = batch()
    plans = {s: latent_target("rkv", cand, M, keys=keys, importance=importance, scoring=s)
             for s in ("kava", "rkv", "minmax")}
    for plan in plans.values():
        chosen = plan.index[..., 0]
        assert all(cand[b, chosen[b, h, m]] for b in range(B) for h in range(H) for m in range(M)
                   if plan.kept[b, h, m])
    assert not torch.equal(plans["kava"].index, plans["rkv"].index) or not torch.equal(
        plans["kava"].index, plans["minmax"].index)


def test_full_resampling_interpolates_along_the_cot():
    keys, _, cand = batch()
    plan = resample_full(cand, M)
    got = plan.gather(keys)  # (B, H, M, D)
    for b in range(B):
        ts = [t for t in range(T) if cand[b, t]]
        n = len(ts)
        for m in range(M):
            at = m * (n - 1) / (M - 1)
            lo, frac = int(math.floor(at)), at - math.floor(at)
            hi = min(lo + 1, n - 1)
            want = (1 - frac) * keys[b, :, ts[lo]] + frac * keys[b, :, ts[hi]]
            torch.testing.assert_close(got[b, :, m], want)
    assert plan.kept.all()
    # the first and last entries are the first and last CoT tokens
    torch.testing.assert_close(got[0, :, 0], keys[0, :, 2])
    torch.testing.assert_close(got[0, :, -1], keys[0, :, 8])


def test_right_crop_keeps_the_first_m_cot_tokens():
    keys, _, cand = batch()
    plan = latent_target("right_crop", cand, M).heads(H)
    for b, first in enumerate([[2, 3, 4, 5], [3, 4, 5], [1, 4, 5, 7]]):
        assert plan.index[b, 0, : len(first), 0].tolist() == first
        assert plan.kept[b, 0].tolist() == [True] * len(first) + [False] * (M - len(first))


def test_window_rows_marks_the_last_real_tokens():
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]])
    assert window_rows(mask, 2).tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1]]
