"""Loss-space fusion (the default, collapse-safe): Σ_n w_n · KV_loss_n, with learnable maps student ->
teacher.

Notation: B batch, N teachers, P layer pairs of a teacher, L its mapped student layers, H_t/D_t teacher KV
heads/head dim, T_s student tokens, M kept teacher tokens, K nonzeros per alignment row.

The student's K/V of layer i are mapped into teacher n's geometry by a learnable projector P_ni and resampled
onto the teacher's (kept) tokens through the token alignment A (rows: teacher tokens, normalised over the
student tokens they overlap):

    pred = A · P_ni(K_s[i])                                          (B, H_t, M, D_t)
    kv_n(b) = Σ_(i,j,w) w · (α_K·err(pred_K, K_t[j]) + α_V·err(pred_V, V_t[j])) / L
                                                                     (err: losses.kv_error)
    kd(b) = Σ_n w_n(b) · (λ_kv·kv_n(b) + λ_cos·cos_n(b))

A constant student cannot reach a low loss whatever P learns (P maps a constant to a constant): the maps run
student -> teacher and the teacher's K/V is a fixed target. Per-token fusion weights w_n(b, t) enter as row
weights of the errors, resampled onto the teacher's tokens through A.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kvdistill import losses
from kvdistill.align.stack import KVProjectorStack
from kvdistill.align.tokens import resample_rows, teacher_alignment_sparse
from kvdistill.objectives.compiled import maybe_compiled
from kvdistill.objectives.fusion import SimilarityInputs
from kvdistill.objectives.pairs import LayerPairs
from kvdistill.objectives.space import FusionSpace, SpaceOutput, Step
from kvdistill.teachers.record import TeacherKV


@dataclass
class PairErrors:
    """One teacher's errors over its layer pairs: kv (P, 2, B) keys/values per pair (None if not asked), cos
    (P, B) (None if not asked), and its deepest pair's rows for similarity routing."""

    kv: torch.Tensor | None
    cos: torch.Tensor | None
    deepest: SimilarityInputs


@dataclass
class _Group:
    """Pairs resampled together: their positions in the pair list and one alignment. Shared spans: index,
    weight (B, M, K), covered (B, M); kept tokens per head: index, weight (P_g, B, H_t, M, K), covered (P_g,
    B, H_t, M)."""

    pos: list[int]
    index: torch.Tensor
    weight: torch.Tensor
    covered: torch.Tensor


def _alignments(tkv: TeacherKV, lp: LayerPairs, step: Step, n: int) -> dict[int, tuple]:
    """Alignment key -> (index, weight, covered) for the teacher layers of `lp` (one key for shared spans):
    the collated one of teacher n where the batch has it (its tokens don't depend on its K/V), else built
    here."""
    collated = step.batch.alignments[n] if step.batch.alignments is not None else None
    if isinstance(collated, dict) and not tkv.shared_spans:  # per layer: a cache of per-head kept tokens
        return {id(tkv.spans[j]): collated[j] for j in lp.j}
    if isinstance(collated, tuple) and tkv.shared_spans:
        return {-1: collated}
    device = step.batch.mask.device
    out: dict[int, tuple] = {}
    for j in lp.j:
        key = -1 if tkv.shared_spans else id(tkv.spans[j])
        if key in out:
            continue
        index, weight = teacher_alignment_sparse(
            *tkv.host_spans(j), step.batch.spans_cpu, step.batch.mask_cpu, device=device
        )  # (B, H|1, M, K)
        hit = weight.sum(-1) > 0  # (B, H|1, M) teacher tokens that overlap a student token
        shared = tkv.mask[j].dim() == 2
        covered = (hit[:, 0] if shared else hit).long() * tkv.mask[j].to(device)  # (B, M) or (B, H_t, M)
        out[key] = (index[:, 0] if shared else index, weight[:, 0] if shared else weight, covered)
    return out


