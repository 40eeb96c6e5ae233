"""The latent targets (kvdistill.compress.latent) against brute-force references written with Python loops."""

from __future__ import annotations

import math

import pytest
import torch

from kvdistill.compress.latent import latent_target, resample_full, window_rows
from kvdistill.compress.select import DEFAULT_LAM, query_rows

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
                sims = [
                    float(torch.nn.functional.cosine_similarity(keys[b, h, t], keys[b, h, s], dim=0))
                    for s in others
                ]
                r[t] = sum(sims) / len(sims) if sims else 0.0
            if scoring == "kava":
                z = sum(math.exp(-r[t]) for t in ts)
                score = {t: lam * float(importance[b, h, t]) + (1 - lam) * math.exp(-r[t]) / z for t in ts}
            else:
                imp = [float(importance[b, h, t]) for t in ts]
                red = [r[t] for t in ts]

                def mm(xs, x, tol=0.0):
                    lo, hi = min(xs), max(xs)
                    return (x - lo) / (hi - lo) if hi - lo > tol else 0.0

                score = {
                    t: lam * mm(imp, float(importance[b, h, t]))
                    + (1 - lam) * (1 - mm(red, r[t], 1e3 * 2.2e-16))
                    for t in ts
                }
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


@pytest.mark.parametrize("scoring", ["kava", "minmax"])
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
    plans = {
        s: latent_target("rkv", cand, M, keys=keys, importance=importance, scoring=s)
        for s in ("kava", "minmax")
    }
    logits, valid = window_logits_of(cand, 2)
    plans["rkv"] = latent_target(
        "rkv", cand, M, keys=keys, importance=logits, valid=valid, scoring="rkv", window=2
    )
    for plan in plans.values():
        chosen = plan.index[..., 0]
        assert all(
            cand[b, chosen[b, h, m]]
            for b in range(B)
            for h in range(H)
            for m in range(M)
            if plan.kept[b, h, m]
        )
    assert not torch.equal(plans["kava"].index, plans["rkv"].index) or not torch.equal(
        plans["kava"].index, plans["minmax"].index
    )


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


# ----------------------------------------------------------------------------------------- R-KV's own scoring
def window_logits_of(cand, window, *, Hq=2, seed=1):
    """Random window logits (B, H, Q, T) as `window_logits` shapes them (max over a group of Hq query heads
    of random q·k), and the rows' validity."""
    g = torch.Generator().manual_seed(seed)
    rows, valid = query_rows(window_rows(cand, window), torch.ones_like(cand))
    per_head = torch.randn(
        cand.shape[0], H, Hq, rows.shape[1], cand.shape[1], generator=g, dtype=torch.float64
    )
    return per_head.amax(2), valid


def brute_rkv(keys, logits, cand, window, lam, budget):
    """R-KV's selection with loops, from the formula: per (b, h) over the n CoT tokens c_0 < ... < c_{n-1}:
    all of them when n <= budget; else the window W = the last w = min(window, n), and the budget - w best of
    the others P by λ·max_{|i-j|<=3, c_j in P} A_j - (1-λ)·S_i, A_j = mean over the window rows of softmax
    over P of the logits, S = softmax over the CoT of the column means of the cosine matrix (diagonal 0, each
    row's latest entry above 0.5, else its first, set to 0)."""
    chosen = {}
    for b in range(cand.shape[0]):
        cs = [t for t in range(cand.shape[1]) if cand[b, t]]
        n = len(cs)
        for h in range(keys.shape[1]):
            if n <= budget:
                chosen[b, h] = cs
                continue
            w = min(window, n)
            past, win = cs[: n - w], cs[n - w :]
            A = []
            for i in range(len(past)):
                total = 0.0
                for q in range(w):  # window rows in time order: row q is token win[q]
                    z = sum(math.exp(float(logits[b, h, q, t])) for t in past)
                    total += math.exp(float(logits[b, h, q, past[i]])) / z
                A.append(total / w)
            pooled = [max(A[j] for j in range(len(past)) if abs(i - j) <= 3) for i in range(len(past))]
            cos = [
                [
                    0.0
                    if i == j
                    else float(
                        torch.nn.functional.cosine_similarity(keys[b, h, cs[i]], keys[b, h, cs[j]], dim=0)
                    )
                    for j in range(n)
                ]
                for i in range(n)
            ]
            for i in range(n):
                above = [j for j in range(n) if cos[i][j] > 0.5]
                cos[i][max(above) if above else 0] = 0.0
            col = [sum(cos[i][j] for i in range(n)) / n for j in range(n)]
            z = sum(math.exp(c) for c in col)
            S = [math.exp(c) / z for c in col]
            score = {past[i]: lam * pooled[i] - (1 - lam) * S[i] for i in range(len(past))}
            best = sorted(score, key=lambda t: (-score[t], t))[: budget - w]
            chosen[b, h] = sorted(best + win)
    return chosen


@pytest.mark.parametrize("lam", [None, 0.0, 1.0, 0.5])
@pytest.mark.parametrize("window", [2, 3])
def test_rkv_reference_scoring_equals_brute_force(lam, window):
    """Random keys and logits, CoT spans with padding around them, a short CoT (fewer tokens than the budget),
    a scattered one and a long one; keys built with near-duplicates so that R-KV's 0.5 threshold matters."""
    g = torch.Generator().manual_seed(7)
    B2, T2, budget = 4, 24, 6
    base = torch.randn(B2, H, 3, D, generator=g, dtype=torch.float64)
    pick = torch.randint(0, 3, (B2, H, T2), generator=g)
    keys = base.gather(2, pick[..., None].expand(B2, H, T2, D)) + 0.6 * torch.randn(
        B2, H, T2, D, generator=g, dtype=torch.float64
    )
    cand = torch.zeros(B2, T2, dtype=torch.long)
    cand[0, 3:20] = 1  # 17 CoT tokens between a question and an answer
    cand[1, 5:9] = 1  # 4 < budget: every one kept
    cand[2, [1, 2, 4, 6, 9, 11, 12, 15, 16, 20]] = 1  # scattered
    cand[3, 0:24] = 1  # the whole row
    logits, valid = window_logits_of(cand, window)
    plan = latent_target(
        "rkv", cand, budget, keys=keys, importance=logits, valid=valid, lam=lam, scoring="rkv", window=window
    )
    want = brute_rkv(keys, logits, cand, window, DEFAULT_LAM["rkv"] if lam is None else lam, budget)
    for (b, h), ts in want.items():
        got = [int(t) for t, k in zip(plan.index[b, h, :, 0], plan.kept[b, h], strict=True) if k]
        assert got == ts, (b, h)
        assert int(plan.kept[b, h].sum()) == min(budget, int(cand[b].sum()))
    # the window (the last `window` CoT tokens) is always kept; the default λ of this scoring is R-KV's 0.07
    assert all(t in want[0, h] for h in range(H) for t in range(20 - window, 20))
    assert DEFAULT_LAM["rkv"] == 0.07


def test_rkv_reference_scoring_refuses_a_budget_within_the_window():
    keys, _, cand = batch()
    logits, valid = window_logits_of(cand, 4)
    with pytest.raises(Exception, match="window"):
        latent_target("rkv", cand, 4, keys=keys, importance=logits, valid=valid, scoring="rkv", window=4)
