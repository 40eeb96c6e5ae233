"""Token alignment between two tokenizations of the same text, from their UTF-8 byte spans.

Notation:
    B    batch
    T_s  student tokens (rows of an alignment)
    T_t  teacher tokens (columns of an alignment)
    H    heads, D head dim (of the teacher tensor being resampled)

A span is a UTF-8 byte interval [start, end) of the text. `kvdistill.models.capture.tokenize` returns them as
`offset_mapping`, made by `kvdistill.align.bytes.byte_spans` from the fast tokenizer's character offsets.
Bytes, not characters: a byte-level BPE splits a character it has no token for into several tokens that all
report that character's span (SmolLM2's '東京' is 'æĿ' '±' 'äº' '¬' at characters (0,1) (0,1) (1,2) (1,2),
bytes (0,2) (2,3) (3,5) (5,6)), so on characters a tokenization aligned with itself mixes those tokens, on
bytes it is the identity. On ASCII text byte spans equal character spans. The functions here take any
integer intervals; both sides must use the same unit.

Entry (i, j) of an alignment is the IoU of student span i and teacher span j, |overlap| / |union| of the
two intervals, and each row is then normalised to sum to 1. A row with no overlap at all (a special token
with an empty span start == end such as BOS/EOS/CLS/pad, or a token cut away from the other side by
truncation) is all zero. Empty spans never overlap anything.

Spans need not be sorted or disjoint: truncation or post-processing can leave them out of order, and the
fallback of `byte_spans` can overlap. The overlaps are found by a sweep over the teacher spans sorted by
start (searchsorted on the starts and on the running max of the ends), so the cost is
O((T_s + T_t) log T_t + nnz) for tokenizer spans, never a dense T_s x T_t pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvdistill.errors import KvdistillError

__all__ = [
    "token_alignment",
    "batch_token_alignment",
    "batch_token_alignment_sparse",
    "resample_rows",
    "align_to_student",
    "prefix_positions",
    "common_chunks",
    "teacher_alignment",
    "teacher_alignment_sparse",
]

SpansLike = torch.Tensor | Sequence[Sequence[int]]


# ------------------------------------------------------------------------------------------ validation
def _as_spans(spans: SpansLike, name: str, batched: bool = False) -> torch.Tensor:
    """Spans as an int64 tensor, (T, 2) or (B, T, 2) when `batched`; raises on bad shapes or values."""
    want = "(B, T, 2)" if batched else "(T, 2)"
    try:
        tensor = torch.as_tensor(spans)
    except (TypeError, ValueError, RuntimeError) as err:
        raise KvdistillError(
            f"{name} could not be read as a {want} tensor of byte offsets: {err}",
            "pass a tensor or a nested list of [start, end) integer pairs (the offset_mapping of "
            "kvdistill.models.capture.tokenize)",
        ) from None
    if tensor.numel() == 0 and not batched and tensor.dim() <= 1:
        tensor = tensor.reshape(0, 2)  # an empty list means no tokens
    if tensor.dim() != (3 if batched else 2) or tensor.shape[-1] != 2:
        raise KvdistillError(
            f"{name} has shape {tuple(tensor.shape)}, expected {want} [start, end) byte offsets",
            f"pass {'the batch' if batched else 'one text'}'s offset_mapping {want} "
            "from kvdistill.models.capture.tokenize (UTF-8 byte spans)",
        )
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        if tensor.is_floating_point() and bool((tensor == tensor.round()).all()):
            tensor = tensor.long()
        else:
            raise KvdistillError(
                f"{name} has dtype {tensor.dtype} with non-integer values, expected integer byte offsets",
                "pass tokenize's offset_mapping unchanged (integers)",
            )
    tensor = tensor.long()
    if tensor.numel() == 0:
        return tensor
    negative = (tensor < 0).any(dim=-1)  # (..., T)
    if bool(negative.any()):
        at = tuple(int(i) for i in negative.nonzero()[0])
        raise KvdistillError(
            f"{name}[{', '.join(map(str, at))}] = {tensor[at].tolist()} is negative; offsets must be >= 0",
            "pass byte offsets into the text (tokenize's offset_mapping), not ids or -1 padding",
        )
    reversed_ = tensor[..., 0] > tensor[..., 1]  # (..., T)
    if bool(reversed_.any()):
        at = tuple(int(i) for i in reversed_.nonzero()[0])
        start, end = tensor[at].tolist()
        raise KvdistillError(
            f"{name}[{', '.join(map(str, at))}] = [{start}, {end}] has start {start} > end {end}",
            "spans are [start, end) with start <= end; an empty span (start == end) marks a special token",
        )
    return tensor


def _as_mask(mask, name: str, shape: tuple[int, int], spans_name: str, device) -> torch.Tensor:
    """A (B, T) mask as bool on `device`; raises if it does not match its spans' (B, T)."""
    mask = torch.as_tensor(mask, device=device)
    if tuple(mask.shape) != shape:
        raise KvdistillError(
            f"{name} has shape {tuple(mask.shape)} but {spans_name} has (B, T) = {shape}",
            f"pass the attention mask of the same batch as {spans_name}",
        )
    return mask != 0


