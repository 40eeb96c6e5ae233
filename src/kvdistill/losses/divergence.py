"""What every logit KD term shares: the divergences, the rows computed a chunk at a time, the tail bucket.

Notation: n rows (positions, flattened), V vocabulary, E events (vocabulary entries or buckets).

Every logit KD function (`kvdistill.losses.logits`, `.cross_logits`, `.span_logits`) compares two
distributions per counted row (a student position) and reduces like the rest of the library: divergence · τ²,
averaged over the sample's counted rows, (B,).

Rows are computed `chunk` at a time (0: all at once). A chunk's float32 softmaxes live only while it is
computed: each chunk is recomputed in backward (torch.utils.checkpoint), and the student's logits are cut with
one `split` whose backward concatenates the chunks' gradients, so no (B, T, V) float32 copy exists beyond the
gradient itself (in the logits' own dtype). Chunked and unchunked runs do the same arithmetic per row: equal
values and gradients.
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from kvdistill.errors import KvdistillError
from kvdistill.losses.reduce import check_dims, check_mask

DIVERGENCES = ("forward", "reverse", "jsd")

TAIL_FLOOR = 1e-12
"""The tail bucket of a top-k teacher, max(1 - Σ top-k probabilities, TAIL_FLOOR): stored log-probabilities
may sum past 1 by rounding, and a tail of exactly 0 would make reverse KL infinite."""

_NEG_INF = -math.inf


def _kl_terms(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Σ_v p_v (log p_v - log q_v) over the last dim, with 0 where p_v = 0 (also where both are -inf)."""
    has_mass = log_p > _NEG_INF
    gap = torch.where(has_mass, log_p - log_q, torch.zeros((), device=log_p.device))  # no -inf - -inf = NaN
    return (log_p.exp() * gap).sum(-1)


def row_divergence(log_t: torch.Tensor, log_s: torch.Tensor, divergence: str, beta: float) -> torch.Tensor:
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


def check_kd(temperature: float, divergence: str, beta: float, chunk: int) -> None:
    """The options every logit KD term takes: τ > 0, a known divergence, 0 < β < 1 for jsd, chunk >= 0."""
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


def by_chunks(fn, chunk: int, *rows: torch.Tensor) -> torch.Tensor:
    """fn(*rows) (N,) computed `chunk` rows at a time; every tensor of `rows` has N rows along dim 0."""
    N = rows[0].shape[0]
    if chunk <= 0 or chunk >= N:
        return fn(*rows)
    parts = zip(*(x.split(chunk) for x in rows), strict=True)
    if not torch.is_grad_enabled():
        return torch.cat([fn(*p) for p in parts])
    return torch.cat([checkpoint(fn, *p, use_reentrant=False) for p in parts])


def soft_log_probs(logits: torch.Tensor, counted: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(logits / τ) in float32 (n, V); rows not counted are zeroed first (NaN there reaches
    nothing)."""
    return torch.log_softmax((logits.float() / temperature).masked_fill(~counted[:, None], 0.0), dim=-1)


def scatter_logsumexp(values: torch.Tensor, cols: torch.Tensor, size: int) -> torch.Tensor:
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


def safe_logsumexp(x: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim, -inf (with a zero gradient, not NaN) where every entry is -inf."""
    empty = (x == _NEG_INF).all(-1, keepdim=True)  # (..., 1)
    return torch.where(empty[..., 0], _NEG_INF, x.masked_fill(empty, 0.0).logsumexp(-1))


def with_tail(
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
    log_t = scatter_logsumexp(torch.where(named, t_log_probs, _NEG_INF), cols, E)  # (n, E)
    hit = log_t > _NEG_INF  # (n, E) columns the teacher gives mass
    t_tail = (1 - log_t.exp().sum(-1)).clamp(min=TAIL_FLOOR).log()  # (n,)
    s_tail = safe_logsumexp(log_s.masked_fill(hit, _NEG_INF))  # (n,)
    return (
        torch.cat([log_t, t_tail[:, None]], -1),
        torch.cat([log_s.masked_fill(~hit, _NEG_INF), s_tail[:, None]], -1),
    )


def check_logits(student_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The student's logits (B, T, V) and their mask (B, T): the counted positions (B, T) bool."""
    check_dims(student_logits, 3, "student_logits", "(B, T, V)")
    return check_mask(mask, tuple(student_logits.shape[:2]), "the logits' (B, T)")
