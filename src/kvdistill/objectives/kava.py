"""The KaVa objective: a latent-reasoning student (kvdistill.student.latent) supervised by teachers'
compressed chain-of-thought K/V, one teacher being the backbone itself in CoT mode (self-distillation, as
KaVa) and any number of others of other families and tokenizers (this project's extension).

Notation: B batch, L_s student layers, H/D KV heads/head dim (teacher n: H_n/D_n), M latent slots, P prefix
columns.

    loss(b) = λ_ce·CE(answer | question, latents) + λ_cot·CE(CoT + answer | question)    (kvdistill.losses)
              + α1·CODI(b) + α2·Σ_n w_n·kv_n(b)
    kv_n(b)  = Σ_(i,j,w) w·(α_K·err(P_ni(K_s[i]), sg(K̃_n[j])) + α_V·err(P_ni(V_s[i]), sg(Ṽ_n[j]))) / (2·L_n)

K_s[i] (B, H, M, D): the student's pre-rotation keys at its latent slots in layer i; K̃_n[j] (B, H_n, M, D_n):
teacher n's CoT keys of layer j compressed to M entries per head (kvdistill.compress.latent), slot m against
entry m; (i, j, w): teacher n's layer map (the identity for the self teacher); P_ni: a learnable map from the
student into teacher n's geometry (the identity for the self teacher); err: losses.kv_error over the kept
entries. CODI compares the hidden states at the token before the answer, every layer, with the backbone's own
CoT mode (detached). The K and V errors are averaged (the 2 in kv_n), as KaVa's L_KV states it, so α2 here is
KaVa's α2; α_K = α_V = 1 by default (losses.latent_kv.keys / values).
w_n: the fixed weights (self 1, others teachers.N.weight), normalised.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import nn

from kvdistill import losses
from kvdistill.align.stack import KVProjectorStack
from kvdistill.data.segments import segments
from kvdistill.errors import KvdistillError
from kvdistill.eval.decode import pad_id
from kvdistill.eval.heldout import latent_answer_ce
from kvdistill.models.capture import forward_kv
from kvdistill.models.queries import capture_queries, supports_queries
from kvdistill.objectives.base import TrainingObjective, read_metrics
from kvdistill.objectives.latent_batch import CotView, LatentBatch, LatentCollator
from kvdistill.objectives.latent_targets import LatentTargets, cached_targets, compress_cot, cot_importance
from kvdistill.objectives.pairs import LayerPairs
from kvdistill.student.latent import LatentView

SELF = "self"


# ---------------------------------------------------------------------------------------------- objective
class KavaObjective(TrainingObjective):
    """The latent student's objective (module docstring): the trainer's objective interface
    (`kvdistill.objectives.base.TrainingObjective`); batches are `LatentBatch`es, the teachers' pass gives
    every other teacher's `LatentTargets` (the self teacher's come from the backbone's CoT pass in the
    step)."""

    kind = "latent"

    def __init__(self, cfg, student, tokenizer, teachers: list, device):
        super().__init__(
            cfg, student, tokenizer, teachers, backbone=student.backbone
        )  # student: LatentStudent
        sg = self.student_geometry
        lk = cfg.losses.latent_kv
        self.uses_self = lk.weight > 0 and lk.self_teacher
        self.pairs: dict[str, LayerPairs] = {}
        self.projectors = nn.ModuleDict()  # per teacher, its mapped layers' maps into its geometry, stacked
        names, weights = [], []
        if self.uses_self:
            identity = LayerPairs(
                torch.eye(sg.num_layers), keys_weight=lk.keys, values_weight=lk.values, device=device
            )
            self.pairs[SELF] = identity
            names.append(SELF)
            weights.append(1.0)
        for tcfg, t in zip(cfg.teachers, teachers, strict=True):
            if t.name == SELF:
                raise KvdistillError(
                    "a teacher may not be named 'self' (the backbone's own CoT mode is)",
                    "rename it (teachers.N.name)",
                )
            lp = self.pairs[t.name] = self.layer_pairs(tcfg, t, lk, device)
            self.projectors[t.name] = KVProjectorStack(sg, t.geometry, tcfg.projector, lp.layers)
            names.append(t.name)
            weights.append(tcfg.weight)
        total = sum(weights)
        self.source_weights = {n: w / total for n, w in zip(names, weights, strict=True)} if total else {}
        c = cfg.losses
        self._collator = LatentCollator(
            tokenizer,
            sg,
            template=cfg.data.template,
            tokens=student.tokens,
            max_length=cfg.data.max_length,
            own_cot=c.cot_ce > 0 or c.codi.weight > 0 or self.uses_self,
            teachers=[(t.tokenizer, t.geometry) if t.kind == "online" else None for t in teachers],
        )
        self._register_load_state_dict_pre_hook(self._from_per_pair_layout)
        self.to_device(device)

    @property
    def backbone(self) -> nn.Module:
        return self.student.backbone

    @property
    def device(self) -> torch.device:
        return self.student.head.init.device

    @property
    def collator(self) -> LatentCollator:
        return self._collator

    # ------------------------------------------------------------------------------------------ one step
    def _student_pass(self, view: LatentView, *, hidden: bool):
        """The student in latent mode (question, M latents, answer)."""
        d = self.device
        return self.student(
            view.prefix_ids.to(d),
            view.prefix_mask.to(d),
            view.suffix_ids.to(d),
            view.suffix_mask.to(d),
            pad_id=pad_id(self.tokenizer),
            geometry=self.student_geometry,
            hidden_states=hidden,
        )

    def _cot_pass(
        self, model, geometry, view: CotView, *, grad: bool, logits: bool, hidden: bool, importance: bool
    ):
        """A CoT-mode capture of `model` (the backbone with `grad`, or a frozen teacher) and its hooked
        queries where `importance` reads them (None otherwise)."""
        hooked = importance and supports_queries(geometry)
        d = self.device
        with (
            torch.set_grad_enabled(grad and torch.is_grad_enabled()),
            capture_queries(model, geometry) if hooked else nullcontext() as qc,
        ):
            cap = forward_kv(
                model,
                view.ids.to(d),
                view.mask.to(d),
                geometry=geometry,
                logits=logits,
                hidden_states=hidden,
                attentions=importance and not hooked,
            )
        return cap, (qc.queries if hooked else None)

    def _own_target(self, cap, view: CotView, queries) -> LatentTargets:
        """The self teacher's targets from the backbone's CoT-mode capture."""
        cfg = self.cfg.losses.latent_kv.target
        layers = self.pairs[SELF].teacher_layers
        imp, valid = (
            cot_importance(self.backbone, cap, queries, view, layers, cfg)
            if cfg.kind == "rkv"
            else (None, None)
        )
        return compress_cot(cap, view, layers, cfg, self.student.tokens, imp, valid)

    def teacher_pass(self, batch: LatentBatch, *, training: bool = True) -> dict[str, LatentTargets]:
        """Every (other) teacher's `LatentTargets` of a batch: an online teacher's CoT K/V compressed here
        (under its lock: one thread at a time uses its hooks), a cached one's read from its cache. A pure
        function of the batch (teachers are frozen): `TeachersAhead` runs it a batch early on another
        thread."""
        cfg = self.cfg.losses.latent_kv.target
        M = self.student.tokens
        out = {}
        for t, view in zip(self.teachers, batch.teachers, strict=True):
            layers = self.pairs[t.name].teacher_layers
            if t.kind == "cache":  # the cache holds the latent target itself (compression.span cot)
                tkv = t.kv(batch.records, max_length=self.cfg.data.max_length)
                out[t.name] = cached_targets(tkv, layers, M, self.device)
                continue
            with torch.no_grad(), t.lock:
                cap, queries = self._cot_pass(
                    t.model,
                    t.geometry,
                    view,
                    grad=False,
                    logits=False,
                    hidden=False,
                    importance=cfg.kind == "rkv",
                )
                imp, valid = (
                    cot_importance(t.model, cap, queries, view, layers, cfg)
                    if cfg.kind == "rkv"
                    else (None, None)
                )
                out[t.name] = compress_cot(cap, view, layers, cfg, M, imp, valid)
        return out

    def kv_terms(self, student_cap, P: int, targets: dict[str, LatentTargets]) -> dict[str, torch.Tensor]:
        """Per teacher kv_n (B,) (module docstring) from the student's latent columns P .. P+M-1: every mapped
        layer projected in one batched matmul (`KVProjectorStack`; the self teacher: none), the errors of all
        pairs in one `losses.kv_error` call, reduced by `losses.pairs_kv_loss`."""
        lk = self.cfg.losses.latent_kv
        M = self.student.tokens
        out = {}
        for name, tgt in targets.items():
            lp = self.pairs[name]
            keys = [student_cap.keys[i][:, :, P : P + M] for i in lp.layers]  # L × (B, H, M, D)
            values = [student_cap.values[i][:, :, P : P + M] for i in lp.layers]
            if name == SELF:
                mapped = [(keys[a], values[a]) for a in lp.at]  # per pair (B, H, M, D)
            else:
                stack = self.projectors[name]
                proj = stack.project(keys, values)  # (L, 2, B, M, H_n·D_n)
                L, _, B = proj.shape[:3]
                proj = proj.view(L, 2, B, M, stack.H_t, stack.D_t).transpose(3, 4)  # (L, 2, B, H_n, M, D_n)
                mapped = [(proj[a, 0], proj[a, 1]) for a in lp.at]
            pred, target, kept = [], [], []
            for (ks, vs), j in zip(mapped, lp.j, strict=True):
                for x, t in ((ks, tgt.keys[j]), (vs, tgt.values[j])):
                    pred.append(losses.as_rows(x, tgt.kept[j])[0])  # (B, H_n·M, D_n)
                    target.append(losses.as_rows(t.to(x.dtype), tgt.kept[j])[0])
                kept.append(tgt.kept[j].flatten(1))  # (B, H_n·M)
            B, R, D = pred[0].shape
            err = losses.kv_error(
                torch.stack(pred).view(-1, 2, B, R, D),
                torch.stack(target).view(-1, 2, B, R, D),
                torch.stack(kept)[:, None],
                kind=lk.kind,
                normalize=lk.normalize,
            )  # (P, 2, B)
            out[name] = (
                losses.pairs_kv_loss(err, lp.coef, len(lp.layers)) / 2
            )  # K and V averaged (KaVa's L_KV)
        return out

    def forward(self, batch: LatentBatch | list[dict]):
        """(loss, metrics) of a batch (or records, collated here; module docstring): loss 0-dim, metrics
        floats (per-sample means)."""
        batch = self.as_batch(batch)
        c = self.cfg.losses
        codi = c.codi.weight > 0
        s_view = batch.student
        s_cap = self._student_pass(s_view, hidden=codi)
        P = s_view.prefix_ids.shape[1]
        d = self.device
        ids, answer_mask = s_cap.input_ids, s_view.answer_mask.to(d)
        ce = losses.ce_loss(s_cap.logits, ids, answer_mask)  # (B,) the answer after the latents
        per_sample = c.ce * ce
        metrics = {"loss/ce": ce.detach().mean()}
        terms = {"ce": (c.ce * ce).mean()}  # each weighted term, what train.grad_norms_every differentiates
        t_cap = t_queries = None
        t_view = batch.own_cot
        if c.cot_ce > 0 or codi or self.uses_self:
            t_cap, t_queries = self._cot_pass(
                self.backbone,
                self.student_geometry,
                t_view,
                grad=c.cot_ce > 0,
                logits=c.cot_ce > 0,
                hidden=codi,
                importance=self.uses_self and c.latent_kv.target.kind == "rkv",
            )
        if c.cot_ce > 0:
            cot_ce = losses.ce_loss(t_cap.logits, t_cap.input_ids, t_view.after_prefix.to(d))
            per_sample = per_sample + c.cot_ce * cot_ce
            terms["cot_ce"] = (c.cot_ce * cot_ce).mean()
            metrics["loss/cot_ce"] = cot_ce.detach().mean()
        if codi:
            b = torch.arange(len(batch.records), device=d)
            s_h = torch.stack([h[b, s_view.pre_answer.to(d)] for h in s_cap.hidden_states[1:]])  # (L, B, F)
            t_h = torch.stack([h[b, t_view.pre_answer.to(d)] for h in t_cap.hidden_states[1:]])
            codi_loss = losses.codi_loss(s_h, t_h, kind=c.codi.kind, normalize=c.codi.normalize)
            per_sample = per_sample + c.codi.weight * codi_loss
            terms["codi"] = (c.codi.weight * codi_loss).mean()
            metrics["loss/codi"] = codi_loss.detach().mean()
        if c.latent_kv.weight > 0:
            targets = {SELF: self._own_target(t_cap, t_view, t_queries)} if self.uses_self else {}
            targets.update(self.teachers_of(batch))
            kv = self.kv_terms(s_cap, P, targets)
            fused = sum(self.source_weights[n] * v for n, v in kv.items())
            per_sample = per_sample + c.latent_kv.weight * fused
            terms["latent_kv"] = (c.latent_kv.weight * fused).mean()
            metrics.update({f"loss/latent_kv/{n}": v.detach().mean() for n, v in kv.items()})
            metrics["loss/kd"] = fused.detach().mean()
        total = per_sample.mean()
        metrics["loss"] = total.detach()
        self.last_terms = terms  # graph-attached, read by the trainer, then dropped
        return total, read_metrics(metrics, s_view.answer_mask)

    # ------------------------------------------------------------------------------------------ held out
    @torch.no_grad()
    def evaluate(self, records: list[dict], batch_size: int | None = None) -> dict:
        """Held-out answer CE / perplexity in latent mode (token-level, `latent_answer_ce`) and, per teacher,
        the latent K/V error `eval/latent_kv/<teacher>` (exact match: the trainer's evaluation with
        train.eval_exact_match, `kvdistill.eval.decode.latent_exact_match`)."""
        with self.evaluating():
            bs = batch_size or self.cfg.train.batch_size
            ce = latent_answer_ce(
                self.student,
                self.tokenizer,
                records,
                self.cfg.data.template,
                batch_size=bs,
                geometry=self.student_geometry,
            )["ce"]
            out = {"eval/ce": ce, "eval/ppl": math.exp(min(ce, 50.0))}
            if self.cfg.losses.latent_kv.weight > 0:
                kv_sums: dict[str, list[float]] = {}
                for lo in range(0, len(records), bs):
                    batch = self.collator(records[lo : lo + bs], own_cot=self.uses_self)
                    cap = self._student_pass(batch.student, hidden=False)
                    targets = {}
                    if self.uses_self:
                        t_cap, t_q = self._cot_pass(
                            self.backbone,
                            self.student_geometry,
                            batch.own_cot,
                            grad=False,
                            logits=False,
                            hidden=False,
                            importance=self.cfg.losses.latent_kv.target.kind == "rkv",
                        )
                        targets[SELF] = self._own_target(t_cap, batch.own_cot, t_q)
                    targets.update(self.teacher_pass(batch, training=False))
                    kv = self.kv_terms(cap, batch.student.prefix_ids.shape[1], targets)
                    for n, v in kv.items():
                        kv_sums.setdefault(n, []).extend(v.tolist())
                out.update({f"eval/latent_kv/{n}": sum(v) / len(v) for n, v in kv_sums.items()})
            return out

    @torch.no_grad()
    def prepare(self, records: list[dict]) -> None:
        """Nothing is fitted; every record is checked to hold a question, a chain of thought and an answer in
        the template's layout (refused before the run directory is written)."""
        for r in records:
            segments(r, self.cfg.data.template)

    # ------------------------------------------------------------------------------------------ reports
    def plan(self) -> dict:
        lat = self.cfg.student.latent
        return {
            "student": self.student_geometry.to_dict(),
            "latent": {
                "tokens": lat.tokens,
                "iterations": lat.iterations,
                "projection": lat.projection,
                "head": lat.head,
            },
            "target": self.cfg.losses.latent_kv.target.model_dump(),
            "teachers": [
                {
                    "name": n,
                    "weight": w,
                    "pairs": [
                        [i, j, x]
                        for i, j, x in zip(self.pairs[n].i, self.pairs[n].j, self.pairs[n].w, strict=True)
                    ],
                }
                for n, w in self.source_weights.items()
            ],
        }

    def alignment_sample(self, record: dict) -> dict:
        s = segments(record, self.cfg.data.template)
        return {
            "text": s.text,
            "student": {"prefix": s.prefix, "latent_tokens": self.student.tokens, "suffix": s.suffix},
            "teachers": {},
        }

    def save_student(self, out_dir) -> None:
        super().save_student(out_dir)
        self.student.save_head(out_dir)

    def _from_per_pair_layout(self, state_dict, prefix, *args) -> None:
        """Checkpoints written before the stack hold one map per layer pair,
        ``projectors.<teacher>.<pair>.key_map. <name>``: renamed to the pair's student layer, which
        `KVProjectorStack` stacks; refused where several pairs share a student layer (an interpolated layer
        map), whose maps cannot become one."""
        for name, lp in self.pairs.items():
            head = f"{prefix}projectors.{name}."
            old = [k for k in state_dict if k.startswith(head) and k[len(head) :].split(".")[0].isdigit()]
            if not old:
                continue
            if len(set(lp.i)) != len(lp.i):
                raise KvdistillError(
                    f"this checkpoint holds one K/V map per layer pair for teacher '{name}' ({len(lp.i)} "
                    "pairs over "
                    f"student layers {lp.layers}: an interpolated layer map); the latent objective now keeps "
                    "one map "
                    "per student layer",
                    "train the run again from step 0 (or resume it with the kvdistill version that wrote it)",
                )
            moved = {}
            for k in old:
                p, _, rest = k[len(head) :].partition(".")
                moved[f"{head}{lp.i[int(p)]}.{rest}"] = state_dict.pop(k)
            state_dict.update(moved)
