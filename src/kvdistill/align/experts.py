"""Expert matching between an MoE student and an MoE teacher: which teacher block each student block learns
from, and which teacher experts each student expert stands for. Training's MoE terms
(`kvdistill.objectives.moe`) and the held-out routing agreement (`kvdistill.eval.moe`) both call these.

Notation: P_s/P_t MoE blocks, E_s/E_t experts, N tokens.
"""

from __future__ import annotations

import torch


def block_pairs(p_s: int, p_t: int) -> list[tuple[int, int]]:
    """(student block, teacher block) for every student MoE block: the ratio map, ends to ends."""
    if p_s == 1:
        return [(0, p_t - 1)]
    return [(i, round(i * (p_t - 1) / (p_s - 1))) for i in range(p_s)]


def fit_correspondence(probs: torch.Tensor, e_s: int, *, iters: int = 25) -> torch.Tensor:
    """corr (E_t, E_s), rows summing to 1, from the teacher's routing probabilities `probs` (N, E_t) on N
    tokens.

    E_t >= E_s: the teacher's experts are grouped into E_s groups by co-activation (k-means of their unit-norm
    probability profiles over the tokens, farthest-point start from the busiest expert, no group left empty);
    a teacher expert's probability goes to its group's student expert. E_t < E_s: every teacher expert gets a
    share of the student experts in proportion to its load (at least one; largest remainders), its probability
    split evenly over them. Deterministic.
    """
    N, e_t = probs.shape
    corr = torch.zeros(e_t, e_s)
    load = probs.float().mean(0)  # (E_t,)
    if e_t < e_s:
        share = torch.ones(e_t) + load / load.sum().clamp(min=1e-12) * (e_s - e_t)
        counts = share.floor().long()
        order = torch.argsort(share - counts, descending=True, stable=True)
        counts[order[: e_s - int(counts.sum())]] += 1
        start = 0
        for e in range(e_t):
            corr[e, start : start + counts[e]] = 1.0 / float(counts[e])
            start += int(counts[e])
        return corr
    prof = probs.float().T  # (E_t, N)
    prof = prof / prof.norm(dim=1, keepdim=True).clamp(min=1e-12)
    centers = [int(load.argmax())]
    for _ in range(1, e_s):
        sim = (prof @ prof[centers].T).max(1).values  # (E_t,) closeness to the nearest center
        sim[centers] = float("inf")
        centers.append(int(sim.argmin()))
    cent = prof[centers].clone()  # (E_s, N)
    assign = torch.zeros(e_t, dtype=torch.long)
    for _ in range(iters):
        assign = (prof @ cent.T).argmax(1)  # (E_t,)
        for g in range(e_s):  # an empty group takes the expert farthest from its own center
            if not bool((assign == g).any()):
                fit = (prof * cent[assign]).sum(1)
                movable = torch.tensor([int((assign == assign[e]).sum()) > 1 for e in range(e_t)])
                fit[~movable] = float("inf")
                assign[int(fit.argmin())] = g
        new = torch.stack([prof[assign == g].mean(0) for g in range(e_s)])
        new = new / new.norm(dim=1, keepdim=True).clamp(min=1e-12)
        if torch.allclose(new, cent):
            break
        cent = new
    corr[torch.arange(e_t), assign] = 1.0
    return corr


def teacher_of(corr: torch.Tensor, load: torch.Tensor | None = None) -> torch.Tensor:
    """(E_s,) the teacher expert each student expert corresponds to: the one sending it most probability mass
    (ties: the busier teacher expert by `load`, then the lower index)."""
    score = corr.clone()
    if load is not None:
        score = score + 1e-6 * load[:, None] / load.max().clamp(min=1e-12)
    return score.argmax(0)
