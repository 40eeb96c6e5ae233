"""The distillation objective: the student's CE, a fusion space's K/V loss, the per-teacher terms, the
router's regulariser. Thin: every loss comes from `kvdistill.losses`, every K/V term from the space module.

Notation: B batch, N teachers, T_s student tokens, L_s student layers.

    loss = mean_b [ λ_ce·CE(b) + kd_space(b) + extra(b) ] + λ_ent·entropy(w)
           (+ λ_target·KL(w_conf || w_router))

Each bracket is per sample, so a batch's loss (and its gradient) is the mean of its samples' losses: batch
size, accumulation and DDP give the same update. With train.on_policy, a step drawn on-policy computes
kd_space and extra on the student's own continuations of the prompts and CE on the data text
(`kvdistill.objectives.on_policy`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kvdistill import losses
from kvdistill.align.plan import alignment_plan
from kvdistill.align.tokens import token_alignment
from kvdistill.errors import KvdistillError
from kvdistill.fuse.routing_accuracy import routing_accuracy
from kvdistill.models.capture import forward_kv, tokenize
from kvdistill.models.chat import ChatText
from kvdistill.objectives.base import TrainingObjective, read_metrics
from kvdistill.objectives.batch import Collated, Collator, TeacherSide
from kvdistill.objectives.fusion import Fusion, common_end, per_sample, scored_start, teacher_nll_per_byte
from kvdistill.objectives.latent_space import LatentSpaceKD
from kvdistill.objectives.loss_space import LossSpace
from kvdistill.objectives.moe import MoETerms
from kvdistill.objectives.on_policy import METRICS as ON_POLICY_METRICS
from kvdistill.objectives.on_policy import OnPolicy
from kvdistill.objectives.space import FusionSpace, Step
from kvdistill.objectives.target_space import TargetSpace
from kvdistill.objectives.terms import TeacherTerms

SPACES: dict[str, type[FusionSpace]] = {"loss": LossSpace, "target": TargetSpace, "latent": LatentSpaceKD}


class TextObjective(TrainingObjective):
    """A text student distilled from its teachers' K/V (module docstring): the trainer's objective interface
    (`kvdistill.objectives.base.TrainingObjective`); batches are `Collated`."""

    kind = "text"

    def __init__(self, cfg, student: nn.Module, tokenizer, teachers: list, device):
        super().__init__(cfg, student, tokenizer, teachers)
        sg = self.student_geometry
        self.pairs = {
            t.name: self.layer_pairs(tcfg, t, cfg.losses.kv, device)
            for tcfg, t in zip(cfg.teachers, teachers, strict=True)
        }
        for teacher in teachers:
            if cfg.losses.logit_kd.weight > 0 and teacher.geometry.is_encoder:
                raise KvdistillError(
                    f"losses.logit_kd needs next-token logits, but teacher '{teacher.name}' is an encoder",
                    "set losses.logit_kd.weight: 0 or drop that teacher (its K/V still align by bytes)",
                )
            if cfg.fusion.scores_teachers and teacher.geometry.is_encoder:
                raise KvdistillError(
                    f"the confidence weights score each sample by the teachers' next-token NLL, but teacher "
                    f"'{teacher.name}' is an encoder",
                    "use another fusion.kind (and router.target) or drop that teacher",
                )
        self.fusion = Fusion(cfg.fusion, len(teachers), sg.hidden_size, [t.weight for t in cfg.teachers])
        self.space = SPACES[cfg.fusion.space](cfg, sg, teachers, self.pairs)
        self.terms = TeacherTerms(cfg, sg, teachers, tokenizer)
        self.moe = MoETerms(cfg, student, teachers)  # routing, expert outputs, load balance (MoE students)
        op = cfg.train.on_policy
        self.on_policy = (
            None
            if op is None
            else OnPolicy(op, seed=cfg.train.seed, template=cfg.data.template, tokenizer=tokenizer)
        )
        # the host side of a batch (picklable, no model): the trainer runs it on DataLoader workers
        self._collator = Collator(
            tokenizer,
            [
                TeacherSide(
                    t.name,
                    t.tokenizer if t.kind == "online" else None,
                    t.geometry,
                    getattr(t, "compression", None),
                    reader=t.reader if t.kind == "cache" else None,
                    layers=sorted(set(self.pairs[t.name].teacher_layers)),
                    logits=t.kind == "cache" and cfg.losses.logit_kd.weight > 0,
                )
                for t in teachers
            ],
            max_length=cfg.data.max_length,
            max_positions=sg.max_positions,
        )
        self.to_device(device)

    @property
    def collator(self) -> Collator:
        return self._collator

    # ---------------------------------------------------------------------------------------------- one step
    def step(self, batch: Collated | list[dict], *, training: bool = True) -> Step:
        """The student's forward and every teacher's K/V of one batch (a `Collated`, or records collated
        here); held out (training=False) only the K/V, and only for a space that reports per-layer errors. The
        K/V come from the batch's pass ahead where `TeachersAhead` made one (`train.teachers_ahead`), else run
        here."""
        collated = self.as_batch(batch)
        needs = self.terms.needs() if training else dict(hidden_states=False, logits=False, attentions=False)
        sb = collated.student_batch(self.fusion.fixed.device)
        s = forward_kv(
            self.student,
            sb.ids,
            sb.mask,
            geometry=self.student_geometry,
            logits=True,
            hidden_states=needs["hidden_states"] or (training and self.fusion.needs_hidden),
            attentions=needs["attentions"],
        )
        tkvs = self.teachers_of(collated, training=training)
        return Step(sb, s, self.teachers, tkvs, self.pairs, self.fusion)

    def _data_ce(self, data: Collated) -> torch.Tensor:
        """Per-sample CE (B,) of the student on the data text of an on-policy step."""
        sb = data.student_batch(self.fusion.fixed.device)
        s = forward_kv(self.student, sb.ids, sb.mask, geometry=self.student_geometry, logits=True)
        return losses.ce_loss(s.logits, sb.ids, sb.mask)

    def teacher_pass(self, collated: Collated, *, training: bool = True) -> list:
        """Every teacher's `TeacherKV` of a collated batch, with what the terms need of them (hidden states,
        logits, attentions); none held out unless the space reports per-layer errors. A pure function of the
        batch (teachers are frozen): `TeachersAhead` runs it a batch early on another thread."""
        needs = self.terms.needs() if training else dict(hidden_states=False, logits=False, attentions=False)
        if not (training or self.space.reports_layer_errors):
            return []
        scoring = (
            training and self.fusion.needs_teacher_nll
        )  # confidence weights: each teacher scores the samples
        start = (
            scored_start(collated.records, self.cfg.fusion.confidence.span, self.cfg.data.template)
            if scoring
            else None
        )  # (B,) bytes
        tkvs = []
        for t, inputs in zip(self.teachers, collated.teachers, strict=True):
            given = (
                {} if inputs is None else {"inputs": inputs}
            )  # collated ahead: tokens, or K/V read from a cache
            tkvs.append(t.kv(collated.records, max_length=self.cfg.data.max_length, **needs, **given))
        if scoring:  # the bytes every teacher kept, scored by each one's own logits
            end = common_end([tkv.capture for tkv in tkvs])  # (B,)
            for t, tkv in zip(self.teachers, tkvs, strict=True):
                with t.lock:  # no capture hooks on the module meanwhile
                    tkv.nll_per_byte = teacher_nll_per_byte(t.model, tkv.capture, start, end)  # (B,)
        return tkvs

    def runs_teachers_ahead(self, batch: Collated) -> bool:
        """Whether the teachers' pass of `batch` (of optimizer step `batch.step`) can run ahead of its step:
        not on an on-policy step, whose teachers score text the student samples in the step itself."""
        return self.on_policy is None or batch.step is None or not self.on_policy.chosen(batch.step)

    def forward(self, batch: Collated | list[dict]):
        """(loss, metrics) of a batch (a `Collated`, or records collated here): loss a 0-dim tensor, metrics
        floats (per-sample means; `tokens` a count). On an on-policy step (train.on_policy) the terms other
        than CE score the student's samples; the generation's cost is in on_policy/* (sampled 1/0, new_tokens,
        generate_s)."""
        cfg = self.cfg
        metrics: dict[str, torch.Tensor] = {}
        data = None
        if self.on_policy is not None:
            gen = dict.fromkeys(ON_POLICY_METRICS, 0.0)
            if self.training and self.on_policy.chosen(self.train_step):
                data = self.as_batch(batch)
                sampled, gen = self.on_policy.sample(self.student, data.records, self.train_step)
                batch = self.collate(sampled)  # every tokenizer on the student's text; teachers run in `step`
            device = self.fusion.fixed.device  # with the other metrics: read back in one transfer
            metrics.update({k: torch.tensor(float(v), device=device) for k, v in gen.items()})
        step = self.step(batch)
        mask = step.batch.mask
        if data is None:
            ce = losses.ce_loss(step.student.logits, step.batch.ids, mask)  # (B,)
        else:  # CE on the data text, the student's second forward
            ce = (
                self._data_ce(data)
                if cfg.losses.ce > 0
                else mask.new_zeros(mask.shape[0], dtype=torch.float32)
            )
        metrics["loss/ce"] = ce.detach().mean()
        per_sample_loss = cfg.losses.ce * ce
        if (
            cfg.losses.logit_kd.weight > 0
        ):  # τ a pure function of the step, so a resume continues the schedule
            self.terms.temperature = cfg.losses.logit_kd.temperature_at(self.train_step, cfg.train.steps)
            metrics["logit_kd/temperature"] = ce.new_tensor(self.terms.temperature)
        regs: dict[str, tuple[float, torch.Tensor]] = {}
        terms = {"ce": (cfg.losses.ce * ce).mean()}  # what train.grad_norms_every differentiates term by term
        if self.teachers:
            if (
                cfg.losses.kv.weight > 0
            ):  # the K/V weight of this step (losses.kv.schedule), also a pure function
                self.space.kv_weight = cfg.losses.kv.weight_at(self.train_step, cfg.train.steps)
                metrics["kv/weight"] = ce.new_tensor(self.space.kv_weight)
            out = self.space(step)
            extra, term_metrics = self.terms(step, per_sample(out.weights, mask))
            per_sample_loss = per_sample_loss + out.kd + extra
            terms["kd"] = (out.kd + extra).mean()
            metrics.update(out.metrics)
            metrics.update(term_metrics)
            metrics["loss/kd"] = (out.kd + extra).detach().mean()
            sample_w = per_sample(out.weights, mask)
            for n, teacher in enumerate(self.teachers):
                metrics[f"weight/{teacher.name}"] = sample_w[:, n].detach().mean()
            regs = self.fusion.regularizer(out.weights, mask, step.hidden, step.teacher_nll)
            nll = step.teacher_nll  # (B, N) or None
            for n, teacher in enumerate(self.teachers if nll is not None else ()):
                metrics[f"nll_per_byte/{teacher.name}"] = nll[:, n].nanmean()
        if self.moe.active:
            moe, moe_metrics = self.moe(step, per_sample(out.weights, mask) if self.teachers else None)
            per_sample_loss = per_sample_loss + moe
            metrics.update(moe_metrics)
        total = per_sample_loss.mean()
        for name, (
            weight,
            value,
        ) in regs.items():  # the router's entropy term, its KL toward the confidence weights
            total = total + weight * value
            metrics[f"loss/{name}"] = value.detach()
        metrics["loss"] = total.detach()
        self.last_terms = (
            terms  # graph-attached per-term means of this batch (read by the trainer, then dropped)
        )
        return total, read_metrics(metrics, step.batch.mask_cpu)

    # ---------------------------------------------------------------------------------------------- held out
    @torch.no_grad()
    def evaluate(self, records: list[dict], batch_size: int | None = None) -> dict:
        """Held-out CE / perplexity (token-level, `losses.token_nll`) and, where the space defines it, per
        teacher the K/V error per student layer: `eval/kv_error_layers/<teacher>` (L_s entries, None where the
        layer map leaves a layer unsupervised) and its mean over mapped layers `eval/kv_error/<teacher>`. With
        a router, similarity or confidence fusion and teachers labelled with a skill, the routing accuracy of
        `fuse.routing_accuracy`: `eval/routing_acc` and `eval/routing_acc_<skill>`."""
        with self.evaluating():
            bs = batch_size or self.cfg.train.batch_size
            nll, tokens = 0.0, 0
            per_layer: dict[str, dict[int, list[float]]] = {t.name: {} for t in self.teachers}
            for lo in range(0, len(records), bs):
                step = self.step(records[lo : lo + bs], training=False)
                token, counted = losses.token_nll(step.student.logits, step.batch.ids, step.batch.mask)
                nll += float(token[counted].sum())
                tokens += int(counted.sum())
                errors = self.space.layer_errors(step) if step.records else None
                for name, layers in (errors or {}).items():
                    for i, err in layers.items():
                        per_layer[name].setdefault(i, []).extend(err.tolist())
            ce = nll / max(tokens, 1)
            out = {"eval/ce": ce, "eval/ppl": math.exp(min(ce, 50.0))}
            specialist_of = {t.skill: n for n, t in enumerate(self.cfg.teachers) if t.skill is not None}
            if specialist_of and self.cfg.fusion.kind in ("router", "similarity", "confidence"):
                weights = self.routing_weights(records, bs)  # (N, K)
                acc = routing_accuracy(weights, [r.get("skill") for r in records], specialist_of)
                out.update({f"eval/{k}": v for k, v in acc.items()})
            for name, layers in per_layer.items():
                if layers:
                    vals = [
                        sum(layers[i]) / len(layers[i]) if i in layers else None
                        for i in range(self.student_geometry.num_layers)
                    ]
                    mapped = [v for v in vals if v is not None]
                    out[f"eval/kv_error/{name}"] = sum(mapped) / len(mapped)
                    out[f"eval/kv_error_layers/{name}"] = vals
            return out

    @torch.no_grad()
    def routing_weights(self, records: list[dict], batch_size: int) -> torch.Tensor:
        """(N, K) fusion weights per record, through the training step's own path (the space's forward, with
        the student's hidden states and every teacher's K/V); per-token weights averaged over each record's
        tokens."""
        rows = []
        for lo in range(0, len(records), batch_size):
            step = self.step(records[lo : lo + batch_size], training=True)
            rows.append(per_sample(self.space(step).weights, step.batch.mask).float().cpu())  # (B, K)
        return torch.cat(rows) if rows else torch.zeros(0, len(self.teachers))

    @torch.no_grad()
    def prepare(self, records: list[dict]) -> None:
        """Fit what is fitted rather than trained (the latent maps) on `records`; a no-op for the other
        spaces."""
        self.space.prepare(
            records, self.teachers, self.pairs, self.cfg.data.max_length, self.cfg.train.batch_size
        )
        self.moe.prepare(records, self.teachers, self.cfg.data.max_length, self.cfg.train.batch_size)

    # ---------------------------------------------------------------------------------------------- reports
    def plan(self) -> dict:
        out = {"student": self.student_geometry.to_dict(), "teachers": []}
        for tcfg, teacher in zip(self.cfg.teachers, self.teachers, strict=True):
            p = alignment_plan(
                self.student_geometry,
                teacher.geometry,
                strategy=tcfg.layer_map.strategy,
                explicit=tcfg.layer_map.explicit,
                interpolate=tcfg.layer_map.interpolate,
                projector=tcfg.projector,
            )
            p["geometry"] = teacher.geometry.to_dict()
            p["source"] = teacher.kind
            out["teachers"].append(p)
        return out

    def alignment_sample(self, record: dict) -> dict:
        """Tokens of the student and every teacher for one record, and their alignment (for the report)."""
        text = record["text"]
        if not isinstance(text, ChatText):  # a conversation stays whole: each model renders its own template
            text = text[:400]

        def toks(tokenizer):
            enc = tokenize(tokenizer, [text], max_length=48)
            return tokenizer.convert_ids_to_tokens(enc["input_ids"][0].tolist()), enc["offset_mapping"][0]

        s_tok, s_spans = toks(self.tokenizer)
        out = {"text": text, "student": {"tokens": s_tok}, "teachers": {}}
        for teacher in self.teachers:
            if getattr(teacher, "tokenizer", None) is None:
                continue
            t_tok, t_spans = toks(teacher.tokenizer)
            A = token_alignment(s_spans, t_spans).to_dense()
            out["teachers"][teacher.name] = {
                "tokens": t_tok,
                "alignment": [[round(float(x), 4) for x in r] for r in A],
            }
        return out
