"""The KV probe 1 - R² per layer of a student against a teacher on held-out records (the held-out CE is
`kvdistill.eval.heldout`, exact match `kvdistill.eval.decode`).

Two held-out K/V figures, with two names (docs/architecture.md, "What the K/V figures mean"):
- **KV error** (`eval/kv_error/<teacher>`): the run's own trained maps on held-out data, `Objective.evaluate`
  through the same loss-space code and `kvdistill.losses.kv_error` that training runs: per sample the mean
  squared error of the student's K/V mapped into the teacher's geometry, divided by the variance of that
  sample's teacher K/V values; averaged over keys and values, samples and mapped layers.
- **KV probe 1 - R²** (`probe_kv_error`): a fresh ridge-regression map from the student's K/V to each
teacher's,
  fitted on a fit split and scored as 1 - R² (per feature centred) on held-out samples. It needs no trained
  maps, so a CE-only student and a distilled student are compared on equal terms: how much of the teacher's
  K/V is linearly readable from the student's. It is not on the KV error's scale.

Notation: B batch, T_s/T_t student/teacher tokens, H heads, D head dim, L_s/L_t layers, V vocab,
N rows (covered teacher tokens) of a probe's design matrix, F_s/F_t flattened K or V features (H·D).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from kvdistill.align.layers import layer_map
from kvdistill.align.tokens import teacher_alignment
from kvdistill.eval.decode import batches
from kvdistill.models.capture import capture_kv
from kvdistill.models.geometry import geometry_of


def _shown(desc) -> bool | None:
    """tqdm's `disable`: True without a description, else None (shown where stderr is a terminal)."""
    return True if not desc else None


class TeacherRows:
    """One teacher's side of the KV probe on a list of records, captured once and reused for every student.

    The records are cut into batches of `batch_size` as the student's side cuts them. Per batch: the teacher's
    character spans (B, T_t, 2) and attention mask (B, T_t), and for each kept teacher layer j its K and V
    rows at real tokens, (N_b, H_t·D_t) in the model's dtype with N_b = mask.sum(), in (b, t) order.
    Everything is on the CPU; only the teacher layers asked for are kept (those a student maps to).
    """

    def __init__(self, teacher, t_tok, records, *, max_length: int, batch_size: int, layers, desc=None):
        self.texts = tuple(r["text"] for r in records)
        self.max_length, self.batch_size = max_length, batch_size
        self.layers = sorted(set(layers))
        self.spans: list[torch.Tensor] = []  # per batch (B, T_t, 2)
        self.masks: list[torch.Tensor] = []  # per batch (B, T_t)
        self.keys: dict[int, list[torch.Tensor]] = {j: [] for j in self.layers}  # per batch (N_b, H_t·D_t)
        self.values: dict[int, list[torch.Tensor]] = {j: [] for j in self.layers}
        for texts in batches(list(self.texts), batch_size, desc):
            t = capture_kv(teacher, t_tok, texts, max_length=max_length, padding_side="right")
            real = t.attention_mask_cpu.bool()  # (B, T_t)
            self.spans.append(t.spans_cpu)
            self.masks.append(t.attention_mask_cpu)
            for j in self.layers:
                for src, store in ((t.keys[j], self.keys), (t.values[j], self.values)):
                    rows = src.transpose(1, 2).flatten(2).cpu()  # (B, H_t, T_t, D_t) -> (B, T_t, H_t·D_t)
                    store[j].append(rows[real])  # (N_b, H_t·D_t)

    def covers(self, records, *, max_length: int, batch_size: int, layers) -> bool:
        """Whether these rows serve a probe on `records` with these settings and teacher layers."""
        return (
            (self.max_length, self.batch_size) == (max_length, batch_size)
            and self.texts == tuple(r["text"] for r in records)
            and set(layers) <= set(self.layers)
        )


class TeacherRowsCache:
    """TeacherRows by (teacher, tokenizer, records, max_length, batch_size): pass one to `probe_kv_error` (or
    `evaluate_student`) for several students, and each teacher runs once per record list.

    An entry asked for teacher layers it lacks is captured again with the union of both layer sets. The cache
    holds the teachers it has seen (their ids are its keys); drop it when the evaluation is done.
    """

    def __init__(self):
        self._rows: dict[tuple, tuple[object, object, TeacherRows]] = {}

    def rows(
        self, teacher, t_tok, records, *, max_length: int, batch_size: int, layers, desc=None
    ) -> TeacherRows:
        key = (id(teacher), id(t_tok), tuple(r["text"] for r in records), max_length, batch_size)
        held = self._rows.get(key)
        if held is not None and held[2].covers(
            records, max_length=max_length, batch_size=batch_size, layers=layers
        ):
            return held[2]
        wanted = set(layers) | (set(held[2].layers) if held is not None else set())
        rows = TeacherRows(
            teacher, t_tok, records, max_length=max_length, batch_size=batch_size, layers=wanted, desc=desc
        )
        self._rows[key] = (teacher, t_tok, rows)
        return rows


