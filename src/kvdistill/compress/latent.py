"""The latent student's K/V target: a teacher's chain-of-thought K/V compressed to exactly M entries per
(layer, head).

KaVa supervises the M latent slots of a latent-reasoning student with the K/V of the teacher's CoT tokens,
squeezed to M entries. Slot m of the student is matched with entry m of the target (entries in increasing
time), so no text alignment is needed: the latents have no text.

Notation: B batch, G leading group dims of one layer (H KV heads), T teacher tokens, D head dim, M latent
slots, J source tokens mixed into one entry (2 for `full`, 1 otherwise). `candidates` (B, T) marks the CoT
tokens that may be kept (1) — never the question, the answer or padding.

Kinds (each returns a `LatentTarget` plan; `gather` applies it):
    full        every CoT token, resampled to M entries by linear interpolation along time: entry m sits at
                fractional CoT index m·(n-1)/(M-1) (n CoT tokens; one token: every entry is that token)
    right_crop  the first M CoT tokens (fewer when n < M: the missing entries are not kept)
    rkv         the M best-scoring CoT tokens per head, in increasing time; scoring:
        kava    λ·I_t + (1-λ)·R_t with I_t the attention the answer tokens pay to t (mean over answer rows and
                the head's query group) and R_t = softmax over the CoT tokens of (-r_t), r_t the mean cosine
                similarity of key t to the other CoT keys (KaVa, arXiv 2510.02312; the default, λ 0.1)
        rkv     R-KV's reference scoring (arXiv 2505.24133, its `R1KV`), applied to the CoT as R-KV compresses
                a reasoning cache at its end (`rkv_reference_scores`): the last w CoT tokens are the
                observation window and are always kept; the other n-w CoT tokens score
                    λ·maxpool_7(A)_t - (1-λ)·S_t,   λ 0.07
                A_t = mean over the window rows q of softmax over the non-window CoT keys of ℓ[q, t], ℓ the
                attention logits q·k·scaling with the max over the head's query group (GQA); maxpool_7 the max
                over the 7 neighbouring non-window CoT tokens; S = softmax over the CoT tokens of the column
                mean of the key cosine matrix (diagonal 0, and in each row the latest entry above 0.5, or the
                first one when none is, set to 0: R-KV keeps the newest near-duplicate). The budget must
                exceed w.
        minmax  λ·minmax(I) + (1-λ)·(1 - minmax(r)) (the offline cache's `rkv_scores`, λ 0.1)
λ = 1 keeps by importance alone, λ = 0 by redundancy alone (the ablations). Padding and non-CoT tokens always
score lowest; ties go to the earlier token. Where R-KV reads rotated cache keys, the cosines here are those of
the keys passed in (pre-rotation in this project); its logits use the rotated queries and keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvdistill.compress.select import default_lam, key_redundancy, rkv_scores
from kvdistill.errors import KvdistillError

LATENT_KINDS = ("full", "right_crop", "rkv")
SCORINGS = ("kava", "rkv", "minmax")
RKV_KERNEL = 7  # R-KV's max-pool width over the importance
RKV_THRESHOLD = 0.5  # R-KV's cosine above which a key counts as a near-duplicate


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
            raise KvdistillError(
                f"a latent target chosen for {G} heads cannot select from {H} heads",
                "select from the keys of the same layer",
            )
        B, _, M, J = self.index.shape
        return LatentTarget(
            self.index.expand(B, H, M, J), self.weight.expand(B, H, M, J), self.kept.expand(B, H, M)
        )

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
        raise KvdistillError(
            f"candidates must be (B, T), got {tuple(candidates.shape)}",
            "pass the (B, T) mask of the teacher's chain-of-thought tokens",
        )
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise KvdistillError(
            f"latent target size {budget!r} must be a positive integer",
            "set student.latent.tokens to 1 or more",
        )
    return candidates.bool()


def _ordered_candidates(candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pos (B, T) the candidate time indices first, in increasing time, then the others; n (B,)
    candidates)."""
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
    """Entries from time indices `order` (B, G, T) whose first entries are the chosen ones; real (B, G, T)
    whether each chosen one is a candidate. Kept tokens are put in increasing time; missing entries point at
    0."""
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


