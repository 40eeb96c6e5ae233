"""Logit distillation across tokenizers by projection onto the token strings both vocabularies share
(`cross_logit_kd`), per sample.

Notation: B batch, T_s/T_t student/teacher time, V_s/V_t their vocabularies, S shared strings, E = S + 1
buckets, n rows (positions, flattened). Divergences, reduction and chunking: `kvdistill.losses.divergence`.

Buckets (`kvdistill.align.vocab`): student_buckets (V_s,) and teacher_buckets (V_t,) give every vocabulary
entry a bucket in [0, S]: buckets 0..S-1 are the token strings both vocabularies share, bucket S ("other")
every entry the other side has no string for. A distribution is projected by summing the probabilities of each
bucket's entries (done in log space, exact); both sides then live on the same S + 1 events.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvdistill.errors import KvdistillError
from kvdistill.losses.divergence import (
    by_chunks,
    check_kd,
    check_logits,
    row_divergence,
    safe_logsumexp,
    scatter_logsumexp,
    soft_log_probs,
    with_tail,
)
from kvdistill.losses.logits import check_topk
from kvdistill.losses.reduce import check_dims, sample_mean, shape_of

_NEG_INF = -math.inf


@dataclass(frozen=True)
class _BucketPlan:
    """How one side's entries fill the E buckets, split so that most of the work is a gather, not a scatter:
    the buckets with one entry (a column copy), the last bucket ("other": one logsumexp over its entries), the
    rest (buckets with several entries: a scatter over those entries only). Scatters into a few crowded
    buckets are slow (on a GPU, atomics on one address), and "other" may hold half of a vocabulary."""

    single_src: torch.Tensor  # (n_1,) entries alone in their bucket
    single_dst: torch.Tensor  # (n_1,) their buckets
    multi_src: torch.Tensor  # (n_m,) entries sharing a named bucket
    multi_local: torch.Tensor  # (n_m,) their bucket's index in multi_dst
    multi_dst: torch.Tensor  # (M,) the named buckets with several entries
    other_src: torch.Tensor  # (n_o,) the entries of the last bucket
    size: int  # E

    def to(self, device) -> _BucketPlan:
        move = [
            x.to(device, non_blocking=True)
            for x in (
                self.single_src,
                self.single_dst,
                self.multi_src,
                self.multi_local,
                self.multi_dst,
                self.other_src,
            )
        ]
        return _BucketPlan(*move, self.size)


def _bucket_plan(buckets: torch.Tensor, size: int) -> _BucketPlan:
    """The plan of `buckets` (V,) long in [0, size)."""
    last = size - 1
    count = torch.bincount(buckets, minlength=size)  # (E,)
    named = buckets < last
    alone = named & (count[buckets] == 1)
    crowded = named & ~alone
    multi_dst, multi_local = buckets[crowded].unique(return_inverse=True)
    return _BucketPlan(
        alone.nonzero()[:, 0],
        buckets[alone],
        crowded.nonzero()[:, 0],
        multi_local,
        multi_dst,
        (buckets == last).nonzero()[:, 0],
        size,
    )


def _project(log_p: torch.Tensor, plan: _BucketPlan) -> torch.Tensor:
    """log Σ of the probabilities in each bucket: log_p (n, V) -> (n, E), -inf for a bucket without entries.
    Exact (the same values as `scatter_logsumexp(log_p, buckets, E)`)."""
    n = log_p.shape[0]
    out = log_p.new_full((n, plan.size), _NEG_INF)
    out = out.index_copy(1, plan.single_dst, log_p.index_select(1, plan.single_src))
    if plan.multi_dst.numel():
        crowded = scatter_logsumexp(
            log_p.index_select(1, plan.multi_src), plan.multi_local, plan.multi_dst.numel()
        )
        out = out.index_copy(1, plan.multi_dst, crowded)  # (n, M) into their buckets
    if plan.other_src.numel():
        other = safe_logsumexp(log_p.index_select(1, plan.other_src))  # (n,)
        out = out.index_copy(1, plan.single_dst.new_full((1,), plan.size - 1), other[:, None])
    return out


def cross_logit_kd(
    student_logits: torch.Tensor,
    teacher: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    teacher_positions: torch.Tensor,
    mask: torch.Tensor,
    student_buckets: torch.Tensor,
    teacher_buckets: torch.Tensor,
    *,
    shared: int,
    temperature: float = 2.0,
    divergence: str = "forward",
    beta: float = 0.5,
    chunk: int = 0,
) -> torch.Tensor:
    """Logit distillation across tokenizers (B,): at each student position whose text prefix a teacher
    position shares, both next-token distributions projected onto the token strings the two vocabularies share
    plus one "other" bucket, then the divergence · τ² of `logit_kd`, averaged over the sample's counted
    positions.

    student_logits (B, T_s, V_s); teacher: its logits (B, T_t, V_t), or its top-k as (ids, log_probs) (B, T_t,
    k) at this temperature (`topk_log_probs`; then the teacher's unnamed mass and the entries without a shared
    string form one tail bucket, and the student's buckets the teacher does not name join it, as in
    `topk_logit_kd`). teacher_positions (B, T_s) long: the teacher position with the same prefix as each
    student position, -1 where none (`kvdistill.align.tokens.prefix_positions`); mask (B, T_s), 1 = counted (a
    position also needs a partner). student_buckets (V_s,), teacher_buckets (V_t,) long in [0, shared]: the
    bucket of every vocabulary entry, bucket `shared` = other (`kvdistill.align.vocab.shared_vocabulary`).
    Positions and buckets may stay on the CPU (they are checked and planned there, then moved: no device
    synchronisation). With one tokenizer (identity buckets, every position its own partner) it equals
    `logit_kd`. Gradients flow into the student only.
    """
    counted = check_logits(student_logits, mask)
    B, T_s, V_s = student_logits.shape
    topk = isinstance(teacher, tuple)
    if topk:
        t_ids, t_lp = teacher
        V_t = teacher_buckets.shape[0]
        check_topk(t_ids, t_lp, V_t, None, "")
        T_t = t_ids.shape[1]
    else:
        check_dims(teacher, 3, "teacher logits", "(B, T_t, V_t)")
        T_t, V_t = teacher.shape[1:]
    if (t_ids if topk else teacher).shape[0] != B:
        raise KvdistillError(
            f"the teacher's batch ({(t_ids if topk else teacher).shape[0]}) is not the student's ({B})",
            "pass the teacher's logits of the same batch of texts",
        )
    if shape_of(teacher_positions) != (B, T_s):
        raise KvdistillError(
            f"teacher_positions {shape_of(teacher_positions)} do not match student_logits "
            f"{shape_of(student_logits)}",
            "pass one teacher position (or -1) per student position",
        )
    if teacher_positions.numel() and int(teacher_positions.max()) >= T_t:
        raise KvdistillError(
            f"teacher_positions reach {int(teacher_positions.max())} but the teacher has {T_t} positions",
            "pass the positions of the teacher's own tokenization of the batch",
        )
    for name, buckets, V in (
        ("student_buckets", student_buckets, V_s),
        ("teacher_buckets", teacher_buckets, V_t),
    ):
        if shape_of(buckets) != (V,) or (V and (int(buckets.min()) < 0 or int(buckets.max()) > shared)):
            raise KvdistillError(
                f"{name} {shape_of(buckets)} must hold one bucket in [0, {shared}] per entry of a "
                f"vocabulary of {V}",
                "pass the projection of kvdistill.align.vocab.shared_vocabulary",
            )
    check_kd(temperature, divergence, beta, chunk)
    device = student_logits.device
    teacher_positions = teacher_positions.to(device, non_blocking=True)
    counted = counted & (teacher_positions >= 0)
    flat_pos = teacher_positions.clamp(min=0) + torch.arange(B, device=device)[:, None] * T_t  # (B, T_s)
    E = shared + 1
    s_plan = _bucket_plan(student_buckets, E).to(
        device
    )  # planned where the buckets are (CPU: no device sync)

    if topk:
        ids_flat, lp_flat = t_ids.reshape(B * T_t, -1), t_lp.detach().reshape(B * T_t, -1)
        t_buckets = teacher_buckets.to(device, non_blocking=True)

        def rows(s, pos, c):  # (n, V_s), (n,), (n,) -> (n,)
            log_s = _project(soft_log_probs(s, c, temperature), s_plan)  # (n, E)
            cols = t_buckets.index_select(0, ids_flat.index_select(0, pos).flatten()).view(pos.shape[0], -1)
            # cols (n, k): the teacher entries' buckets
            lp = torch.where(c[:, None], lp_flat.index_select(0, pos).float(), _NEG_INF)  # (n, k)
            log_t, log_s = with_tail(log_s, cols, lp, cols < shared)
            return row_divergence(log_t, log_s, divergence, beta)
    else:
        t_flat = teacher.detach().reshape(B * T_t, V_t)
        t_plan = _bucket_plan(teacher_buckets, E).to(device)

        def rows(s, pos, c):
            log_s = _project(soft_log_probs(s, c, temperature), s_plan)  # (n, E)
            log_t = _project(soft_log_probs(t_flat.index_select(0, pos), c, temperature), t_plan)
            return row_divergence(log_t, log_s, divergence, beta)

    div = by_chunks(
        rows, chunk, student_logits.reshape(B * T_s, V_s), flat_pos.reshape(B * T_s), counted.reshape(B * T_s)
    )
    return sample_mean(div.view(B, T_s) * temperature**2, counted, 1)