def _aligned_pairs(student, s_tok, teacher_rows: TeacherRows, records, layers_s, pairs, desc=None):
    """Student K/V rows and teacher K/V rows on the same tokens (teacher tokens, student resampled).

    Per student layer i: lists of ("k" | "v", rows) in batch order, x (N, H_s·D_s) and y (N, H_t·D_t),
    float32.
    """
    rows = teacher_rows
    xs = {i: [] for i in layers_s}
    ys = {i: [] for i in layers_s}
    for b, batch in enumerate(batches(records, rows.batch_size, desc)):
        texts = [r["text"] for r in batch]
        s = capture_kv(student, s_tok, texts, max_length=rows.max_length, padding_side="right")
        device = s.spans.device
        spans_t, mask_t = rows.spans[b].to(device), rows.masks[b].to(device)  # (B, T_t, 2), (B, T_t)
        A = teacher_alignment(spans_t, mask_t, s.spans, s.attention_mask.to(device))  # (B, T_t, T_s)
        covered = (A.sum(-1) > 0) & mask_t.bool()  # (B, T_t)
        kept = covered.cpu()[rows.masks[b].bool()]  # (N_b,): which real teacher tokens are covered
        for i in layers_s:
            j = pairs[i]
            for src, dst, store in ((s.keys[i], rows.keys[j][b], "k"), (s.values[i], rows.values[j][b], "v")):
                src = src.float().to(device)  # (B, H_s, T_s, D_s)
                x = torch.einsum("bmt,bhtd->bmhd", A, src).flatten(2)[covered].cpu()  # (N, H_s·D_s)
                y = dst[kept].float()  # (N, H_t·D_t)
                xs[i].append((store, x))
                ys[i].append((store, y))
    return xs, ys


def probe_pairs(student, teacher) -> dict[int, int]:
    """The teacher layer each student layer is probed against: the nearest by depth (ratio map, no
    interpolation), {student layer: teacher layer} for all L_s student layers."""
    gs, gt = geometry_of(student), geometry_of(teacher)
    matrix = layer_map(gs.num_layers, gt.num_layers, strategy="ratio", interpolate=False)  # (L_s, L_t)
    return {i: int(matrix[i].argmax()) for i in range(gs.num_layers)}


@torch.no_grad()
def probe_kv_error(
    student,
    s_tok,
    teacher,
    t_tok,
    fit_records,
    eval_records,
    *,
    max_length: int,
    batch_size: int = 8,
    ridge: float = 1e-2,
    cache: TeacherRowsCache | None = None,
    progress: str | None = None,
) -> list[float]:
    """Per student layer (L_s values): 1 - R² of a ridge map student K/V -> teacher K/V, keys and values
    averaged.

    The teacher layer of student layer i is the nearest by depth (ratio map without interpolation). Rows are
    the teacher's real tokens covered by student tokens (student K/V resampled onto them). The map is fitted
    on `fit_records` and scored on `eval_records`; the ridge term is `ridge` times the mean feature variance.
    0 means the teacher's K/V are a linear function of the student's; 1 means no better than the mean.
    It can exceed 1 when the fit split has few rows next to the F_s features (the map overfits); fit on at
    least a few thousand tokens for a stable figure.
    With a `cache` (a TeacherRowsCache shared by several calls) the teacher's K/V on each record list are
    captured once for all students; the figures are the same with or without it. `progress`: the teacher's
    name to show progress bars under (teacher and student forwards, the ridge fits), None for none.
    """
    cache = cache if cache is not None else TeacherRowsCache()
    pairs = probe_pairs(student, teacher)
    layers = list(pairs)
    needed = sorted(set(pairs.values()))

    def desc(what: str) -> str | None:
        return f"KV probe vs {progress}: {what}" if progress else None

    fit_rows, eval_rows = (
        cache.rows(
            teacher,
            t_tok,
            records,
            max_length=max_length,
            batch_size=batch_size,
            layers=needed,
            desc=desc(f"teacher forwards ({split})"),
        )
        for records, split in ((fit_records, "fit"), (eval_records, "held-out"))
    )
    fx, fy = _aligned_pairs(
        student, s_tok, fit_rows, fit_records, layers, pairs, desc("student forwards (fit)")
    )
    ex, ey = _aligned_pairs(
        student, s_tok, eval_rows, eval_records, layers, pairs, desc("student forwards (held-out)")
    )
    out = []
    for i in tqdm(
        layers, desc=desc("ridge fits per layer"), disable=_shown(progress), leave=False, dynamic_ncols=True
    ):
        errs = []
        for kind in ("k", "v"):
            X = torch.cat([x for k, x in fx[i] if k == kind])
            Y = torch.cat([y for k, y in fy[i] if k == kind])
            x_mu, y_mu = X.mean(0), Y.mean(0)
            Xc, Yc = X - x_mu, Y - y_mu
            scale = Xc.square().mean().clamp(min=1e-12)
            gram = Xc.T @ Xc + ridge * scale * len(X) * torch.eye(X.shape[1], dtype=X.dtype)  # (F_s, F_s)
            W = torch.linalg.solve(gram, Xc.T @ Yc)  # (F_s, F_t)
            Xe = torch.cat([x for k, x in ex[i] if k == kind])
            Ye = torch.cat([y for k, y in ey[i] if k == kind])
            resid = ((Xe - x_mu) @ W + y_mu - Ye).square().sum()
            total = (Ye - Ye.mean(0)).square().sum().clamp(min=1e-12)
            errs.append(float(resid / total))
        out.append(sum(errs) / 2)
    return out