def kava_scores(
    keys: torch.Tensor, importance: torch.Tensor, candidates: torch.Tensor, lam: float
) -> torch.Tensor:
    """λ·I + (1-λ)·softmax_t(-r) over the candidate tokens -> (B, G, T), -inf elsewhere. keys (B, G, T, D),
    importance (B, G, T)."""
    cand = candidates.bool()
    real = cand[:, None].expand(importance.shape)  # (B, G, T)
    r = key_redundancy(keys, cand)  # (B, G, T), mean cosine to the other CoT keys
    R = (-r).masked_fill(~real, float("-inf")).softmax(-1).nan_to_num(0.0)  # rows without candidates: 0
    score = lam * importance.to(R.dtype) + (1 - lam) * R
    return score.masked_fill(~real, float("-inf"))


def _compact(candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pos (B, T) candidate time indices first, in time order; n (B,); real (B, T) whether compact slot i <
    n)."""
    pos, n = _ordered_candidates(candidates)
    real = torch.arange(candidates.shape[1], device=candidates.device)[None] < n[:, None]  # (B, T)
    return pos, n, real


def rkv_reference_scores(
    keys: torch.Tensor,
    logits: torch.Tensor,
    valid: torch.Tensor,
    candidates: torch.Tensor,
    window: int,
    lam: float = 0.07,
) -> torch.Tensor:
    """R-KV's scores (module docstring) -> (B, G, T): +inf on the window (always kept), λ·maxpool_7(A) -
    (1-λ)·S on the other candidates, -inf elsewhere.

    keys (B, G, T, D) the candidates' keys (cosines); logits (B, G, Q, T) the attention logits of the window
    rows onto every key, max over each KV head's query group (`kvdistill.models.queries.window_logits`); the Q
    rows are `query_rows(window_rows(candidates, window), mask)`: the window tokens in time order, valid (B,
    Q) marking real ones."""
    cand = candidates.bool()
    B, G, T, D = keys.shape
    work = torch.float64 if keys.dtype == torch.float64 else torch.float32
    pos, n, real = _compact(cand)  # (B, T) each
    w = torch.clamp(n, max=window)  # (B,) window tokens of each sample
    slot = torch.arange(T, device=cand.device)[None]  # (1, T)
    in_window = real & (slot >= (n - w)[:, None])  # (B, T) compact slots of the window
    past = real & ~in_window  # (B, T) the scored (non-window) candidates
    # importance: softmax over the past keys of each window row's logits, mean over the valid rows
    lg = logits.to(work).gather(
        -1, pos[:, None, None].expand(B, G, logits.shape[2], T)
    )  # (B, G, Q, T) compact
    lg = lg.masked_fill(~past[:, None, None], float("-inf"))
    probs = lg.softmax(-1).nan_to_num(0.0)  # rows without past keys: 0
    rows = valid.to(work)[:, None, :, None]  # (B, 1, Q, 1)
    attn = (probs * rows).sum(2) / rows.sum(2).clamp_min(1.0)  # (B, G, T)
    attn = attn.masked_fill(~past[:, None], float("-inf"))
    pooled = torch.nn.functional.max_pool1d(
        attn.reshape(B * G, 1, T), RKV_KERNEL, stride=1, padding=RKV_KERNEL // 2
    ).view(B, G, T)
    # redundancy over every candidate (window included)
    k = keys.to(work).gather(2, pos[:, None, :, None].expand(B, G, T, D))  # (B, G, T, D) compact
    k = k / (k.norm(dim=-1, keepdim=True) + 1e-8)
    pair = real[:, None, :, None] & real[:, None, None, :]  # (B, 1, T, T)
    sim = (k @ k.transpose(-1, -2)).masked_fill(~pair, 0.0)  # (B, G, T, T)
    sim = sim.masked_fill(torch.eye(T, dtype=torch.bool, device=cand.device), 0.0)
    near = torch.where(sim > RKV_THRESHOLD, slot.view(1, 1, 1, T), torch.zeros_like(slot).view(1, 1, 1, T))
    latest = near.amax(-1, keepdim=True)  # (B, G, T, 1): the newest near-duplicate of each row (0: none)
    sim = sim.scatter(-1, latest, 0.0)
    col = sim.sum(2) / n.clamp_min(1).to(work)[:, None, None]  # (B, G, T) the column mean over the n rows
    red = col.masked_fill(~real[:, None], float("-inf")).softmax(-1).nan_to_num(0.0)
    score = lam * pooled - (1 - lam) * red
    score = score.masked_fill(in_window[:, None], float("inf")).masked_fill(~real[:, None], float("-inf"))
    out = torch.full_like(score, float("-inf"))
    return out.scatter(-1, pos[:, None].expand(B, G, T), score)  # back to time order


def latent_rkv(
    keys: torch.Tensor,
    importance: torch.Tensor,
    candidates: torch.Tensor,
    budget: int,
    *,
    lam: float | None = None,
    scoring: str = "kava",
    window: int = 8,
    valid: torch.Tensor | None = None,
) -> LatentTarget:
    """The M best-scoring candidate tokens per head (see the module docstring), in increasing time; lam None:
    the scoring's default (DEFAULT_LAM).

    keys (B, H, T, D) pre-rotation keys of one layer; importance (B, H, T) for scorings kava / minmax
    (`importance_from_attention` or `query_importance` with the answer rows); for scoring rkv the window rows'
    logits (B, H, Q, T) with valid (B, Q) (`rkv_reference_scores`)."""
    cand = _check(candidates, budget)
    if scoring not in SCORINGS:
        raise KvdistillError(
            f"latent target scoring '{scoring}' is unknown", f"use one of {', '.join(SCORINGS)}"
        )
    lam = default_lam(scoring, lam)
    if scoring == "rkv":
        if budget <= window:
            raise KvdistillError(
                f"R-KV keeps its {window}-token window plus scored tokens: a budget of {budget} "
                "leaves none to score",
                "use more latent tokens than the window, or a smaller losses.latent_kv.target.window",
            )
        if (
            valid is None
            or importance.dim() != 4
            or importance.shape[:2] != keys.shape[:2]
            or importance.shape[-1] != keys.shape[2]
            or tuple(valid.shape) != (keys.shape[0], importance.shape[2])
        ):
            raise KvdistillError(
                f"scoring rkv needs the window rows' logits (B, H, Q, T) and valid (B, Q) for keys "
                f"{tuple(keys.shape)}, got {tuple(importance.shape)}",
                "compute them with kvdistill.models.queries.window_logits",
            )
        score = rkv_reference_scores(keys, importance, valid, cand, window, lam)
    else:
        if importance.shape != keys.shape[:-1]:
            raise KvdistillError(
                f"importance {tuple(importance.shape)} does not match keys {tuple(keys.shape)}",
                "importance must be (B, H, T) for keys (B, H, T, D)",
            )
        score = (kava_scores if scoring == "kava" else rkv_scores)(keys, importance, cand, lam)
    order = score.sort(dim=-1, descending=True, stable=True).indices  # (B, H, T), ties: earlier first
    real = score.gather(-1, order) > float("-inf")  # candidates (+inf: R-KV's window)
    return _first_m(order, real, budget)


def window_rows(mask: torch.Tensor, window: int) -> torch.Tensor:
    """(B, T) 1 on the last `window` real tokens of each sample (the R-KV paper's observation window)."""
    real = mask.bool()
    from_end = real.flip(-1).long().cumsum(-1).flip(-1)  # (B, T) real tokens at or after t
    return (real & (from_end <= window)).long()


def latent_target(
    kind: str,
    candidates: torch.Tensor,
    budget: int,
    *,
    keys: torch.Tensor | None = None,
    importance: torch.Tensor | None = None,
    lam: float | None = None,
    scoring: str = "kava",
    window: int = 8,
    valid: torch.Tensor | None = None,
) -> LatentTarget:
    """Dispatch on `kind` (full | right_crop | rkv); rkv needs keys (B, H, T, D) and importance (B, H, T)
    (scoring rkv: the window logits (B, H, Q, T) and valid (B, Q), see `latent_rkv`)."""
    if kind == "full":
        return resample_full(candidates, budget)
    if kind == "right_crop":
        return latent_right_crop(candidates, budget)
    if kind != "rkv":
        raise KvdistillError(
            f"latent target kind '{kind}' is unknown", f"use one of {', '.join(LATENT_KINDS)}"
        )
    if keys is None or importance is None:
        raise KvdistillError(
            "the rkv latent target needs the keys and the attention importance",
            "capture the teacher with its query rows (or eager attention)",
        )
    return latent_rkv(
        keys, importance, candidates, budget, lam=lam, scoring=scoring, window=window, valid=valid
    )
