"""Target-space fusion: one fused target per student layer, Σ_n w_n · A_n(KV_n), compared with the student's
K/V.

Notation: B batch, N teachers, T_s student tokens, M teacher tokens, H_s/D_s student KV heads/head dim.

Teacher n's K/V of the teacher layers mapped to student layer i (mixed by the layer map's row) are resampled
onto the student's tokens (alignment rows: student tokens, normalised over the teacher tokens they overlap)
and mapped into the student's geometry by a frozen `TeacherToStudentMap` A_n, which no loss can move (a
learnable map on the teacher side could meet the student at zero). Per student layer i:

    target_i = Σ_n w_n · A_n(Σ_j W_n[i, j] · KV_n[j])        (B, H_s, T_s, D_s)   (fuse.fuse_targets)
    kd(b) = λ_kv · Σ_i (α_K·err(K_s[i], target_K) + α_V·err(V_s[i], target_V)) / #layers
                                                                     (losses.pairs_kv_loss)

on the student tokens that some teacher covers. Weights are fixed, routed (per sample or per token), or by
similarity of the student's pooled keys to each teacher's mapped keys on the deepest fused layer.
"""

from __future__ import annotations

import torch
from torch import nn

from kvdistill import losses
from kvdistill.align.heads import TeacherToStudentMap
from kvdistill.align.tokens import batch_token_alignment
from kvdistill.fuse import fuse_targets
from kvdistill.objectives.fusion import SimilarityInputs
from kvdistill.objectives.pairs import LayerPairs
from kvdistill.objectives.space import FusionSpace, SpaceOutput, Step


class TargetSpace(FusionSpace):
    name = "target"

    def __init__(self, cfg, student_geometry, teachers: list, pairs: dict[str, LayerPairs]):
        super().__init__()
        self.kv = cfg.losses.kv
        self.kv_weight = cfg.losses.kv.weight  # this step's (losses.kv.schedule): the objective sets it
        self.num_layers = student_geometry.num_layers
        self.to_student = nn.ModuleDict(
            {t.name: TeacherToStudentMap(t.geometry, student_geometry) for t in teachers}
        )

    def _mapped(self, step: Step, n: int) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Teacher n on the student's grid: student layer i -> (keys, values (B, H_s, T_s, D_s), covered (B,
        T_s))."""
        teacher, tkv = step.teachers[n], step.records[n]
        lp = step.pairs[teacher.name]
        b = step.batch
        j0 = lp.j[0]
        A = batch_token_alignment(
            b.spans, b.mask, tkv.spans[j0].to(b.mask.device), tkv.mask[j0].to(b.mask.device)
        ).float()  # (B, T_s, M)
        covered = (A.sum(-1) > 0).long() * b.mask  # (B, T_s)
        mapper = self.to_student[teacher.name]
        out = {}
        for i, row in lp.rows.items():
            k = sum(w * tkv.keys[j].float() for j, w in row)  # (B, H_t, M, D_t)
            v = sum(w * tkv.values[j].float() for j, w in row)
            k_on_s = mapper(
                torch.einsum("btm,bhmd->bhtd", A, k.to(A.device)), which="keys"
            )  # (B, H_s, T_s, D_s)
            v_on_s = mapper(torch.einsum("btm,bhmd->bhtd", A, v.to(A.device)), which="values")
            out[i] = (k_on_s, v_on_s, covered)
        return out

    def _similarity(self, step: Step, mapped: list[dict]) -> list[SimilarityInputs]:
        """Per teacher, the student's own keys and the teacher's mapped keys of its deepest mapped layer, as
        token rows (B, T_s, H_s·D_s), on the student tokens the teacher covers."""
        sims = []
        for per_layer in mapped:
            i = max(per_layer)
            k_t, _, covered = per_layer[i]
            k_s = step.student.keys[i]
            B, H, T, D = k_s.shape
            sims.append(
                SimilarityInputs(
                    k_s.transpose(1, 2).reshape(B, T, H * D),
                    k_t.transpose(1, 2).reshape(B, T, H * D),
                    covered,
                )
            )
        return sims

    def forward(self, step: Step) -> SpaceOutput:
        mask = step.batch.mask
        mapped = [self._mapped(step, n) for n in range(len(step.teachers))]
        sims = self._similarity(step, mapped) if step.fusion.kind == "similarity" else None
        weights = step.fusion.weights(step.hidden, mask, sims, step.teacher_nll)  # (B, N) or (B, T_s, N)
        errors = []  # per fused layer (2, B): keys, values
        for i in range(self.num_layers):
            have = [n for n, per_layer in enumerate(mapped) if i in per_layer]
            if not have:
                continue
            w = weights[..., have]  # teachers mapped to layer i; renormalised over them
            w = w / w.sum(-1, keepdim=True).clamp(min=1e-12)
            fused_k = fuse_targets([mapped[n][i][0] for n in have], w)  # (B, H_s, T_s, D_s)
            fused_v = fuse_targets([mapped[n][i][1] for n in have], w)
            cover = torch.stack([mapped[n][i][2] for n in have]).amax(0)  # (B, T_s)
            errors.append(
                torch.stack(
                    [
                        losses.kv_error(
                            *(losses.as_rows(x, cover)[0] for x in (s_x, t_x)),
                            cover,
                            kind=self.kv.kind,
                            normalize=self.kv.normalize,
                        )
                        for s_x, t_x in ((step.student.keys[i], fused_k), (step.student.values[i], fused_v))
                    ]
                )
            )  # (2, B)
        if errors:
            coef = mask.new_tensor(
                [[self.kv.keys, self.kv.values]] * len(errors), dtype=torch.float32
            )  # (P, 2)
            kd = losses.pairs_kv_loss(torch.stack(errors), coef, len(errors))  # (B,)
        else:
            kd = torch.zeros(mask.shape[0], device=mask.device)
        return SpaceOutput(self.kv_weight * kd, weights, {"loss/kv/fused": kd.detach().mean()})
