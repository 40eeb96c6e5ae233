"""Mixture-of-experts distillation, per sample: routing distributions, expert outputs, load balance.

Notation: B batch, T_s student tokens, M teacher tokens, E_s/E_t experts, k_s/k_t experts chosen per token,
F expert output width (the student's already projected to the teacher's), K alignment nonzeros per teacher
token.

Token alignment (every teacher-side function): teacher token m of sample b overlaps the student tokens
index[b, m, :] with weight[b, m, :] (B, M, K), each row summing to 1 over the student tokens it overlaps and 0
in unused slots (`kvdistill.align.tokens.batch_token_alignment_sparse` with the teacher's tokens as rows). One
tokenizer: M = T_s, K = 1, index[b, m, 0] = m, weight 1.

Expert correspondence: `corr` (E_t, E_s), rows summing to 1: teacher expert e's routing probability is spread
over the student experts corr[e] (the identity when the experts correspond one to one). It is fixed, never
learned, so the loss cannot shrink it to nothing. The student's distribution is compared on the teacher's
tokens as the mixture Σ_k weight·p_s over the student tokens each teacher token overlaps.

Routing distributions come from the router logits: softmax for Mixtral / Qwen-MoE / OLMoE, sigmoid scores
normalised to sum 1 for DeepSeek-V3-style routers (`routing_log_probs`); a softmax is never applied to values
that are already probabilities.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kvdistill.errors import KvdistillError
from kvdistill.losses.reduce import check_dims, check_mask, sample_mean, shape_of

SCORINGS = ("softmax", "sigmoid")
NEG = -1e9  # log of "no mass" on the student's side: finite, so a row with none gets zero gradients, not NaN
ROUTING_KINDS = ("full", "topk")


def routing_log_probs(router_logits: torch.Tensor, scoring: str = "softmax") -> torch.Tensor:
    """log p (..., E) of a router's logits (..., E): log_softmax, or log(σ(l) / Σ σ(l)) for sigmoid
    routers."""
    if scoring not in SCORINGS:
        raise KvdistillError(f"router scoring '{scoring}' is unknown", f"use one of {', '.join(SCORINGS)}")
    logits = router_logits.float()
    if scoring == "softmax":
        return torch.log_softmax(logits, dim=-1)
    log_sig = F.logsigmoid(logits)
    return log_sig - torch.logsumexp(log_sig, dim=-1, keepdim=True)


def _check_alignment(index: torch.Tensor, weight: torch.Tensor, B: int, M: int) -> None:
    check_dims(index, 3, "index", "(B, M, K)")
    if shape_of(index) != shape_of(weight) or index.shape[:2] != (B, M):
        raise KvdistillError(
            f"alignment index {shape_of(index)} / weight {shape_of(weight)} do not match the "
            f"teacher's (B, M) = ({B}, {M})",
            "pass the teacher-rows alignment of the same batch (batch_token_alignment_sparse)",
        )


def _gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, T_s, *R) at index (B, M, K) along the token dim -> (B, M, K, *R)."""
    B, M, K = index.shape
    rest = x.shape[2:]
    flat = index.reshape(B, M * K, *([1] * len(rest))).expand(B, M * K, *rest)
    return torch.gather(x, 1, flat).view(B, M, K, *rest)


