"""Which teacher tokens to keep in a compressed KV cache: full, right-crop, or R-KV (KaVa).

Notation: B batch, L layers, H KV heads (H_q query heads, g = H_q / H), T time, D head dim, M budget
(kept tokens per head). `mask` is (B, T) with 1 on real tokens and 0 on padding (left or right).
Leading group dims written `*G` may be (H,) for one layer or (L, H) for a stacked model.

Every selector returns `(idx, kept)`:
- `idx` (B, *G, M) long, time indices into the padded batch;
- `kept` (B, *G, M) bool, True where the slot holds a real token.
Slot order is fixed: the n = min(M, #real tokens) kept real tokens come first in increasing time, then the
slots that had no real token to hold (kept False): those point at the earliest padding positions, or at 0
when the row has no padding left (M > T). Their contents are meaningless and must be masked.

R-KV score, per (b, h) row over its real tokens t (see `rkv_scores`):
    I_t   = importance (attention that the answer tokens pay to t), min-max normalised to [0, 1]
    r_t   = mean over the other real tokens s != t of cos(k_t, k_s)     (redundancy)
    R_t   = 1 - minmax(r_t)                                             (non-redundancy, in [0, 1])
    score = lam * I_t + (1 - lam) * R_t,   lam = 0.1 by default         (padding: -inf)
The M highest scores are kept (ties go to the earlier token). A constant row normalises to 0, so a row with
one real token, or with all-equal importances, is decided by the other term alone; redundancies whose spread
is within rounding error (<= 1000 ulp, e.g. any row of two tokens, whose r are equal) count as constant.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from kvdistill.errors import KvdistillError

KINDS = ("full", "right_crop", "rkv")
SPANS = (
    "all",
    "cot",
)  # candidate tokens: every real token, or the record's chain of thought (a latent target)
SCORINGS = ("minmax", "kava", "rkv")  # rkv scores: kvdistill.compress.latent
DEFAULT_LAM = {
    "minmax": 0.1,
    "kava": 0.1,
    "rkv": 0.07,
}  # λ of each scoring when none is given (R-KV's own: 0.07)


def default_lam(scoring: str, lam: float | None) -> float:
    """`lam`, or the scoring's own default (DEFAULT_LAM) when it is None."""
    return DEFAULT_LAM.get(scoring, 0.1) if lam is None else lam


DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class Compression:
    """How a teacher's K/V is compressed before it is stored or used.

    kind: "full" (every real token), "right_crop" (the first `budget` real tokens), "rkv" (R-KV top-`budget`).
    budget: M, tokens kept per head; required for right_crop / rkv, must be None for full.
    lam: weight of importance in the R-KV score (rkv only); None: the scoring's default (DEFAULT_LAM: 0.1,
    R-KV's own scoring 0.07), resolved when the object is made.
    layers: teacher layers to keep (None = all).
    dtype: storage dtype of K and V.
    span: "all" (every real token may be kept) or "cot" (only the record's chain-of-thought tokens: the latent
    student's K/V target, `kvdistill.compress.latent`; `cap.candidates` marks them).
    scoring: rkv's score, "minmax" (the module docstring), "kava" or "rkv" (`kvdistill.compress.latent`);
    window: the observation window of scoring "rkv".
    """

    kind: str = "full"
    budget: int | None = None
    lam: float | None = None
    layers: list[int] | None = None
    dtype: str = "bfloat16"
    span: str = "all"
    scoring: str = "minmax"
    window: int = 8

    def __post_init__(self):
        if self.lam is None:
            object.__setattr__(self, "lam", default_lam(self.scoring, None))
        problems = []
        if self.span not in SPANS:
            problems.append(f"compression.span: {self.span!r} is not one of {list(SPANS)}")
        elif self.span == "cot" and self.kind not in ("right_crop", "rkv"):
            problems.append(
                f"compression.span: 'cot' keeps `budget` chain-of-thought tokens; kind {self.kind!r} "
                "keeps every token (use right_crop or rkv)"
            )
        if self.scoring not in SCORINGS:
            problems.append(f"compression.scoring: {self.scoring!r} is not one of {list(SCORINGS)}")
        elif self.scoring != "minmax" and self.kind != "rkv":
            problems.append(f"compression.scoring: {self.scoring!r} is read by kind 'rkv' only")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            problems.append(f"compression.window: {self.window!r} must be a positive integer")
        elif self.window != 8 and self.scoring != "rkv":
            problems.append("compression.window is read by scoring 'rkv' only")
        if self.kind not in KINDS:
            problems.append(f"compression.kind: {self.kind!r} is not one of {list(KINDS)}")
        if self.kind == "full" and self.budget is not None:
            problems.append(
                f"compression.budget: {self.budget!r} given with kind 'full', which keeps every token"
            )
        if self.kind in ("right_crop", "rkv") and (
            not isinstance(self.budget, int) or isinstance(self.budget, bool) or self.budget < 1
        ):
            problems.append(
                f"compression.budget: {self.budget!r} must be a positive integer for kind {self.kind!r}"
            )
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) or not 0.0 <= self.lam <= 1.0:
            problems.append(f"compression.lam: {self.lam!r} must be a number in [0, 1]")
        if self.layers is not None:
            bad = [x for x in self.layers if not isinstance(x, int) or isinstance(x, bool) or x < 0]
            if bad or not isinstance(self.layers, (list, tuple)):
                problems.append(
                    f"compression.layers: {self.layers!r} must be a list of non-negative layer indices"
                )
            elif len(set(self.layers)) != len(self.layers):
                problems.append(f"compression.layers: {list(self.layers)} lists a layer twice")
            elif not self.layers:
                problems.append("compression.layers: [] keeps no layer; use null for all layers")
        if self.dtype not in DTYPES:
            problems.append(f"compression.dtype: {self.dtype!r} is not one of {list(DTYPES)}")
        if problems:
            raise KvdistillError(
                f"invalid compression ({len(problems)} problem(s)):\n"
                + "\n".join(f"  - {p}" for p in problems),
                "e.g. Compression(kind='rkv', budget=128, lam=0.1, layers=None, dtype='bfloat16')",
            )
        if self.layers is not None:
            object.__setattr__(self, "layers", [int(x) for x in self.layers])

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def resolve_layers(self, num_layers: int) -> list[int]:
        """The stored layers for a teacher with `num_layers` layers; errors name the out-of-range ones."""
        if self.layers is None:
            return list(range(num_layers))
        bad = [x for x in self.layers if x >= num_layers]
        if bad:
            raise KvdistillError(
                f"compression.layers: {bad} out of range for a teacher with {num_layers} layers",
                f"use layer indices in [0, {num_layers - 1}] or null for all",
            )
        return list(self.layers)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Compression:
        if data is None:
            return cls()
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise KvdistillError(
                f"compression: unknown key(s) {unknown}", f"use only {sorted(cls.__dataclass_fields__)}"
            )
        return cls(**data)


# ----------------------------------------------------------------------------------------------------------
# selectors


def _check_mask(mask: torch.Tensor) -> torch.Tensor:
    if mask.dim() != 2:
        raise KvdistillError(f"mask must be (B, T), got shape {tuple(mask.shape)}", "pass the attention mask")
    return mask.bool()


def _check_budget(budget) -> int:
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise KvdistillError(
            f"budget {budget!r} must be a positive integer", "set compression.budget, e.g. 128"
        )
    return budget