def _groups(tkv: TeacherKV, lp: LayerPairs, aligned: dict[int, tuple]) -> list[_Group]:
    """The pairs grouped for one resample each: by shared alignment, or per-head alignments of equal M stacked
    (K padded with zero weights)."""
    shared: dict[int, list[int]] = {}
    per_head: dict[int, list[int]] = {}
    for p, j in enumerate(lp.j):
        key = -1 if tkv.shared_spans else id(tkv.spans[j])
        if aligned[key][0].dim() == 3:
            shared.setdefault(key, []).append(p)
        else:
            per_head.setdefault(aligned[key][0].shape[2], []).append(p)
    groups = [_Group(pos, *aligned[key]) for key, pos in shared.items()]
    for pos in per_head.values():
        al = [aligned[id(tkv.spans[lp.j[p]])] for p in pos]
        K = max(a[0].shape[-1] for a in al)

        def pad(x, K=K):  # (B, H_t, M, k) -> (B, H_t, M, K)
            return x if x.shape[-1] == K else torch.nn.functional.pad(x, (0, K - x.shape[-1]))

        groups.append(
            _Group(
                pos,
                torch.stack([pad(a[0]) for a in al]),
                torch.stack([pad(a[1]) for a in al]),
                torch.stack([a[2] for a in al]),
            )
        )
    return groups


def _token_to_rows(token_weight: torch.Tensor, g: _Group) -> torch.Tensor:
    """Per-token weights (B, T_s) resampled onto a group's rows: (B, M) shared, (P_g, 1, B, H_t·M) per
    head."""
    if g.covered.dim() == 2:
        return resample_rows(token_weight[..., None], g.index, g.weight)[..., 0]  # (B, M)
    P, B, H, M, _ = g.index.shape
    x = token_weight.view(1, B, 1, -1, 1).expand(P, B, H, token_weight.shape[1], 1)  # (P_g, B, H_t, T_s, 1)
    return resample_rows(x, g.index, g.weight).view(P, 1, B, H * M)


