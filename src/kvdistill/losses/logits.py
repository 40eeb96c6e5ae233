"""Next-token cross-entropy and logit distillation, per sample.

Notation: B batch, T time, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kvdistill.errors import KvdistillError
from kvdistill.losses.reduce import check_dims, check_mask, check_same, sample_mean, shape_of

DIVERGENCES = ("forward", "reverse", "jsd")


def token_nll(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token negative log-likelihood at every position: (nll (B, T), counted (B, T) bool).

    logits: (B, T, V) at positions 0..T-1; labels: (B, T) token ids (usually input_ids); mask: (B, T), 1 =
    real. logits[:, t] predicts labels[:, t + 1], counted where mask[:, t] and mask[:, t + 1] are both 1; the
    last position is never counted. The shift rolls the labels, so the (B, T, V) logits are not sliced (no (B,
    T, V) copy forward, none zero-filled in backward). Labels at uncounted positions are ignored (may be
    -100).
    """
    check_dims(logits, 3, "logits", "(B, T, V)")
    B, T, V = logits.shape
    if shape_of(labels) != (B, T):
        raise KvdistillError(
            f"labels {shape_of(labels)} do not match logits {shape_of(logits)}",
            f"pass labels as ({B}, {T}) token ids of the same batch",
        )
    real = check_mask(mask, (B, T), "logits' (B, T)")
    counted = real & real.roll(-1, dims=1)  # (B, T) a real token predicting a real token
    counted[:, -1] = False
    following = torch.where(counted, labels.roll(-1, dims=1), torch.zeros_like(labels))  # (B, T)
    bad = (following < 0) | (following >= V)
    if bool(bad.any()):
        raise KvdistillError(
            f"label id {int(following[bad][0])} is outside the vocabulary of {V} logits",
            "labels must be token ids of the model's own tokenizer",
        )
    nll = F.cross_entropy(logits.reshape(B * T, V).float(), following.reshape(B * T), reduction="none")
    return nll.view(B, T), counted


def ce_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample next-token cross-entropy (B,): the mean of `token_nll` over the sample's counted
    predictions.

    Perplexity over a corpus is exp of the token-level mean of `token_nll` instead (long samples weigh more).
    """
    nll, counted = token_nll(logits, labels, mask)
    return sample_mean(nll, counted, 1)


# ----------------------------------------------------------------------------------------- logit distillation
# Every logit KD function below compares two distributions per counted row (a student position) and reduces
# like the rest of the library: divergence · τ², averaged over the sample's counted rows, (B,).
#
# Rows are computed `chunk` at a time (0: all at once). A chunk's float32 softmaxes live only while it is
# computed: each chunk is recomputed in backward (torch.utils.checkpoint), and the student's logits are cut
# with one `split` whose backward concatenates the chunks' gradients, so no (B, T, V) float32 copy exists
# beyond the gradient itself (in the logits' own dtype). Chunked and unchunked runs do the same arithmetic per
# row: equal values and gradients.
#
# Buckets (cross-tokenizer projection, `kvdistill.align.vocab`): student_buckets (V_s,) and teacher_buckets
# (V_t,) give every vocabulary entry a bucket in [0, S]: buckets 0..S-1 are the token strings both
# vocabularies share, bucket S ("other") every entry the other side has no string for. A distribution is
# projected by summing the probabilities of each bucket's entries (done in log space, exact); both sides then
# live on the same S + 1 events.

TAIL_FLOOR = 1e-12
"""The tail bucket of a top-k teacher, max(1 - Σ top-k probabilities, TAIL_FLOOR): stored log-probabilities
may sum past 1 by rounding, and a tail of exactly 0 would make reverse KL infinite."""

_NEG_INF = -math.inf


def _kl_terms(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Σ_v p_v (log p_v - log q_v) over the last dim, with 0 where p_v = 0 (also where both are -inf)."""
    has_mass = log_p > _NEG_INF
    gap = torch.where(has_mass, log_p - log_q, torch.zeros((), device=log_p.device))  # no -inf - -inf = NaN
    return (log_p.exp() * gap).sum(-1)