def _order_kept(top: torch.Tensor, real: torch.Tensor, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Put chosen slots in canonical order and widen to `budget`.

    top (..., M') chosen time indices (M' <= T), real (..., M') whether each is a real token.
    Returns idx, kept (..., budget): real ones first in time order, then the others in time order.
    """
    key = top + (~real).long() * (1 << 40)  # (..., M'), distinct (a Python scalar: no host -> device copy)
    order = key.argsort(dim=-1)
    idx = top.gather(-1, order)
    kept = real.gather(-1, order)
    short = budget - idx.shape[-1]
    if short > 0:  # M > T: nothing left to point at, fill with index 0, never kept
        idx = torch.cat([idx, idx.new_zeros(*idx.shape[:-1], short)], dim=-1)
        kept = torch.cat([kept, kept.new_zeros(*kept.shape[:-1], short)], dim=-1)
    return idx, kept


def select_full(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every position: idx (B, T) = 0..T-1 in time order, kept (B, T) = mask (not reordered)."""
    mask = _check_mask(mask)
    B, T = mask.shape
    idx = torch.arange(T, device=mask.device).expand(B, T).clone()  # (B, T)
    return idx, mask.clone()


def right_crop(mask: torch.Tensor, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the first M real tokens of each sample (its beginning), cropping its right end.

    Works for left and right padding: the real tokens are counted from the first real one. Returns idx, kept
    (B, M) (the same for every head and layer), in the slot order described in the module docstring.
    """
    mask = _check_mask(mask)
    M = _check_budget(budget)
    B, T = mask.shape
    t = torch.arange(T, device=mask.device).expand(B, T)  # (B, T)
    key = t + (~mask).long() * T  # real tokens first, each group in time order
    top = key.argsort(dim=-1)[:, : min(M, T)]  # (B, M')
    return _order_kept(top, mask.gather(1, top), M)


def _minmax(x: torch.Tensor, real: torch.Tensor, tol: float = 0.0) -> torch.Tensor:
    """Min-max normalise x (..., T) over the real entries to [0, 1]; padding gives 0. A row whose span is
    <= tol counts as constant and gives 0 (so rounding noise is never stretched to [0, 1])."""
    lo = x.masked_fill(~real, float("inf")).amin(-1, keepdim=True)
    hi = x.masked_fill(~real, float("-inf")).amax(-1, keepdim=True)
    span = hi - lo
    ok = torch.isfinite(span) & (span > tol)
    out = torch.where(ok, (x - lo) / torch.where(ok, span, torch.ones_like(span)), torch.zeros_like(x))
    return out.masked_fill(~real, 0.0)


def key_redundancy(keys: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """r (B, *G, T): mean cosine similarity of each real key to the other real keys of its row; 0 on padding.

    keys (B, *G, T, D). Computed in O(T·D) as (k̂_t · Σ_s k̂_s - k̂_t · k̂_t) / (n - 1), k̂ = k / max(|k|, eps),
    n = real tokens in the sample (a lone token gets 0).
    """
    mask = _check_mask(mask)
    B, T = mask.shape
    if keys.shape[0] != B or keys.shape[-2] != T:
        raise KvdistillError(
            f"keys {tuple(keys.shape)} do not match mask {tuple(mask.shape)}",
            "keys must be (B, *G, T, D) with the mask's B and T",
        )
    work = torch.float64 if keys.dtype == torch.float64 else torch.float32
    k = keys.to(work)
    real = mask.view(B, *([1] * (keys.dim() - 3)), T).to(work)  # (B, 1.., T)
    # padding may hold anything, even non-finite values: zero it (unconditionally: asking first would sync)
    k = k.masked_fill(real.unsqueeze(-1) == 0, 0.0)
    norm = k.norm(dim=-1)  # (B, *G, T)
    inv = real / norm.clamp_min(eps)  # (B, *G, T), 1/|k| on real tokens, 0 on padding: k̂ = k · inv
    total = torch.einsum("...td,...t->...d", k, inv)  # (B, *G, D), Σ_s k̂_s over real s
    self_sim = (norm * inv) ** 2  # (B, *G, T), k̂_t · k̂_t (1, or 0 for a zero key)
    n = mask.sum(-1).view(B, *([1] * (keys.dim() - 2)))  # (B, 1.., 1)
    r = (torch.einsum("...td,...d->...t", k, total) * inv - self_sim) / (n - 1).clamp_min(1).to(work)
    return r * real


def not_finite_error() -> KvdistillError:
    """The error of an importance that is NaN or inf on a real token (raised by `rkv_scores` or a later
    check)."""
    return KvdistillError(
        "importance has NaN or inf on real tokens",
        "check the attention probabilities the importance came from",
    )


def importance_finite(importance: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """() bool on the importance's device: every entry of importance (B, *G, T) on a real token of mask (B, T)
    is finite. Computed without waiting for the device (a caller that checks it later passes
    check_finite=False)."""
    mask = _check_mask(mask)
    B, T = mask.shape
    real = mask.view(B, *([1] * (importance.dim() - 2)), T)  # (B, 1.., T)
    return (torch.isfinite(importance) | ~real).all()


def rkv_scores(
    keys: torch.Tensor,
    importance: torch.Tensor,
    mask: torch.Tensor,
    lam: float = 0.1,
    *,
    check_finite: bool = True,
) -> torch.Tensor:
    """score (B, *G, T) = lam·minmax(I) + (1 - lam)·(1 - minmax(r)) on real tokens, -inf on padding.
    check_finite: refuse non-finite importance on real tokens (reads a flag back from the device: a sync);
    False when the caller checks `importance_finite` itself."""
    mask = _check_mask(mask)
    if importance.shape != keys.shape[:-1]:
        raise KvdistillError(
            f"importance {tuple(importance.shape)} does not match keys {tuple(keys.shape)}",
            "importance must be keys.shape[:-1], i.e. (B, *G, T)",
        )
    B, T = mask.shape
    real = mask.view(B, *([1] * (keys.dim() - 3)), T).expand(importance.shape)  # (B, *G, T)
    work = torch.float64 if keys.dtype == torch.float64 else torch.float32
    imp = importance.to(work)
    if check_finite and not bool(importance_finite(imp, mask)):
        raise not_finite_error()
    i_norm = _minmax(imp, real)
    red = key_redundancy(keys, mask)  # cosines in [-1, 1]: spans within rounding error are ties
    r_norm = _minmax(red, real, tol=1e3 * torch.finfo(red.dtype).eps)
    score = lam * i_norm + (1.0 - lam) * (1.0 - r_norm)
    return score.masked_fill(~real, float("-inf"))


def rkv_select(
    keys: torch.Tensor,
    attn_importance: torch.Tensor,
    mask: torch.Tensor,
    budget: int,
    lam: float = 0.1,
    *,
    check_finite: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """R-KV selection of M tokens per head (score in the module docstring).

    keys (B, *G, T, D) pre-rotation keys, attn_importance (B, *G, T), mask (B, T); check_finite: see
    `rkv_scores`. Returns idx, kept (B, *G, M): the kept real tokens in increasing time, then the padding
    slots.
    """
    M = _check_budget(budget)
    score = rkv_scores(keys, attn_importance, mask, lam, check_finite=check_finite)  # (B, *G, T)
    T = score.shape[-1]
    order = score.sort(dim=-1, descending=True, stable=True).indices  # ties: earlier token first
    top = order[..., : min(M, T)]  # (B, *G, M')
    real = torch.isfinite(score.gather(-1, top))
    return _order_kept(top, real, M)


def _check_groups(num_heads: int, num_kv_heads: int, fix: str) -> None:
    """GQA: every KV head serves the same number of query heads."""
    if num_heads % num_kv_heads:
        raise KvdistillError(
            f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})", fix
        )


def importance_from_attention(
    attn_probs: torch.Tensor, query_mask: torch.Tensor, mask: torch.Tensor, num_kv_heads: int
) -> torch.Tensor:
    """I (B, H_kv, T): mean attention each key receives from the query rows (the answer tokens).

    attn_probs (B, H_q, T_query, T_key) with T_query = T_key = T; query_mask (B, T) marks the query rows (only
    real ones count); query heads are grouped to KV heads as in GQA (query head h reads KV head h // g,
    g = H_q / H_kv) and averaged over the group. Padding keys and rows without any query get 0.
    """
    mask = _check_mask(mask)
    B, H_q, T_q, T_k = attn_probs.shape
    if (B, T_k) != tuple(mask.shape) or T_q != T_k:
        raise KvdistillError(
            f"attention {tuple(attn_probs.shape)} does not match mask {tuple(mask.shape)}",
            "pass the (B, H_q, T, T) attention probabilities of the same batch",
        )
    _check_groups(H_q, num_kv_heads, "pass the teacher geometry's num_kv_heads")
    work = torch.float64 if attn_probs.dtype == torch.float64 else torch.float32
    rows = (query_mask.bool() & mask).to(work)  # (B, T)
    weight = rows / rows.sum(-1, keepdim=True).clamp_min(1.0)  # (B, T), each row's queries sum to 1
    received = torch.einsum("bhqt,bq->bht", attn_probs.to(work), weight)  # (B, H_q, T)
    g = H_q // num_kv_heads
    imp = received.view(B, num_kv_heads, g, T_k).mean(2)  # (B, H_kv, T)
    return imp * mask.unsqueeze(1)


def query_rows(query_mask: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The query rows of each sample: rows (B, Q) long time indices (in time order) and valid (B, Q) bool,
    with Q = the most rows any sample has; a sample with fewer is padded with row 0, valid False."""
    mask = _check_mask(mask)
    want = query_mask.bool() & mask  # (B, T)
    B, T = want.shape
    Q = max(int(want.sum(-1).max()), 1)
    t = torch.arange(T, device=mask.device).expand(B, T)
    key = t + (~want).long() * T  # query rows first, in time order
    rows = key.argsort(dim=-1)[:, :Q]  # (B, Q)
    valid = want.gather(1, rows)
    return rows.masked_fill(~valid, 0), valid


def importance_from_queries(
    q_rows: torch.Tensor,
    rows: torch.Tensor,
    valid: torch.Tensor,
    keys: torch.Tensor,
    mask: torch.Tensor,
    *,
    scaling: float,
    softcap: float | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """I (B, [L,] H_kv, T), equal to `importance_from_attention` of the eager probabilities, from the query
    rows only.

    q_rows (B, [L,] H_q, Q, D) rotated queries of the rows `rows` (B, Q) (valid (B, Q) marks real ones, see
    `query_rows`); keys (B, [L,] H_kv, T, D) rotated keys; mask (B, T). The optional L dim stacks layers that
    share the parameters below (each layer's result equals its own call). Per row, as the model's attention:
        p = softmax(softcap·tanh(q·kᵀ·scaling / softcap) + causal/padding/window mask)   (float32)
    with key t visible from row q when t is real, t <= q and (sliding layers) t > q - sliding_window.
    Memory O(B·L·H_q·Q·T), never T×T.
    """
    mask = _check_mask(mask)
    if q_rows.dim() not in (4, 5) or keys.dim() != q_rows.dim():
        raise KvdistillError(
            f"queries {tuple(q_rows.shape)} and keys {tuple(keys.shape)} must be (B, [L,] H, Q or T, D)",
            "pass q_rows (B, [L,] H_q, Q, D) and keys (B, [L,] H_kv, T, D)",
        )
    B, Q, D = q_rows.shape[0], q_rows.shape[-2], q_rows.shape[-1]
    lead = tuple(q_rows.shape[1:-3])  # () or (L,)
    H_q, H_kv, T = q_rows.shape[-3], keys.shape[-3], keys.shape[-2]
    if (
        tuple(keys.shape) != (B, *lead, H_kv, T, D)
        or tuple(mask.shape) != (B, T)
        or rows.shape != (B, Q)
        or valid.shape != (B, Q)
    ):
        raise KvdistillError(
            f"queries {tuple(q_rows.shape)}, rows {tuple(rows.shape)}, keys {tuple(keys.shape)} do not match "
            f"mask {tuple(mask.shape)}",
            "pass q_rows (B, [L,] H_q, Q, D), rows/valid (B, Q) from query_rows, keys (B, [L,] H_kv, T, D), "
            "mask (B, T)",
        )
    _check_groups(H_q, H_kv, "pass the teacher's queries and keys")
    work = torch.float64 if q_rows.dtype == torch.float64 else torch.float32
    g = H_q // H_kv
    q = q_rows.to(work).view(B, *lead, H_kv, g * Q, D)  # (B, [L,] H_kv, g·Q, D), query head h: kv head h // g
    k = keys.to(work)
    # the products and the row mean below run one layer at a time: their kernels depend on the batch shape,
    # and a stacked layer must equal its own call bit for bit (the elementwise steps are stacked)
    logits = _per_layer(lambda q, k: torch.matmul(q, k.transpose(-1, -2)), lead, q, k) * scaling
    # (B, [L,] H_kv, g·Q, T)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    t = torch.arange(T, device=mask.device)
    visible = mask[:, None, :] & (t[None, None, :] <= rows[:, :, None])  # (B, Q, T)
    if sliding_window is not None:
        visible &= t[None, None, :] > rows[:, :, None] - sliding_window
    visible |= ~valid[:, :, None]  # filler rows: any finite row, weighted 0 below
    hidden = ~visible.view(B, *([1] * len(lead)), 1, 1, Q, T)  # (B, [1,] 1, 1, Q, T)
    logits = logits.view(B, *lead, H_kv, g, Q, T).masked_fill(hidden, float("-inf"))
    probs = logits.softmax(-1)  # (B, [L,] H_kv, g, Q, T); every row sees at least one key
    weight = valid.to(work) / valid.sum(-1, keepdim=True).clamp_min(1).to(work)  # (B, Q), rows sum to 1
    imp = _per_layer(lambda p, w: torch.einsum("bhgqt,bq->bht", p, w), lead, probs, weight)  # (B, [L,] H, T)
    return imp / g * mask.view(B, *([1] * len(lead)), 1, T)  # mean over the group


def _per_layer(fn, lead: tuple[int, ...], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """fn(x, y) for x (B, [L,] ...), one call per layer of the optional L dim (y too when it has one), stacked
    back over dim 1."""
    if not lead:
        return fn(x, y)
    layered = y.dim() == x.dim()
    return torch.stack([fn(x[:, n], y[:, n] if layered else y) for n in range(lead[0])], 1)


# ----------------------------------------------------------------------------------------------------------
# gathering


def gather_kv(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, *G, T, D), idx (B, *G, M) or (B, M) shared over *G -> (B, *G, M, D)."""
    if idx.dim() == 2 and x.dim() > 3:
        idx = idx.view(idx.shape[0], *([1] * (x.dim() - 3)), idx.shape[1]).expand(*x.shape[:-2], idx.shape[1])
    return x.gather(-2, idx.unsqueeze(-1).expand(*idx.shape, x.shape[-1]))


def gather_spans(spans: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """spans (B, T, 2) per token, idx (B, *G, M) -> (B, *G, M, 2)."""
    B, T, _ = spans.shape
    G = idx.shape[1:-1]
    src = spans.view(B, *([1] * len(G)), T, 2).expand(B, *G, T, 2)
    return src.gather(-2, idx.unsqueeze(-1).expand(*idx.shape, 2))


def select(
    compression: Compression,
    mask: torch.Tensor,
    keys: torch.Tensor | None = None,
    importance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch on `compression.kind`; rkv needs keys (B, *G, T, D) and importance (B, *G, T)."""
    if compression.kind == "full":
        return select_full(mask)
    if compression.kind == "right_crop":
        return right_crop(mask, compression.budget)
    if keys is None or importance is None:
        raise KvdistillError(
            "rkv selection needs the keys and the attention importance",
            "capture the teacher with attentions=True (eager attention)",
        )
    return rkv_select(keys, importance, mask, compression.budget, compression.lam)
