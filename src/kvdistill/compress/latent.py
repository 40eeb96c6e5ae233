"""The latent student's K/V target: a teacher's chain-of-thought K/V compressed to exactly M entries per (layer, head).

KaVa supervises the M latent slots of a latent-reasoning student with the K/V of the teacher's CoT tokens, squeezed
to M entries. Slot m of the student is matched with entry m of the target (entries in increasing time), so no
text alignment is needed: the latents have no text.

Notation: B batch, G leading group dims of one layer (H KV heads), T teacher tokens, D head dim, M latent slots,
J source tokens mixed into one entry (2 for `full`, 1 otherwise). `candidates` (B, T) marks the CoT tokens that
may be kept (1) — never the question, the answer or padding.

Kinds (each returns a `LatentTarget` plan; `gather` applies it):
    full        every CoT token, resampled to M entries by linear interpolation along time: entry m sits at
                fractional CoT index m·(n-1)/(M-1) (n CoT tokens; one token: every entry is that token)
    right_crop  the first M CoT tokens (fewer when n < M: the missing entries are not kept)
    rkv         the M best-scoring CoT tokens per head, in increasing time; scoring:
        kava    λ·I_t + (1-λ)·R_t with I_t the attention the answer tokens pay to t (mean over answer rows and
                the head's query group) and R_t = softmax over the CoT tokens of (-r_t), r_t the mean cosine
                similarity of key t to the other CoT keys (KaVa, arXiv 2510.02312; the default)
        rkv     λ·I_t - (1-λ)·r_t, I_t from the last `window` tokens' attention instead (the R-KV paper's code)
        minmax  λ·minmax(I) + (1-λ)·(1 - minmax(r)) (the offline cache's `rkv_scores`)
λ = 1 keeps by importance alone, λ = 0 by redundancy alone (the ablations). Padding and non-CoT tokens always
score lowest; ties go to the earlier token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvdistill.compress.select import key_redundancy, rkv_scores
from kvdistill.errors import KvdistillError

LATENT_KINDS = ("full", "right_crop", "rkv")
SCORINGS = ("kava", "rkv", "minmax")


@dataclass
class LatentTarget:
    """Which teacher tokens make each of the M target entries: index, weight (B, G, M, J) (J tokens mixed with
    these weights) and kept (B, G, M) bool (False: the entry has no token, its error is not counted)."""

    index: torch.Tensor
    weight: torch.Tensor
    kept: torch.Tensor

    def heads(self, H: int) -> LatentTarget:
        """The plan for H heads: a plan shared by heads (G = 1) expanded, a per-head one checked."""
        G = self.index.shape[1]
        if G == H:
            return self
        if G != 1:
            raise KvdistillError(f"a latent target chosen for {G} heads cannot select from {H} heads",
                                 "select from the keys of the same layer")
        B, _, M, J = self.index.shape
        return LatentTarget(self.index.expand(B, H, M, J), self.weight.expand(B, H, M, J), self.kept.expand(B, H, M))

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, T, D) -> (B, H, M, D): Σ_j weight·x[index] (entries that are not kept are 0)."""
        plan = self.heads(x.shape[1])
        B, H, M, J = plan.index.shape
        D = x.shape[-1]
        idx = plan.index.reshape(B, H, M * J, 1).expand(B, H, M * J, D)
        picked = x.gather(2, idx).view(B, H, M, J, D)  # (B, H, M, J, D)
        w = (plan.weight * plan.kept[..., None]).to(x.dtype)  # (B, H, M, J)
        return (picked * w[..., None]).sum(3)


def _check(candidates: torch.Tensor, budget: int) -> torch.Tensor:
    if candidates.dim() != 2:
        raise KvdistillError(f"candidates must be (B, T), got {tuple(candidates.shape)}",
                             "pass the (B, T) mask of the teacher's chain-of-thought tokens")
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise KvdistillError(f"latent target size {budget!r} must be a positive integer",
                             "set student.latent.tokens to 1 or more")
    return candidates.bool()


