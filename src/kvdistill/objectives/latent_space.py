"""Latent-space fusion: every teacher's K/V in one shared space Z, one learnable student head into Z.

Notation: B batch, N teachers, T_s/T_t student/teacher tokens, F_n = 2·H_t·D_t teacher features per token,
d_z the width of Z.

The frozen maps into Z (`fuse.latent.LatentSpace`: whitened PCA per teacher, Procrustes onto the reference
teacher) are fitted once by `prepare` on training records; a linear head per mapped student layer reads the
student's K/V features. Per teacher n, on the student tokens it covers (alignment rows: student tokens):

    z_n = A · Z_n(Σ_j W_n[i, j] · [K_n[j], V_n[j]])        (B, T_s, d_z)
    l_n(b) = λ_kv · Σ_i err(head_i([K_s[i], V_s[i]]), z_n) / #layers        kd(b) = Σ_n w_n(b) · l_n(b)

Works for encoder teachers too; needs uncompressed teachers (their tokens are the ones the maps were fitted
on).
"""

from __future__ import annotations

import torch
from torch import nn

from kvdistill import losses
from kvdistill.align.tokens import batch_token_alignment
from kvdistill.fuse.latent import LatentSpace, kv_features
from kvdistill.objectives.fusion import SimilarityInputs
from kvdistill.objectives.pairs import LayerPairs
from kvdistill.objectives.space import FusionSpace, SpaceOutput, Step
from kvdistill.teachers.record import TeacherKV


def teacher_features(tkv: TeacherKV, row: list[tuple[int, float]]) -> torch.Tensor:
    """Teacher K/V features mixed over the teacher layers of one layer-map row: (B, T_t, F_n)."""
    return sum(w * kv_features(tkv.keys[j], tkv.values[j]) for j, w in row)


class LatentSpaceKD(FusionSpace):
    name = "latent"

    def __init__(self, cfg, student_geometry, teachers: list, pairs: dict[str, LayerPairs]):
        super().__init__()
        self.kv = cfg.losses.kv
        self.kv_weight = cfg.losses.kv.weight  # this step's (losses.kv.schedule): the objective sets it
        dims = {
            t.name: dict.fromkeys(pairs[t.name].layers, 2 * t.geometry.num_kv_heads * t.geometry.head_dim)
            for t in teachers
        }
        self.latent = LatentSpace(dims, cfg.fusion.latent.dim)
        sg = student_geometry
        self.heads = nn.ModuleDict(
            {
                str(i): nn.Linear(2 * sg.num_kv_heads * sg.head_dim, cfg.fusion.latent.dim)
                for i in sorted({i for layers in dims.values() for i in layers})
            }
        )

    def _teacher_loss(self, step: Step, n: int, token_weight: torch.Tensor | None):
        """Per-sample error (B,) in Z against teacher n over its mapped layers, and its deepest layer's
        rows."""
        teacher, tkv = step.teachers[n], step.records[n]
        lp = step.pairs[teacher.name]
        b, s = step.batch, step.student
        j0 = lp.j[0]
        A = batch_token_alignment(
            b.spans, b.mask, tkv.spans[j0].to(b.mask.device), tkv.mask[j0].to(b.mask.device)
        ).float()  # (B, T_s, T_t)
        covered = (A.sum(-1) > 0).long() * b.mask  # (B, T_s)
        total = torch.zeros(b.mask.shape[0], device=b.mask.device)
        deepest = None
        for i, row in lp.rows.items():
            z_t = self.latent.encode(
                teacher.name, i, teacher_features(tkv, row).to(A.device)
            )  # (B, T_t, d_z)
            target = torch.einsum("bst,btz->bsz", A, z_t)  # (B, T_s, d_z) on the student's tokens
            pred = self.heads[str(i)](kv_features(s.keys[i], s.values[i]))  # (B, T_s, d_z)
            total = total + losses.kv_error(
                pred, target, covered, kind=self.kv.kind, normalize=self.kv.normalize, weight=token_weight
            )
            deepest = SimilarityInputs(pred, target, covered)
        return total / len(lp.layers), deepest

    def forward(self, step: Step) -> SpaceOutput:
        mask = step.batch.mask
        token_w = (
            step.fusion.token_weights(step.hidden, mask) if step.fusion.per_token else None
        )  # (B, T_s, N)
        per_teacher, sims, metrics = [], [], {}
        for n, teacher in enumerate(step.teachers):
            loss_n, deepest = self._teacher_loss(step, n, None if token_w is None else token_w[..., n])
            per_teacher.append(self.kv_weight * loss_n)
            sims.append(deepest)
            metrics[f"loss/latent/{teacher.name}"] = loss_n.detach().mean()
        stacked = torch.stack(per_teacher, -1)  # (B, N)
        if token_w is not None:
            return SpaceOutput(stacked.sum(-1), token_w, metrics)
        weights = step.fusion.weights(step.hidden, mask, sims, step.teacher_nll)  # (B, N)
        return SpaceOutput((weights * stacked).sum(-1), weights, metrics)

    @torch.no_grad()
    def prepare(
        self,
        records: list[dict],
        teachers: list,
        pairs: dict[str, LayerPairs],
        max_length: int,
        batch_size: int,
    ) -> None:
        """Fit the maps into Z on `records` (once: a resumed run keeps the fitted buffers)."""
        if bool(self.latent.fitted) or not teachers:
            return
        samples: dict[tuple[str, int], list] = {}
        matched: dict[tuple[str, int], list] = {}
        reference = teachers[0]
        for lo in range(0, len(records), batch_size):
            batch = records[lo : lo + batch_size]
            tkvs = [t.kv(batch, max_length=max_length) for t in teachers]
            ref_kv, j_ref = tkvs[0], pairs[reference.name].j[0]
            for teacher, tkv in zip(teachers, tkvs, strict=True):
                lp = pairs[teacher.name]
                j = lp.j[0]
                real = tkv.mask[j].bool()  # (B, T_t)
                A = None  # reference tokens, normalised over this teacher's tokens
                if teacher is not reference:
                    A = batch_token_alignment(
                        ref_kv.spans[j_ref], ref_kv.mask[j_ref], tkv.spans[j], tkv.mask[j]
                    )
                for i, row in lp.rows.items():
                    x = teacher_features(tkv, row)  # (B, T_t, F)
                    samples.setdefault((teacher.name, i), []).append(x[real])
                    if A is None or i not in pairs[reference.name].rows:
                        continue
                    x_ref = teacher_features(ref_kv, pairs[reference.name].rows[i])  # (B, T_0, F_0)
                    on_ref = torch.einsum("bst,btf->bsf", A, x)  # (B, T_0, F)
                    ok = (A.sum(-1) > 0) & ref_kv.mask[j_ref].bool()
                    matched.setdefault((teacher.name, i), []).append((on_ref[ok], x_ref[ok]))
        fit_samples = {
            k: (torch.cat(v).cpu(), torch.ones(sum(len(x) for x in v))) for k, v in samples.items()
        }
        fit_pairs = {
            k: (
                torch.cat([a for a, _ in v]).cpu(),
                torch.cat([b for _, b in v]).cpu(),
                torch.ones(sum(len(a) for a, _ in v)),
            )
            for k, v in matched.items()
        }
        self.latent.fit(fit_samples, fit_pairs, reference.name)