def student_on_teacher(student_logp: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """log of the student's routing distribution on the teacher's tokens (B, M, E_s): log Σ_k
    weight_k·p_s(index_k), from student_logp (B, T_s, E_s); rows without an overlapping student token hold
    about `NEG`."""
    logw = torch.where(
        weight > 0, weight.float().clamp(min=1e-30).log(), torch.full((), NEG, device=weight.device)
    )  # (B, M, K)
    gathered = _gather_tokens(student_logp, index)  # (B, M, K, E_s)
    return torch.logsumexp(gathered + logw[..., None], dim=2)  # (B, M, E_s)


def teacher_on_student_experts(teacher_logp: torch.Tensor, corr: torch.Tensor) -> torch.Tensor:
    """log of the teacher's distribution moved onto the student's experts (B, M, E_s): log Σ_e p_t(e)·corr[e,
    s]."""
    logc = torch.where(
        corr > 0, corr.float().clamp(min=1e-30).log(), torch.full((), -math.inf, device=corr.device)
    )
    return torch.logsumexp(teacher_logp[..., :, None] + logc, dim=-2)  # (B, M, E_t, E_s) -> (B, M, E_s)


def _restrict(logp: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """logp (..., E) renormalised over the entries `keep` (bool, same shape); `NEG` elsewhere (finite: no NaN
    gradient in a row that keeps nothing)."""
    masked = logp.masked_fill(~keep, NEG)
    return (masked - torch.logsumexp(masked, dim=-1, keepdim=True)).masked_fill(~keep, NEG)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Σ p (log p - log q) over the last dim, 0 where p has no mass (-inf or `NEG`; no -inf - -inf = NaN)."""
    has_mass = log_p > NEG / 2
    gap = torch.where(has_mass, log_p - log_q, torch.zeros((), device=log_p.device))
    return (log_p.exp() * gap).sum(-1)


def _check_routing(student_logp, teacher_logp, teacher_mask, index, weight, corr):
    check_dims(student_logp, 3, "student_logp", "(B, T_s, E_s)")
    check_dims(teacher_logp, 3, "teacher_logp", "(B, M, E_t)")
    B, M, E_t = teacher_logp.shape
    E_s = student_logp.shape[-1]
    if student_logp.shape[0] != B:
        raise KvdistillError(
            f"student_logp {shape_of(student_logp)} and teacher_logp {shape_of(teacher_logp)} "
            "hold different batches",
            "pass both models' routing of the same records",
        )
    if shape_of(corr) != (E_t, E_s):
        raise KvdistillError(
            f"expert correspondence {shape_of(corr)} must be (E_t, E_s) = ({E_t}, {E_s})",
            "build it from the teacher's and the student's expert counts",
        )
    _check_alignment(index, weight, B, M)
    return check_mask(teacher_mask, (B, M), "the teacher's (B, M)") & (weight.sum(-1) > 0)


def routing_kl(
    student_logp: torch.Tensor,
    teacher_logp: torch.Tensor,
    teacher_mask: torch.Tensor,
    index: torch.Tensor,
    weight: torch.Tensor,
    corr: torch.Tensor,
    *,
    kind: str = "full",
    top_k: int | None = None,
) -> torch.Tensor:
    """Per-sample routing distillation (B,): KL(q_t || p_s) per teacher token, averaged over the sample's
    teacher tokens that are real and overlap a student token.

    student_logp (B, T_s, E_s), teacher_logp (B, M, E_t): `routing_log_probs` of one MoE layer of each model;
    teacher_mask (B, M), 1 = real; index, weight (B, M, K) the alignment; corr (E_t, E_s) the correspondence.
    q_t = p_t·corr on the student's experts, p_s the student's mixture on the teacher's token (module
    docstring). kind "full": over every expert. kind "topk": over the student experts that the teacher's top_k
    experts map to, both distributions renormalised there (the teacher's choice, not its tail). Gradients
    reach student_logp.
    """
    if kind not in ROUTING_KINDS:
        raise KvdistillError(f"routing KL kind '{kind}' is unknown", f"use one of {', '.join(ROUTING_KINDS)}")
    counted = _check_routing(student_logp, teacher_logp, teacher_mask, index, weight, corr)
    log_s = student_on_teacher(student_logp.float(), index, weight)  # (B, M, E_s)
    t_logp = teacher_logp.float()
    if kind == "topk":
        if top_k is None or not 0 < top_k <= t_logp.shape[-1]:
            raise KvdistillError(
                f"routing KL kind 'topk' needs 0 < top_k <= {t_logp.shape[-1]} (got {top_k})",
                "pass the teacher's experts per token (num_experts_per_tok)",
            )
        chosen = torch.zeros_like(t_logp, dtype=torch.bool).scatter_(
            -1, t_logp.topk(top_k, dim=-1).indices, True
        )
        t_logp = _restrict(t_logp, chosen)  # (B, M, E_t) renormalised over the teacher's top-k
        support = (chosen.float() @ (corr > 0).float()) > 0  # (B, M, E_s) student experts those map to
        log_s = _restrict(log_s, support)
    log_q = teacher_on_student_experts(t_logp, corr)  # (B, M, E_s)
    rows = ~counted[..., None]
    kl = _kl(
        log_q.masked_fill(rows, 0.0), log_s.masked_fill(rows, 0.0)
    )  # (B, M); uncounted rows read nothing
    return sample_mean(kl, counted, 1)


@torch.no_grad()
def routing_agreement(
    student_logp: torch.Tensor,
    teacher_logp: torch.Tensor,
    teacher_mask: torch.Tensor,
    index: torch.Tensor,
    weight: torch.Tensor,
    corr: torch.Tensor,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-1 agreement (B,), top-k overlap (B,)) per sample over the counted teacher tokens: whether the
    student's most likely expert is the one most likely under q_t, and |top-k(p_s) ∩ top-k(q_t)| / k (inputs
    as `routing_kl`; both on the student's experts, k <= E_s)."""
    counted = _check_routing(student_logp, teacher_logp, teacher_mask, index, weight, corr)
    log_s = student_on_teacher(student_logp.float(), index, weight).nan_to_num(neginf=-1e30)  # (B, M, E_s)
    log_q = teacher_on_student_experts(teacher_logp.float(), corr).nan_to_num(neginf=-1e30)
    k = min(k, log_s.shape[-1])
    top1 = (log_s.argmax(-1) == log_q.argmax(-1)).float()  # (B, M)
    s_top = torch.zeros_like(log_s, dtype=torch.bool).scatter_(-1, log_s.topk(k, dim=-1).indices, True)
    q_top = torch.zeros_like(log_q, dtype=torch.bool).scatter_(-1, log_q.topk(k, dim=-1).indices, True)
    overlap = (s_top & q_top).sum(-1).float() / k  # (B, M)
    return sample_mean(top1, counted, 1), sample_mean(overlap, counted, 1)


def expert_output_error(
    student_out: torch.Tensor,
    student_idx: torch.Tensor,
    teacher_out: torch.Tensor,
    teacher_idx: torch.Tensor,
    teacher_mask: torch.Tensor,
    index: torch.Tensor,
    weight: torch.Tensor,
    teacher_of: torch.Tensor,
    *,
    normalize: bool = True,
) -> torch.Tensor:
    """Per-sample expert-output distillation (B,): MSE between corresponding experts' outputs on the tokens
    routed to both.

    student_out (B, T_s, k_s, F): the (projected) output of each expert the student chose at each token,
    before the router weight; student_idx (B, T_s, k_s) which experts those are. teacher_out (B, M, k_t, F),
    teacher_idx (B, M, k_t) the same for the teacher; teacher_mask (B, M) 1 = real. index, weight (B, M, K):
    the alignment. teacher_of (E_s,) long: the teacher expert that corresponds to each student expert.

    A pair (teacher token m, student token t = index[m, k], student slot j, teacher slot i) counts when the
    student routed t to expert s = student_idx[t, j], the teacher routed m to teacher_of[s] = teacher_idx[m,
    i] and the tokens overlap (weight > 0); its error ||y_s - y_t||² / F is weighed by the alignment weight.
    The value is the weighted mean over the sample's counted pairs, divided (normalize) by the weighted mean
    of ||y_t||² / F over the same pairs (a relative error, comparable across layers and models). Nothing
    counted: 0.
    """
    check_dims(student_out, 4, "student_out", "(B, T_s, k_s, F)")
    check_dims(teacher_out, 4, "teacher_out", "(B, M, k_t, F)")
    B, M, k_t, Fw = teacher_out.shape
    if student_out.shape[0] != B or student_out.shape[-1] != Fw:
        raise KvdistillError(
            f"student_out {shape_of(student_out)} and teacher_out {shape_of(teacher_out)} differ "
            "in batch or width",
            f"project the student's expert outputs to the teacher's width {Fw}",
        )
    if shape_of(student_idx) != shape_of(student_out)[:3] or shape_of(teacher_idx) != (B, M, k_t):
        raise KvdistillError(
            f"expert indices {shape_of(student_idx)} / {shape_of(teacher_idx)} do not match the "
            f"outputs {shape_of(student_out)} / {shape_of(teacher_out)}",
            "pass the top-k indices captured with the outputs",
        )
    _check_alignment(index, weight, B, M)
    real = check_mask(teacher_mask, (B, M), "the teacher's (B, M)")
    ys = _gather_tokens(student_out.float(), index)  # (B, M, K, k_s, F)
    js = _gather_tokens(student_idx, index)  # (B, M, K, k_s)
    wanted = teacher_of[js]  # (B, M, K, k_s) the teacher expert each student slot corresponds to
    match = wanted[..., None] == teacher_idx[:, :, None, None, :]  # (B, M, K, k_s, k_t)
    match = match & (weight > 0)[..., None, None] & real[:, :, None, None, None]
    yt = teacher_out.float()
    sq_s = (ys * ys).sum(-1)[..., None]  # (B, M, K, k_s, 1)
    sq_t = (yt * yt).sum(-1)[:, :, None, None, :]  # (B, M, 1, 1, k_t)
    dot = torch.einsum("bmkjf,bmif->bmkji", ys, yt)  # (B, M, K, k_s, k_t)
    err = (sq_s + sq_t - 2 * dot).clamp(min=0.0) / Fw  # ||y_s - y_t||² / F without a (.., k_s, k_t, F) tensor
    w = torch.where(
        match, weight[..., None, None].float().expand_as(match), torch.zeros((), device=weight.device)
    )
    num = torch.where(match, err, torch.zeros((), device=err.device)).mul(w).flatten(1).sum(1)  # (B,)
    den = w.flatten(1).sum(1)
    if normalize:
        den = (w * (sq_t / Fw)).flatten(1).sum(1)
    return torch.where(den > 0, num / den.clamp(min=1e-12), torch.zeros_like(num))


def load_balance(router_logp: torch.Tensor, chosen: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample (sequence-wise) load-balancing loss (B,): E · Σ_e f_e · P_e over the sample's real tokens,
    with f_e the fraction of tokens routed to expert e (Σ_e f_e = k) and P_e the mean routing probability of
    e; 1·k when perfectly balanced. The Switch / Mixtral auxiliary loss computed per sequence (as
    DeepSeek-V3's sequence-wise balance loss is), so a batch's loss is the mean of its samples' and DDP equals
    one process.

    router_logp (B, T, E) `routing_log_probs`; chosen (B, T, k) the experts each token was routed to; mask (B,
    T). Gradients reach router_logp through P (f counts are not differentiable).
    """
    check_dims(router_logp, 3, "router_logp", "(B, T, E)")
    B, T, E = router_logp.shape
    real = check_mask(mask, (B, T), "the router's (B, T)")
    counts = torch.zeros(B, T, E, device=router_logp.device).scatter_add_(
        -1, chosen, torch.ones_like(chosen, dtype=torch.float32)
    )  # (B, T, E) slots per expert
    n = real.sum(1).clamp(min=1).float()  # (B,)
    f = torch.where(real[..., None], counts, 0.0).sum(1) / n[:, None]  # (B, E)
    P = torch.where(real[..., None], router_logp.float().exp(), 0.0).sum(1) / n[:, None]  # (B, E)
    return E * (f * P).sum(-1)