def _divergence(log_t: torch.Tensor, log_s: torch.Tensor, divergence: str, beta: float) -> torch.Tensor:
    """The divergence between two distributions given as log-probabilities over the last dim (..., E) ->
    (...)."""
    if divergence == "forward":
        return _kl_terms(log_t, log_s)
    if divergence == "reverse":
        return _kl_terms(log_s, log_t)
    # log m = log(β·p_t + (1-β)·p_s); entries impossible on both sides stay -inf without a NaN gradient
    both = (log_t == _NEG_INF) & (log_s == _NEG_INF)  # (..., E)
    zero = torch.zeros((), device=log_t.device)
    a = torch.where(both, zero, log_t + math.log(beta))
    b = torch.where(both, zero, log_s + math.log(1 - beta))
    log_m = torch.where(both, torch.full((), _NEG_INF, device=a.device), torch.logaddexp(a, b))
    return beta * _kl_terms(log_t, log_m) + (1 - beta) * _kl_terms(log_s, log_m)


def _check_kd(temperature: float, divergence: str, beta: float, chunk: int) -> None:
    if not temperature > 0:
        raise KvdistillError(f"temperature ({temperature}) must be > 0", "use e.g. temperature=2.0")
    if divergence not in DIVERGENCES:
        raise KvdistillError(
            f"logit KD divergence '{divergence}' is unknown", f"use one of {', '.join(DIVERGENCES)}"
        )
    if divergence == "jsd" and not 0 < beta < 1:
        raise KvdistillError(
            f"jsd beta ({beta}) must lie strictly between 0 and 1",
            "use e.g. beta=0.5 (forward or reverse KL are the limits)",
        )
    if chunk < 0:
        raise KvdistillError(f"chunk ({chunk}) must be >= 0", "pass the rows per chunk, or 0 for one pass")


def _by_chunks(fn, chunk: int, *rows: torch.Tensor) -> torch.Tensor:
    """fn(*rows) (N,) computed `chunk` rows at a time; every tensor of `rows` has N rows along dim 0."""
    N = rows[0].shape[0]
    if chunk <= 0 or chunk >= N:
        return fn(*rows)
    parts = zip(*(x.split(chunk) for x in rows), strict=True)
    if not torch.is_grad_enabled():
        return torch.cat([fn(*p) for p in parts])
    return torch.cat([checkpoint(fn, *p, use_reentrant=False) for p in parts])