def group_errors(
    proj: torch.Tensor,
    index: torch.Tensor,
    weight: torch.Tensor,
    covered: torch.Tensor,
    targets: list[torch.Tensor],
    at: torch.Tensor | None,
    rows_w: torch.Tensor | None,
    *,
    H: int,
    D: int,
    kind: str,
    normalize: bool,
    kv: bool,
    cosine: bool,
    dense: bool = False,
):
    """The errors of one alignment group of P pairs: the projected student K/V proj (L, 2, B, T_s, H_t·D_t)
    resampled onto the teacher's rows (index, weight, covered of a `_Group`; `at` picks the group's layers of
    L, None: all), compared with the 2·P teacher tensors `targets` (B, H_t, M, D_t), keys and values of each
    pair.

    -> kv errors (P, 2, B) or None, cosine errors (P, B) or None, and the keys as rows with their mask for the
    similarity routing: k_rows, k_target (P, B, R, D_t), cos_mask (B, R) or (P, B, R). A pure tensor function:
    the part `train.compile` compiles.

    dense: a shared alignment is applied as one dense (B, M, T_s) matrix in a batched matmul instead of the
    sparse gather (the same numbers up to rounding: the matmul accumulates in float32): on a GPU the matmul is
    a few milliseconds where the gather's backward (a scatter-add) is slower, and it holds no (…, M, K, F)
    copy. The student tokens are padded to a multiple of 8 with zero columns: an odd T_s gives rows of A whose
    stride is not 16-byte aligned, and cuBLAS then falls back to its slow pre-Hopper kernels (seen on the
    H200).
    """
    P, B = len(targets) // 2, covered.shape[-2] if covered.dim() == 2 else covered.shape[1]
    if covered.dim() == 2:  # shared spans: rows are teacher tokens, features H_t·D_t
        if dense:
            L, _, _, T, F = proj.shape
            M, T8 = index.shape[1], -(-T // 8) * 8  # T_s padded to 8: 16-byte strides, the GPU's fast GEMMs
            A = torch.zeros(B, M, T8, dtype=proj.dtype, device=proj.device)
            A = A.scatter_add(-1, index, weight.to(proj.dtype))  # (B, M, T8), zero beyond T_s
            x = proj.new_zeros(B, T8, L, 2, F)
            x[:, :T] = proj.permute(2, 3, 0, 1, 4)  # one copy, token-major
            pred = torch.bmm(A, x.view(B, T8, L * 2 * F)).view(B, M, L, 2, F).permute(2, 3, 0, 1, 4)
            # pred: (L, 2, B, M, H_t·D_t)
        else:
            pred = resample_rows(proj, index, weight)  # (L, 2, B, M, H_t·D_t)
        pred = pred if at is None else pred.index_select(0, at)  # (P, 2, B, M, H_t·D_t)
        M = pred.shape[3]
        target = torch.stack([t.transpose(1, 2) for t in targets]).view(P, 2, B, M, H * D)
        mask = covered  # (B, M)
        k_rows = pred[:, 0].reshape(P, B, M * H, D)  # (P, B, M·H_t, D_t): one row per (token, head)
        k_target = target[:, 0].reshape(P, B, M * H, D)
        cos_mask = covered.repeat_interleave(H, 1)  # (B, M·H_t)
        cos_w = None if rows_w is None else rows_w.repeat_interleave(H, 1)
    else:  # kept tokens differ per head: rows are (head, token), features D_t
        x = proj if at is None else proj.index_select(0, at)  # (P, 2, B, T_s, H_t·D_t)
        x = x.view(P, 2, B, -1, H, D).transpose(3, 4)  # (P, 2, B, H_t, T_s, D_t)
        pred = resample_rows(x, index[:, None], weight[:, None])  # (P, 2, B, H_t, M, D_t)
        M = pred.shape[4]
        pred = pred.reshape(P, 2, B, H * M, D)
        target = torch.stack(targets).view(P, 2, B, H * M, D)
        mask = covered.view(P, 1, B, H * M)
        k_rows, k_target, cos_mask = pred[:, 0], target[:, 0], mask[:, 0]  # (P, B, H_t·M, D_t)
        cos_w = None if rows_w is None else rows_w[:, 0]
    e = losses.kv_error(pred, target, mask, kind=kind, normalize=normalize, weight=rows_w) if kv else None
    c = losses.cosine_error(k_rows, k_target, cos_mask, weight=cos_w) if cosine else None  # (P, B)
    return e, c, k_rows, k_target, cos_mask


class LossSpace(FusionSpace):
    name = "loss"
    reports_layer_errors = True

    def __init__(self, cfg, student_geometry, teachers: list, pairs: dict[str, LayerPairs]):
        super().__init__()
        self.kv, self.cosine = cfg.losses.kv, cfg.losses.cosine
        self.kv_weight = cfg.losses.kv.weight  # this step's (losses.kv.schedule): the objective sets it
        self.projectors = nn.ModuleDict(
            {  # per teacher, its mapped layers' projectors as stacked parameters
                t.name: KVProjectorStack(student_geometry, t.geometry, tcfg.projector, pairs[t.name].layers)
                for tcfg, t in zip(cfg.teachers, teachers, strict=True)
            }
        )
        self.group_errors = maybe_compiled(group_errors, cfg.train.compile, name="loss space K/V errors")
        self.dense_alignment = True  # off the CPU, shared alignments as a dense matmul (see `group_errors`)

    def pair_errors(
        self,
        step: Step,
        n: int,
        *,
        kind: str,
        normalize: bool,
        kv: bool = True,
        cosine: bool = False,
        token_weight: torch.Tensor | None = None,
    ) -> PairErrors:
        """Errors of teacher n over its layer pairs, batched: every mapped student layer's K and V projected
        in one matmul, resampled onto the teacher's tokens in one gather per alignment group, compared with
        the stacked teacher K/V in one `losses.kv_error` call per group. token_weight: (B, T_s) row
        weights."""
        teacher, tkv = step.teachers[n], step.records[n]
        lp = step.pairs[teacher.name]
        s, dev = step.student, step.batch.mask.device
        B = step.batch.mask.shape[0]
        proj = self.projectors[teacher.name].project(
            [s.keys[i] for i in lp.layers], [s.values[i] for i in lp.layers]
        )  # (L, 2, B, T_s, H_t·D_t)
        _, H, _, D = tkv.keys[lp.j[0]].shape
        P_all = len(lp.j)
        acc = torch.promote_types(proj.dtype, torch.float32)  # kv_error's float32 (float64 for float64 K/V)
        err = torch.zeros(P_all, 2, B, device=dev, dtype=acc) if kv else None
        cos = torch.zeros(P_all, B, device=dev) if cosine else None
        deepest = None
        for g in _groups(tkv, lp, _alignments(tkv, lp, step, n)):
            at = lp.layer_positions(g.pos, dev)
            targets = [
                tkv.keys[lp.j[p]].to(dev) if side == 0 else tkv.values[lp.j[p]].to(dev)
                for p in g.pos
                for side in (0, 1)
            ]  # 2·P × (B, H_t, M, D_t)
            rows_w = None if token_weight is None else _token_to_rows(token_weight, g)
            e, c, k_rows, k_target, cos_mask = self.group_errors(
                proj,
                g.index,
                g.weight,
                g.covered,
                targets,
                at,
                rows_w,
                H=H,
                D=D,
                kind=kind,
                normalize=normalize,
                kv=kv,
                cosine=cosine,
                dense=self.dense_alignment and dev.type != "cpu",
            )
            M = g.index.shape[-2]
            idx = torch.tensor(g.pos, device=dev)
            if kv:
                err = err.index_copy(0, idx, e)
            if cosine:
                cos = cos.index_copy(0, idx, c)
            if g.pos[-1] == P_all - 1:  # the group holding the deepest pair
                deepest = self._deepest(
                    k_rows[-1],
                    k_target[-1],
                    cos_mask if cos_mask.dim() == 2 else cos_mask[-1],
                    B,
                    M,
                    H,
                    D,
                    shared=g.covered.dim() == 2,
                )
        return PairErrors(err, cos, deepest)

    @staticmethod
    def _deepest(k_rows, k_target, mask, B, M, H, D, *, shared: bool) -> SimilarityInputs:
        """The deepest pair's keys as token rows (B, M, H_t·D_t) for similarity; per-head kept tokens are laid
        side by side by slot, a token counting where any head keeps one."""
        if shared:
            return SimilarityInputs(
                k_rows.reshape(B, M, H * D), k_target.reshape(B, M, H * D), mask.view(B, M, H)[..., 0]
            )
        q = k_rows.view(B, H, M, D).transpose(1, 2).reshape(B, M, H * D)
        k = k_target.view(B, H, M, D).transpose(1, 2).reshape(B, M, H * D)
        return SimilarityInputs(q, k, mask.view(B, H, M).amax(1))

    def forward(self, step: Step) -> SpaceOutput:
        mask = step.batch.mask
        token_w = (
            step.fusion.token_weights(step.hidden, mask) if step.fusion.per_token else None
        )  # (B, T_s, N)
        per_teacher, sims, metrics = [], [], {}
        for n, teacher in enumerate(step.teachers):
            lp = step.pairs[teacher.name]
            res = self.pair_errors(
                step,
                n,
                kind=self.kv.kind,
                normalize=self.kv.normalize,
                kv=self.kv.weight > 0,
                cosine=self.cosine > 0,
                token_weight=None if token_w is None else token_w[..., n],
            )
            L = len(lp.layers)
            loss_n = torch.zeros(mask.shape[0], device=mask.device)
            if res.kv is not None:
                kv = losses.pairs_kv_loss(res.kv, lp.coef, L)  # (B,)
                loss_n = loss_n + self.kv_weight * kv
                metrics[f"loss/kv/{teacher.name}"] = kv.detach().mean()
            if res.cos is not None:
                cos = (lp.weight.to(mask.device)[:, None] * res.cos).sum(0) / L  # (B,)
                loss_n = loss_n + self.cosine * cos
                metrics[f"loss/cosine/{teacher.name}"] = cos.detach().mean()
            per_teacher.append(loss_n)
            sims.append(res.deepest)
        if token_w is not None:  # the weights are already inside the row errors
            return SpaceOutput(torch.stack(per_teacher, -1).sum(-1), token_w, metrics)
        weights = step.fusion.weights(step.hidden, mask, sims, step.teacher_nll)  # (B, N)
        return SpaceOutput((weights * torch.stack(per_teacher, -1)).sum(-1), weights, metrics)

    def layer_errors(self, step: Step) -> dict[str, dict[int, torch.Tensor]]:
        """Per teacher and mapped student layer i, Σ_j W[i, j]·(err_K + err_V)/2 per sample (B,), err the
        variance-normalised MSE of `losses.kv_error` whatever losses.kv.kind is (comparable across runs)."""
        out = {}
        for n, teacher in enumerate(step.teachers):
            lp = step.pairs[teacher.name]
            err = self.pair_errors(step, n, kind="mse", normalize=True).kv  # (P, 2, B)
            layers: dict[int, torch.Tensor] = {}
            for p, (i, w) in enumerate(zip(lp.i, lp.w, strict=True)):
                layers[i] = layers.get(i, 0) + w * err[p].mean(0)
            out[teacher.name] = layers
        return out