def _ordered_candidates(candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pos (B, T) the candidate time indices first, in increasing time, then the others; n (B,) candidates)."""
    B, T = candidates.shape
    t = torch.arange(T, device=candidates.device).expand(B, T)
    pos = (t + (~candidates).long() * T).argsort(dim=-1)  # (B, T)
    return pos, candidates.sum(-1)


def resample_full(candidates: torch.Tensor, budget: int) -> LatentTarget:
    """Every CoT token, linearly resampled to M entries (shared by heads: G = 1). A sample without CoT tokens
    keeps nothing."""
    cand = _check(candidates, budget)
    M = budget
    pos, n = _ordered_candidates(cand)  # (B, T), (B,)
    m = torch.arange(M, device=cand.device, dtype=torch.float64)  # (M,)
    span = (n - 1).clamp_min(0).to(torch.float64)[:, None]  # (B, 1)
    at = m[None] * span / max(M - 1, 1) if M > 1 else torch.zeros_like(span)  # (B, M) fractional CoT index
    lo = at.floor().long()
    hi = torch.minimum(lo + 1, (n - 1).clamp_min(0)[:, None])  # (B, M)
    frac = (at - lo.to(torch.float64)).float()
    index = torch.stack([pos.gather(1, lo), pos.gather(1, hi)], -1)  # (B, M, 2) time indices
    weight = torch.stack([1 - frac, frac], -1)  # (B, M, 2)
    kept = (n > 0)[:, None].expand(-1, M)  # (B, M)
    return LatentTarget(index[:, None], weight[:, None], kept[:, None].clone())


def _first_m(order: torch.Tensor, real: torch.Tensor, M: int) -> LatentTarget:
    """Entries from time indices `order` (B, G, T) whose first entries are the chosen ones; real (B, G, T) whether
    each chosen one is a candidate. Kept tokens are put in increasing time; missing entries point at 0."""
    T = order.shape[-1]
    top, ok = order[..., : min(M, T)], real[..., : min(M, T)]  # (B, G, M')
    key = top + (~ok).long() * (T + 1)  # kept first, each group in time order
    perm = key.argsort(dim=-1)
    top, ok = top.gather(-1, perm), ok.gather(-1, perm)
    top = top.masked_fill(~ok, 0)
    short = M - top.shape[-1]
    if short > 0:
        top = torch.cat([top, top.new_zeros(*top.shape[:-1], short)], -1)
        ok = torch.cat([ok, ok.new_zeros(*ok.shape[:-1], short)], -1)
    return LatentTarget(top[..., None], torch.ones(*top.shape, 1, device=top.device), ok)


def latent_right_crop(candidates: torch.Tensor, budget: int) -> LatentTarget:
    """The first M CoT tokens (shared by heads: G = 1)."""
    cand = _check(candidates, budget)
    pos, n = _ordered_candidates(cand)  # (B, T)
    real = torch.arange(pos.shape[1], device=cand.device)[None] < n[:, None]  # (B, T)
    return _first_m(pos[:, None], real[:, None], budget)


def kava_scores(keys: torch.Tensor, importance: torch.Tensor, candidates: torch.Tensor, lam: float) -> torch.Tensor:
    """λ·I + (1-λ)·softmax_t(-r) over the candidate tokens -> (B, G, T), -inf elsewhere. keys (B, G, T, D),
    importance (B, G, T)."""
    cand = candidates.bool()
    real = cand[:, None].expand(importance.shape)  # (B, G, T)
    r = key_redundancy(keys, cand)  # (B, G, T), mean cosine to the other CoT keys
    R = (-r).masked_fill(~real, float("-inf")).softmax(-1).nan_to_num(0.0)  # rows without candidates: 0
    score = lam * importance.to(R.dtype) + (1 - lam) * R
    return score.masked_fill(~real, float("-inf"))


def rkv_paper_scores(keys: torch.Tensor, importance: torch.Tensor, candidates: torch.Tensor,
                     lam: float) -> torch.Tensor:
    """λ·I - (1-λ)·r over the candidate tokens -> (B, G, T), -inf elsewhere."""
    cand = candidates.bool()
    real = cand[:, None].expand(importance.shape)
    r = key_redundancy(keys, cand)
    score = lam * importance.to(r.dtype) - (1 - lam) * r
    return score.masked_fill(~real, float("-inf"))


def latent_rkv(keys: torch.Tensor, importance: torch.Tensor, candidates: torch.Tensor, budget: int, *,
               lam: float = 0.1, scoring: str = "kava") -> LatentTarget:
    """The M best-scoring candidate tokens per head (see the module docstring), in increasing time.

    keys (B, H, T, D) pre-rotation keys of one layer, importance (B, H, T) (`importance_from_attention` or
    `query_importance` with the answer rows, or the last `window` rows for scoring 'rkv')."""
    cand = _check(candidates, budget)
    if scoring not in SCORINGS:
        raise KvdistillError(f"latent target scoring '{scoring}' is unknown", f"use one of {', '.join(SCORINGS)}")
    if importance.shape != keys.shape[:-1]:
        raise KvdistillError(f"importance {tuple(importance.shape)} does not match keys {tuple(keys.shape)}",
                             "importance must be (B, H, T) for keys (B, H, T, D)")
    if scoring == "kava":
        score = kava_scores(keys, importance, cand, lam)
    elif scoring == "rkv":
        score = rkv_paper_scores(keys, importance, cand, lam)
    else:
        score = rkv_scores(keys, importance, cand, lam)
    order = score.sort(dim=-1, descending=True, stable=True).indices  # (B, H, T), ties: earlier first
    real = torch.isfinite(score.gather(-1, order))
    return _first_m(order, real, budget)


def window_rows(mask: torch.Tensor, window: int) -> torch.Tensor:
    """(B, T) 1 on the last `window` real tokens of each sample (the R-KV paper's observation window)."""
    real = mask.bool()
    from_end = real.flip(-1).long().cumsum(-1).flip(-1)  # (B, T) real tokens at or after t
    return (real & (from_end <= window)).long()


def latent_target(kind: str, candidates: torch.Tensor, budget: int, *, keys: torch.Tensor | None = None,
                  importance: torch.Tensor | None = None, lam: float = 0.1, scoring: str = "kava") -> LatentTarget:
    """Dispatch on `kind` (full | right_crop | rkv); rkv needs keys (B, H, T, D) and importance (B, H, T)."""
    if kind == "full":
        return resample_full(candidates, budget)
    if kind == "right_crop":
        return latent_right_crop(candidates, budget)
    if kind != "rkv":
        raise KvdistillError(f"latent target kind '{kind}' is unknown", f"use one of {', '.join(LATENT_KINDS)}")
    if keys is None or importance is None:
        raise KvdistillError("the rkv latent target needs the keys and the attention importance",
                             "capture the teacher with its query rows (or eager attention)")
    return latent_rkv(keys, importance, candidates, budget, lam=lam, scoring=scoring)