# ------------------------------------------------------------------------------------------ the sweep
def _overlaps(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every overlapping (student, teacher) pair and its IoU.

    student (T_s, 2), teacher (T_t, 2) int64 -> rows (nnz,), cols (nnz,) int64, iou (nnz,) float64.
    Rows come out ascending; empty spans take part in no pair.
    """
    device = student.device
    none = torch.zeros(0, dtype=torch.long, device=device)
    t_keep = (teacher[:, 1] > teacher[:, 0]).nonzero().flatten()  # (T_t',) non-empty teacher spans
    if t_keep.numel() == 0 or student.shape[0] == 0:
        return none, none, torch.zeros(0, dtype=torch.float64, device=device)
    t_start, order = teacher[t_keep, 0].sort(stable=True)  # (T_t',) ascending starts
    t_index = t_keep[order]  # (T_t',) original teacher index of each sorted span
    t_end = teacher[t_index, 1]  # (T_t',)
    t_reach = t_end.cummax(dim=0).values  # (T_t',) running max of the ends: non-decreasing

    s_start, s_end = student[:, 0].contiguous(), student[:, 1].contiguous()  # (T_s,)
    # Teacher j overlaps student i iff t_start[j] < s_end[i] and t_end[j] > s_start[i].
    hi = torch.searchsorted(t_start, s_end, side="left")  # (T_s,) sorted spans [0, hi) start before s_end
    lo = torch.searchsorted(t_reach, s_start, side="right")  # (T_s,) spans before lo all end <= s_start
    count = (hi - lo).clamp(min=0) * (s_end > s_start)  # (T_s,) candidates per student span
    rows = torch.repeat_interleave(torch.arange(student.shape[0], device=device), count)  # (n_cand,)
    first = torch.cumsum(count, 0) - count  # (T_s,) where each row's candidates begin
    sorted_j = lo[rows] + torch.arange(rows.numel(), device=device) - first[rows]  # (n_cand,)
    # [lo, hi) is a superset: a span nested inside an earlier, longer one can still end before s_start.
    a0, a1 = s_start[rows], s_end[rows]  # (n_cand,)
    b0, b1 = t_start[sorted_j], t_end[sorted_j]  # (n_cand,)
    inter = torch.minimum(a1, b1) - torch.maximum(a0, b0)  # (n_cand,)
    hit = inter > 0
    rows, sorted_j, inter = rows[hit], sorted_j[hit], inter[hit]  # (nnz,)
    union = (a1 - a0)[hit] + (b1 - b0)[hit] - inter  # (nnz,)
    return rows, t_index[sorted_j], inter.double() / union.double()


def _row_normalise(rows: torch.Tensor, iou: torch.Tensor, num_rows: int) -> torch.Tensor:
    """iou (nnz,) divided by the sum of its row; rows (nnz,) in [0, num_rows)."""
    row_sum = torch.zeros(num_rows, dtype=iou.dtype, device=iou.device)  # (num_rows,)
    row_sum.index_add_(0, rows, iou)
    return iou / row_sum[rows]


# ------------------------------------------------------------------------------------------ public API
def token_alignment(student_spans: SpansLike, teacher_spans: SpansLike) -> torch.Tensor:
    """Row-normalised IoU alignment between the student's and the teacher's tokens of one text.

    student_spans (T_s, 2), teacher_spans (T_t, 2): UTF-8 byte [start, end) offsets (tensors or lists).
    Returns a coalesced sparse COO float32 tensor (T_s, T_t) on the spans' device; each row sums to 1,
    or is all zero when the student token overlaps no teacher token (empty span, truncated away).
    """
    student = _as_spans(student_spans, "student_spans")  # (T_s, 2)
    teacher = _as_spans(teacher_spans, "teacher_spans").to(student.device)  # (T_t, 2)
    T_s, T_t = student.shape[0], teacher.shape[0]
    rows, cols, iou = _overlaps(student, teacher)  # (nnz,) each
    weights = _row_normalise(rows, iou, T_s).float()  # (nnz,)
    indices = torch.stack([rows, cols])  # (2, nnz)
    # indices are in range by construction, so the (slow) invariant check is skipped
    return torch.sparse_coo_tensor(indices, weights, (T_s, T_t), check_invariants=False).coalesce()


def _batch_overlaps(student_spans, student_mask, teacher_spans, teacher_mask):
    """Overlapping pairs of a padded batch: (rows, cols, weights (nnz,), B, T_s, T_t).

    rows index the flattened (B·T_s) student tokens (ascending), cols the flattened (B·T_t) teacher tokens,
    weights are the row-normalised IoU in float32.
    """
    student = _as_spans(student_spans, "student_spans", batched=True)  # (B, T_s, 2)
    teacher = _as_spans(teacher_spans, "teacher_spans", batched=True).to(student.device)  # (B, T_t, 2)
    B, T_s, _ = student.shape
    T_t = teacher.shape[1]
    if teacher.shape[0] != B:
        raise KvdistillError(
            f"batch size mismatch: student_spans {tuple(student.shape)} has B = {B}, "
            f"teacher_spans {tuple(teacher.shape)} has B = {teacher.shape[0]}",
            "align the student's and the teacher's tokenizations of the same batch of texts",
        )
    s_mask = _as_mask(student_mask, "student_mask", (B, T_s), "student_spans", student.device)  # (B, T_s)
    t_mask = _as_mask(teacher_mask, "teacher_mask", (B, T_t), "teacher_spans", student.device)  # (B, T_t)
    # Padding becomes an empty span; each sample is shifted into its own byte range so that one
    # sweep over the flattened batch cannot pair tokens of different samples.
    student = student * s_mask[..., None]  # (B, T_s, 2)
    teacher = teacher * t_mask[..., None]  # (B, T_t, 2)
    stride = int(max(student.max(), teacher.max())) + 1 if student.numel() and teacher.numel() else 1
    shift = torch.arange(B, device=student.device)[:, None, None] * stride  # (B, 1, 1)
    flat_s = (student + shift).reshape(B * T_s, 2)  # (B*T_s, 2)
    flat_t = (teacher + shift).reshape(B * T_t, 2)  # (B*T_t, 2)
    rows, cols, iou = _overlaps(flat_s, flat_t)  # (nnz,) each
    weights = _row_normalise(rows, iou, B * T_s).float()  # (nnz,)
    return rows, cols, weights, B, T_s, T_t


def batch_token_alignment(student_spans, student_mask, teacher_spans, teacher_mask) -> torch.Tensor:
    """Token alignment of a padded batch, as one dense tensor.

    student_spans (B, T_s, 2), student_mask (B, T_s), teacher_spans (B, T_t, 2), teacher_mask (B, T_t);
    masks are 1 (or True) for real tokens, 0 for padding. Returns dense float32 (B, T_s, T_t) where
    [b] is `token_alignment` of sample b restricted to its real tokens, and padding rows/columns are zero.
    """
    rows, cols, weights, B, T_s, T_t = _batch_overlaps(
        student_spans, student_mask, teacher_spans, teacher_mask
    )
    out = torch.zeros(B, T_s, T_t, dtype=torch.float32, device=rows.device)
    out[rows // T_s, rows % T_s, cols % T_t] = weights
    return out


def batch_token_alignment_sparse(
    student_spans, student_mask, teacher_spans, teacher_mask
) -> tuple[torch.Tensor, torch.Tensor]:
    """The alignment of `batch_token_alignment` as K nonzeros per row: index, weight (B, T_s, K).

    Row i of sample b is Σ_k weight[b, i, k] · e(index[b, i, k]) over teacher tokens (K = the most teacher
    tokens any student token overlaps, at least 1); unused slots have weight 0 and index 0. A token alignment
    is very sparse (a token overlaps 1-3 tokens of the other side), so `resample_rows` with this form costs
    O(T_s·K) instead of the dense O(T_s·T_t).
    """
    rows, cols, weights, B, T_s, T_t = _batch_overlaps(
        student_spans, student_mask, teacher_spans, teacher_mask
    )
    count = torch.bincount(rows, minlength=B * T_s)  # (B·T_s,) nonzeros per row
    K = max(int(count.max()), 1) if count.numel() else 1
    first = torch.cumsum(count, 0) - count  # (B·T_s,) where each row's nonzeros begin (rows are ascending)
    slot = torch.arange(rows.numel(), device=rows.device) - first[rows]  # (nnz,) position within its row
    index = torch.zeros(B * T_s, K, dtype=torch.long, device=rows.device)
    weight = torch.zeros(B * T_s, K, dtype=torch.float32, device=rows.device)
    index[rows, slot] = cols % T_t
    weight[rows, slot] = weights
    return index.view(B, T_s, K), weight.view(B, T_s, K)


def resample_rows(x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Σ_k weight · x at index along the token dim: the sparse form of einsum("...mt,...tf->...mf", A, x).

    x (..., T, F); index, weight (..., M, K) from `batch_token_alignment_sparse` (rows: the M tokens resampled
    onto), their leading dims broadcastable to x's (e.g. x (2, B, H, T, D) with index (B, H, M, K), or x
    (B, H, T, D) with index (B, 1, M, K)) -> (..., M, F), computed in x's dtype.
    """
    *lead, T, F = x.shape
    M, K = index.shape[-2:]
    flat = index.reshape(*index.shape[:-2], M * K, 1).expand(*lead, M * K, F)  # (..., M·K, F)
    picked = x.gather(-2, flat).view(*lead, M, K, F)  # (..., M, K, F)
    w = weight.to(x.dtype)[..., None]  # (..., M, K, 1)
    if K == 1:
        return picked[..., 0, :] * w[..., 0, :]
    return (picked * w).sum(-2)  # (..., M, F)


def align_to_student(teacher_tensor: torch.Tensor, alignment: torch.Tensor) -> torch.Tensor:
    """Resample a teacher tensor onto the student's tokens.

    teacher_tensor (B, H, T_t, D) (e.g. teacher keys or values), alignment (B, T_s, T_t) from
    `batch_token_alignment` -> (B, H, T_s, D): each student token gets the alignment-weighted mix of the
    teacher tokens it overlaps (zero where its row is zero). Computed in the teacher tensor's dtype.
    """
    if teacher_tensor.dim() != 4 or alignment.dim() != 3:
        raise KvdistillError(
            f"teacher_tensor has shape {tuple(teacher_tensor.shape)} and alignment {tuple(alignment.shape)}; "
            "expected (B, H, T_t, D) and (B, T_s, T_t)",
            "pass per-layer K or V (B, H, T_t, D) and a dense alignment from batch_token_alignment",
        )
    B, H, T_t, D = teacher_tensor.shape
    if alignment.shape[0] != B or alignment.shape[2] != T_t:
        raise KvdistillError(
            f"alignment {tuple(alignment.shape)} does not match teacher_tensor "
            f"{tuple(teacher_tensor.shape)}: "
            f"need alignment (B={B}, T_s, T_t={T_t})",
            "build the alignment from the same batch and teacher tokenization as the teacher tensor",
        )
    if alignment.is_sparse:
        alignment = alignment.to_dense()
    alignment = alignment.to(device=teacher_tensor.device, dtype=teacher_tensor.dtype)  # (B, T_s, T_t)
    return torch.einsum("bst,bhtd->bhsd", alignment, teacher_tensor)  # (B, H, T_s, D)


def _prefix_keys(spans: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position (B, T): the bytes read so far (the furthest end of the real non-empty spans up to it) and
    the number of real empty-span tokens (special tokens) since the last non-empty one (0 on a non-empty
    token)."""
    B, T = mask.shape
    nonempty = (spans[..., 1] > spans[..., 0]) & mask  # (B, T)
    read = torch.where(nonempty, spans[..., 1], 0).cummax(dim=1).values  # (B, T)
    pos = torch.arange(T, device=spans.device).expand(B, T)  # (B, T)
    last = torch.where(nonempty, pos, -1).cummax(dim=1).values  # (B, T) the last non-empty token up to each
    return read, pos - last


def _checked_pair(student_spans, student_mask, teacher_spans, teacher_mask):
    """Two batched tokenizations of the same texts, checked: spans (B, T_s, 2), mask (B, T_s), spans (B, T_t,
    2), mask (B, T_t), on the student's device."""
    student = _as_spans(student_spans, "student_spans", batched=True)  # (B, T_s, 2)
    teacher = _as_spans(teacher_spans, "teacher_spans", batched=True).to(student.device)  # (B, T_t, 2)
    B, T_s, _ = student.shape
    T_t = teacher.shape[1]
    if teacher.shape[0] != B:
        raise KvdistillError(
            f"batch size mismatch: student_spans {tuple(student.shape)} has B = {B}, "
            f"teacher_spans {tuple(teacher.shape)} has B = {teacher.shape[0]}",
            "pair the student's and the teacher's tokenizations of the same batch of texts",
        )
    s_mask = _as_mask(student_mask, "student_mask", (B, T_s), "student_spans", student.device)  # (B, T_s)
    t_mask = _as_mask(teacher_mask, "teacher_mask", (B, T_t), "teacher_spans", student.device)  # (B, T_t)
    return student, s_mask, teacher, t_mask


def prefix_positions(student_spans, student_mask, teacher_spans, teacher_mask) -> torch.Tensor:
    """The teacher position that has read the same text as each student position: (B, T_s) long, -1 where
    none.

    student_spans (B, T_s, 2), student_mask (B, T_s), teacher_spans (B, T_t, 2), teacher_mask (B, T_t) as in
    `batch_token_alignment`. Student position i and teacher position j are partners when both have read the
    same bytes [0, e) of the text (e: the furthest end of their non-empty spans so far) and the same number of
    special (empty-span) tokens since their last non-empty one: their next-token distributions then predict
    the same continuation of the same prefix. One tokenization paired with itself gives every real position
    itself. Where several teacher positions qualify (only overlapping fallback spans do that) the last one is
    taken; padding positions get -1.
    """
    student, s_mask, teacher, t_mask = _checked_pair(student_spans, student_mask, teacher_spans, teacher_mask)
    B, T_s, _ = student.shape
    T_t = teacher.shape[1]
    s_read, s_extra = _prefix_keys(student, s_mask)  # (B, T_s) each
    t_read, t_extra = _prefix_keys(teacher, t_mask)  # (B, T_t) each
    width = max(T_s, T_t) + 1  # extra < width
    stride = (int(max(s_read.max(), t_read.max())) + 1 if s_read.numel() and t_read.numel() else 1) * width
    batch = torch.arange(B, device=student.device)[:, None] * stride  # (B, 1): samples in disjoint key ranges
    s_key = torch.where(s_mask, batch + s_read * width + s_extra, -1)  # (B, T_s)
    t_key = torch.where(t_mask, batch + t_read * width + t_extra, -2).flatten()  # (B·T_t,)
    t_sorted, order = t_key.sort(stable=True)  # equal keys keep their token order
    at = (
        torch.searchsorted(t_sorted, s_key.flatten(), right=True) - 1
    )  # (B·T_s,) the last key <= the student's
    hit = (at >= 0) & (t_sorted[at.clamp(min=0)] == s_key.flatten()) & s_mask.flatten()
    return torch.where(hit, order[at.clamp(min=0)] % max(T_t, 1), -1).view(B, T_s)


def common_chunks(
    student_spans, student_mask, teacher_spans, teacher_mask
) -> tuple[torch.Tensor, torch.Tensor]:
    """The text cut at every byte offset where both tokenizations end a token: per token the chunk it belongs
    to, student (B, T_s) and teacher (B, T_t) long, numbered 0, 1, ... from the start of each sample, -1 for
    none.

    Inputs as `prefix_positions`. A real non-empty token belongs to chunk c when the c-th common boundary
    (counting from 0) is the first at or after the bytes it has read (the furthest end so far), so chunk c
    holds, on each side, exactly the tokens that spell the bytes between common boundaries c - 1 and c: a run
    of student tokens and a run of teacher tokens covering the same bytes. Special (empty-span) tokens,
    padding and the tokens past the last common boundary (cut by truncation on the other side) get -1.
    """
    student, s_mask, teacher, t_mask = _checked_pair(student_spans, student_mask, teacher_spans, teacher_mask)
    B = student.shape[0]
    s_real = (student[..., 1] > student[..., 0]) & s_mask  # (B, T_s) non-empty tokens
    t_real = (teacher[..., 1] > teacher[..., 0]) & t_mask  # (B, T_t)
    s_read, t_read = _prefix_keys(student, s_mask)[0], _prefix_keys(teacher, t_mask)[0]  # (B, T_s), (B, T_t)
    stride = int(max(s_read.max(), t_read.max())) + 2 if s_read.numel() and t_read.numel() else 2
    base = torch.arange(B, device=student.device)[:, None] * stride  # (B, 1): samples in disjoint key ranges
    s_key, t_key = base + s_read, base + t_read  # (B, T_s), (B, T_t)
    bounds = s_key[s_real & torch.isin(s_key, t_key[t_real])].unique()  # (N_c,) sorted common boundaries
    if bounds.numel() == 0:
        return torch.full_like(s_key, -1), torch.full_like(t_key, -1)
    first = torch.searchsorted(bounds, base.flatten())  # (B,) each sample's first boundary

    def chunk_of(key: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        at = torch.searchsorted(bounds, key)  # (B, T) the first boundary at or after the bytes read
        same_sample = bounds[at.clamp(max=bounds.numel() - 1)] // stride == base // stride  # (B, T)
        return torch.where(real & (at < bounds.numel()) & same_sample, at - first[:, None], -1)

    return chunk_of(s_key, s_real), chunk_of(t_key, t_real)


def teacher_alignment(
    spans_t: torch.Tensor, mask_t: torch.Tensor, spans_s: torch.Tensor, mask_s: torch.Tensor
) -> torch.Tensor:
    """Dense alignment, rows = teacher tokens normalised over the student tokens they overlap.

    spans_t (B, M, 2) / mask_t (B, M) -> (B, M, T_s); per head (B, H, M, 2) / (B, H, M) -> (B, H, M, T_s).
    """
    if spans_t.dim() == 3:
        return batch_token_alignment(spans_t, mask_t, spans_s, mask_s)
    B, H, M, _ = spans_t.shape
    flat = batch_token_alignment(
        spans_t.reshape(B * H, M, 2),
        mask_t.reshape(B * H, M),
        spans_s.repeat_interleave(H, 0),
        mask_s.repeat_interleave(H, 0),
    )
    return flat.view(B, H, M, spans_s.shape[1])


def teacher_alignment_sparse(
    spans_t: torch.Tensor, mask_t: torch.Tensor, spans_s: torch.Tensor, mask_s: torch.Tensor, *, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """`teacher_alignment` as index, weight (B, H|1, M, K) for `resample_rows`, built on the CPU (the spans
    are small and the sweep is many tiny ops) and moved to `device` once; pass CPU spans and masks."""
    spans_t, mask_t, spans_s, mask_s = spans_t.cpu(), mask_t.cpu(), spans_s.cpu(), mask_s.cpu()
    if spans_t.dim() == 3:
        index, weight = batch_token_alignment_sparse(spans_t, mask_t, spans_s, mask_s)  # (B, M, K)
        return index[:, None].to(device, non_blocking=True), weight[:, None].to(device, non_blocking=True)
    B, H, M, _ = spans_t.shape
    index, weight = batch_token_alignment_sparse(
        spans_t.reshape(B * H, M, 2),
        mask_t.reshape(B * H, M),
        spans_s.repeat_interleave(H, 0),
        mask_s.repeat_interleave(H, 0),
    )
    K = index.shape[-1]
    return (
        index.view(B, H, M, K).to(device, non_blocking=True),
        weight.view(B, H, M, K).to(device, non_blocking=True),
    )