def _soft(logits: torch.Tensor, counted: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(logits / τ) in float32 (n, V); rows not counted are zeroed first (NaN there reaches
    nothing)."""
    return torch.log_softmax((logits.float() / temperature).masked_fill(~counted[:, None], 0.0), dim=-1)


def _scatter_logsumexp(values: torch.Tensor, cols: torch.Tensor, size: int) -> torch.Tensor:
    """out[r, c] = log Σ_{m: cols[r, m] = c} exp(values[r, m]); -inf where nothing (with mass) lands.

    values (n, m) float, cols (n, m) or (m,) long in [0, size) -> (n, size). Exact: each bucket is shifted by
    its largest member (the shift is detached: the result does not depend on it), so its sum is >= 1 where
    finite.
    """
    n = values.shape[0]
    cols = cols.expand_as(values)
    top = values.new_full((n, size), _NEG_INF).scatter_reduce(1, cols, values, "amax")  # (n, size)
    shift = torch.where(top > _NEG_INF, top, torch.zeros((), device=top.device)).detach()  # (n, size)
    total = values.new_zeros(n, size).scatter_add(
        1, cols, (values - shift.gather(1, cols)).exp()
    )  # (n, size)
    # log 0 = -inf for empty buckets, through a clamped log so that no inf gradient is made there
    return torch.where(total > 0, total.clamp(min=torch.finfo(total.dtype).tiny).log() + shift, top)


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
    Exact (the same values as `_scatter_logsumexp(log_p, buckets, E)`)."""
    n = log_p.shape[0]
    out = log_p.new_full((n, plan.size), _NEG_INF)
    out = out.index_copy(1, plan.single_dst, log_p.index_select(1, plan.single_src))
    if plan.multi_dst.numel():
        crowded = _scatter_logsumexp(
            log_p.index_select(1, plan.multi_src), plan.multi_local, plan.multi_dst.numel()
        )
        out = out.index_copy(1, plan.multi_dst, crowded)  # (n, M) into their buckets
    if plan.other_src.numel():
        other = _safe_logsumexp(log_p.index_select(1, plan.other_src))  # (n,)
        out = out.index_copy(1, plan.single_dst.new_full((1,), plan.size - 1), other[:, None])
    return out


def _safe_logsumexp(x: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim, -inf (with a zero gradient, not NaN) where every entry is -inf."""
    empty = (x == _NEG_INF).all(-1, keepdim=True)  # (..., 1)
    return torch.where(empty[..., 0], _NEG_INF, x.masked_fill(empty, 0.0).logsumexp(-1))


def _with_tail(
    log_s: torch.Tensor, cols: torch.Tensor, t_log_probs: torch.Tensor, named: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A top-k teacher against the full student: both on the columns the teacher names plus one tail bucket.

    log_s (n, E) the student's log-probabilities over E columns (vocabulary entries or buckets); cols (n, k)
    the column of each of the teacher's k entries, t_log_probs (n, k) their log-probabilities, named (n, k)
    whether the entry has a column of its own (an entry without one, or -inf, joins the tail). Returns (log_t,
    log_s) (n, E + 1): the named columns as they are, every other column's mass in the last one (teacher:
    max(1 - Σ named, TAIL_FLOOR)).
    """
    E = log_s.shape[-1]
    log_t = _scatter_logsumexp(torch.where(named, t_log_probs, _NEG_INF), cols, E)  # (n, E)
    hit = log_t > _NEG_INF  # (n, E) columns the teacher gives mass
    t_tail = (1 - log_t.exp().sum(-1)).clamp(min=TAIL_FLOOR).log()  # (n,)
    s_tail = _safe_logsumexp(log_s.masked_fill(hit, _NEG_INF))  # (n,)
    return (
        torch.cat([log_t, t_tail[:, None]], -1),
        torch.cat([log_s.masked_fill(~hit, _NEG_INF), s_tail[:, None]], -1),
    )


def _check_logits(student_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    check_dims(student_logits, 3, "student_logits", "(B, T, V)")
    return check_mask(mask, tuple(student_logits.shape[:2]), "the logits' (B, T)")


def logit_kd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 2.0,
    divergence: str = "forward",
    beta: float = 0.5,
    chunk: int = 0,
) -> torch.Tensor:
    """Per-sample logit distillation (B,): a divergence between p_t = softmax(teacher/τ) and p_s =
    softmax(student/τ) at each counted position, times τ², averaged over the sample's counted positions.

    student_logits, teacher_logits: (B, T, V) at the same positions (no shift), the same vocabulary.
    mask: (B, T), 1 = counted. divergence:
      "forward"  KL(p_t || p_s) = Σ p_t (log p_t - log p_s)   (mean-seeking; the classic KD term)
      "reverse"  KL(p_s || p_t)                               (mode-seeking)
      "jsd"      β·KL(p_t || m) + (1-β)·KL(p_s || m), m = β·p_t + (1-β)·p_s, 0 < β < 1 (β = 0.5: the
                 Jensen-Shannon divergence; bounded by ln 2 per position before the τ² factor)
    τ²: the gradient of a softened divergence shrinks as 1/τ²; the factor keeps its size comparable across τ.
    chunk: positions per chunk (0: one pass; see the note above on memory).
    A vocabulary entry that both distributions give probability 0 (both logits -inf: masked vocabularies,
    padded embeddings) contributes 0, so the value and its gradient stay finite there. Gradients flow into
    both inputs; detach the teacher.
    """
    check_dims(teacher_logits, 3, "teacher_logits", "(B, T, V)")
    counted = _check_logits(student_logits, mask)
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise KvdistillError(
            f"logit KD needs the same vocabulary; student_logits {shape_of(student_logits)} has "
            f"{student_logits.shape[-1]} and teacher_logits {shape_of(teacher_logits)} has "
            f"{teacher_logits.shape[-1]} entries",
            "use cross_logit_kd with the vocabulary projection of kvdistill.align.vocab for another "
            "tokenizer",
        )
    check_same(
        student_logits,
        teacher_logits,
        "student_logits",
        "teacher_logits",
        "logit KD needs both models run on the same tokens",
    )
    _check_kd(temperature, divergence, beta, chunk)
    B, T, V = student_logits.shape

    def rows(s, t, c):  # (n, V), (n, V), (n,) -> (n,)
        return _divergence(_soft(t, c, temperature), _soft(s, c, temperature), divergence, beta)

    div = _by_chunks(
        rows,
        chunk,
        student_logits.reshape(B * T, V),
        teacher_logits.reshape(B * T, V),
        counted.reshape(B * T),
    )
    return sample_mean(div.view(B, T) * temperature**2, counted, 1)


def topk_log_probs(
    teacher_logits: torch.Tensor, k: int, *, temperature: float = 1.0, chunk: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most probable entries of softmax(teacher/τ) at each position: ids (B, T, k) long and their
    log-probabilities (B, T, k) float32 (exact: normalised over the whole vocabulary), most probable first;
    under no_grad, `chunk` positions at a time. teacher_logits (B, T, V), 0 < k < V."""
    check_dims(teacher_logits, 3, "teacher_logits", "(B, T, V)")
    B, T, V = teacher_logits.shape
    if not 0 < k < V:
        raise KvdistillError(
            f"top-k k ({k}) must lie in [1, {V - 1}] for a vocabulary of {V} entries",
            "lower top_k, or use the full distribution (logit_kd) for a vocabulary this small",
        )
    if not temperature > 0:
        raise KvdistillError(f"temperature ({temperature}) must be > 0", "use e.g. temperature=2.0")
    flat = teacher_logits.detach().reshape(B * T, V)
    ids, lps = [], []
    with torch.no_grad():
        for part in flat.split(chunk if chunk > 0 else max(B * T, 1)):
            lp, idx = torch.log_softmax(part.float() / temperature, dim=-1).topk(k, dim=-1)  # (n, k)
            ids.append(idx)
            lps.append(lp)
    return torch.cat(ids).view(B, T, k), torch.cat(lps).view(B, T, k)


def _check_topk(teacher_ids: torch.Tensor, teacher_log_probs: torch.Tensor, V: int, T: int | None, what: str):
    check_dims(teacher_ids, 3, "teacher_ids", "(B, T, k)")
    check_same(
        teacher_ids,
        teacher_log_probs,
        "teacher_ids",
        "teacher_log_probs",
        "pass the ids and log-probabilities of one top-k (topk_log_probs)",
    )
    if T is not None and teacher_ids.shape[1] != T:
        raise KvdistillError(
            f"teacher_ids {shape_of(teacher_ids)} do not match {what}",
            "pass the teacher's top-k at the student's positions",
        )
    if teacher_ids.numel() and (int(teacher_ids.min()) < 0 or int(teacher_ids.max()) >= V):
        raise KvdistillError(
            f"teacher_ids hold ids outside [0, {V}) (min {int(teacher_ids.min())}, max "
            f"{int(teacher_ids.max())})",
            "pass token ids of the teacher's own vocabulary",
        )


def topk_logit_kd(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 2.0,
    divergence: str = "forward",
    beta: float = 0.5,
    chunk: int = 0,
) -> torch.Tensor:
    """`logit_kd` against a teacher known by its top-k entries (B,): both distributions on k + 1 events, the
    teacher's k entries and one tail bucket holding the rest of the mass.

    student_logits (B, T, V); teacher_ids (B, T, k) distinct ids of the same vocabulary, teacher_log_probs (B,
    T, k) the teacher's log-probabilities of them at this temperature (`topk_log_probs(teacher_logits, k,
    temperature=τ)`); mask (B, T). Per counted position, with P_t = Σ_i p_t(id_i) and P_s = Σ_i p_s(id_i):

        teacher (p_t(id_1), ..., p_t(id_k), max(1 - P_t, TAIL_FLOOR)),
        student (p_s(id_1), ..., p_s(id_k), 1 - P_s)

    (the student's tail in log space from its own logits, not by subtraction), then divergence · τ² as
    `logit_kd`. With the teacher's whole vocabulary but one entry it is `logit_kd` exactly. Gradients flow
    into the student only.
    """
    counted = _check_logits(student_logits, mask)
    B, T, V = student_logits.shape
    _check_topk(teacher_ids, teacher_log_probs, V, T, f"student_logits {shape_of(student_logits)}")
    _check_kd(temperature, divergence, beta, chunk)
    k = teacher_ids.shape[-1]

    def rows(s, ids, lp, c):  # (n, V), (n, k), (n, k), (n,) -> (n,)
        lp = torch.where(
            c[:, None], lp.float(), _NEG_INF
        )  # rows not counted: no teacher mass, a zero divergence
        log_t, log_s = _with_tail(_soft(s, c, temperature), ids, lp, torch.ones_like(ids, dtype=torch.bool))
        return _divergence(log_t, log_s, divergence, beta)

    div = _by_chunks(
        rows,
        chunk,
        student_logits.reshape(B * T, V),
        teacher_ids.reshape(B * T, k),
        teacher_log_probs.detach().reshape(B * T, k),
        counted.reshape(B * T),
    )
    return sample_mean(div.view(B, T) * temperature**2, counted, 1)


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
    counted = _check_logits(student_logits, mask)
    B, T_s, V_s = student_logits.shape
    topk = isinstance(teacher, tuple)
    if topk:
        t_ids, t_lp = teacher
        V_t = teacher_buckets.shape[0]
        _check_topk(t_ids, t_lp, V_t, None, "")
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
    _check_kd(temperature, divergence, beta, chunk)
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
            log_s = _project(_soft(s, c, temperature), s_plan)  # (n, E)
            cols = t_buckets.index_select(0, ids_flat.index_select(0, pos).flatten()).view(pos.shape[0], -1)
            # cols (n, k): the teacher entries' buckets
            lp = torch.where(c[:, None], lp_flat.index_select(0, pos).float(), _NEG_INF)  # (n, k)
            log_t, log_s = _with_tail(log_s, cols, lp, cols < shared)
            return _divergence(log_t, log_s, divergence, beta)
    else:
        t_flat = teacher.detach().reshape(B * T_t, V_t)
        t_plan = _bucket_plan(teacher_buckets, E).to(device)

        def rows(s, pos, c):
            log_s = _project(_soft(s, c, temperature), s_plan)  # (n, E)
            log_t = _project(_soft(t_flat.index_select(0, pos), c, temperature), t_plan)
            return _divergence(log_t, log_s, divergence, beta)

    div = _by_chunks(
        rows, chunk, student_logits.reshape(B * T_s, V_s), flat_pos.reshape(B * T_s), counted.reshape(B * T_s)
    )
    return sample_mean(div.view(B, T_s) * temperature**2, counted, 1)


def _realised_log_probs(
    logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, temperature: float, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(logits[:, i-1] / τ)[ids[:, i]] of every token i: (lp (B, T), scored (B, T) bool where token
    i and its predecessor are real). The last position's logits are not read."""
    B, T, V = logits.shape
    real = mask != 0  # (B, T)
    prev = F.pad(real[:, :-1], (1, 0), value=False)  # (B, T) token i-1 is real
    scored = real & prev
    following = torch.where(scored, ids, 0).roll(-1, dims=1)  # (B, T) row i-1 reads the id of token i
    rows_used = scored.roll(-1, dims=1)  # (B, T) position i-1 predicts a scored token

    def rows(z, target, c):  # (n, V), (n,), (n,) -> (n,)
        return _soft(z, c, temperature).gather(-1, target[:, None])[:, 0]

    lp = _by_chunks(rows, chunk, logits.reshape(B * T, V), following.reshape(B * T), rows_used.reshape(B * T))
    return lp.view(B, T).roll(1, dims=1), scored  # (B, T): token i's log-prob at column i


def _chunk_sums(
    lp: torch.Tensor, scored: torch.Tensor, chunks: torch.Tensor, C: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ of the token log-probs per chunk (B, C) and whether every token of the chunk was scored (B, C)
    bool."""
    B = lp.shape[0]
    slot = torch.where(chunks >= 0, chunks, C)  # (B, T): chunk, or the discarded slot C
    total = lp.new_zeros(B, C + 1).scatter_add(1, slot, torch.where(scored, lp, 0.0))[:, :C]  # (B, C)
    members = torch.zeros(B, C + 1, dtype=torch.long, device=lp.device).scatter_add(
        1, slot, torch.ones_like(slot)
    )
    missing = torch.zeros_like(members).scatter_add(1, slot, (~scored).long())  # (B, C + 1)
    return total, ((members > 0) & (missing == 0))[:, :C]


def span_logit_kd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_ids: torch.Tensor,
    teacher_ids: torch.Tensor,
    student_mask: torch.Tensor,
    teacher_mask: torch.Tensor,
    student_chunks: torch.Tensor,
    teacher_chunks: torch.Tensor,
    *,
    temperature: float = 2.0,
    divergence: str = "forward",
    beta: float = 0.5,
    chunk: int = 0,
) -> torch.Tensor:
    """Logit distillation across tokenizers by the likelihood of exactly aligned text (B,): for every chunk of
    text that a run of student tokens and a run of teacher tokens both spell exactly, the probability each
    model gives to that text after the same prefix, by the chain rule

        log P(chunk) = Σ_{tokens i of the chunk} log softmax(logits[i - 1] / τ)[id_i],

    compared as two-outcome distributions (P, 1 - P) (the text continues with this chunk, or not) with the
    divergence of `logit_kd`, times τ², averaged over the sample's chunks. Both sides are probabilities of the
    same event whatever the tokenizers; what is lost is the rest of the distribution (how the mass that misses
    the chunk is spread).

    student_logits (B, T_s, V_s), teacher_logits (B, T_t, V_t); student_ids, student_mask (B, T_s) and
    teacher_ids, teacher_mask (B, T_t) the two tokenizations; student_chunks (B, T_s), teacher_chunks (B, T_t)
    the chunk of every token or -1 (`kvdistill.align.tokens.common_chunks`). A chunk counts where each of its
    tokens on both sides has a real predecessor (a sample's first token has no logits predicting it). chunk:
    positions per chunk of the log-softmax (memory, as `logit_kd`). Gradients flow into the student only.
    """
    _check_logits(student_logits, student_mask)
    check_dims(teacher_logits, 3, "teacher_logits", "(B, T_t, V_t)")
    B, T_s, _ = student_logits.shape
    T_t = teacher_logits.shape[1]
    for name, x, shape in (
        ("student_ids", student_ids, (B, T_s)),
        ("student_chunks", student_chunks, (B, T_s)),
        ("teacher_ids", teacher_ids, (B, T_t)),
        ("teacher_mask", teacher_mask, (B, T_t)),
        ("teacher_chunks", teacher_chunks, (B, T_t)),
    ):
        if shape_of(x) != shape:
            raise KvdistillError(
                f"{name} {shape_of(x)} does not match the logits' (B, T) {shape}",
                "pass the ids, mask and chunks of the tokenization the logits were computed on",
            )
    _check_kd(temperature, divergence, beta, chunk)
    C = int(max(student_chunks.max(), teacher_chunks.max(), -1)) + 1 if student_chunks.numel() else 0
    device = student_logits.device  # chunks may come from the CPU (counted there: no device synchronisation)
    student_chunks = student_chunks.to(device, non_blocking=True)
    teacher_chunks = teacher_chunks.to(teacher_logits.device, non_blocking=True)
    lp_s, scored_s = _realised_log_probs(student_logits, student_ids, student_mask, temperature, chunk)
    with torch.no_grad():
        lp_t, scored_t = _realised_log_probs(
            teacher_logits.detach(), teacher_ids, teacher_mask, temperature, chunk
        )
    S_s, ok_s = _chunk_sums(lp_s, scored_s, student_chunks, C)  # (B, C)
    S_t, ok_t = _chunk_sums(lp_t, scored_t, teacher_chunks, C)
    counted = ok_s & ok_t  # (B, C)

    def two_outcomes(S):  # (B, C) log P -> (B, C, 2) log (P, 1 - P); 1 - P floored where P rounds to 1
        S = torch.where(counted, S, -1.0).clamp(max=0.0)
        return torch.stack([S, torch.log(-torch.expm1(S.clamp(max=-1e-12)))], -1)

    div = _divergence(two_outcomes(S_t), two_outcomes(S_s), divergence, beta)  # (B, C)
    return sample_mean(div * temperature**2, counted, 1)
