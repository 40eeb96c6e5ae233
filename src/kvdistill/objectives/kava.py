"""The KaVa objective: a latent-reasoning student (kvdistill.student.latent) supervised by teachers' compressed
chain-of-thought K/V, one teacher being the backbone itself in CoT mode (self-distillation, as KaVa) and any number
of others of other families and tokenizers (this project's extension).

Notation: B batch, L_s student layers, H/D KV heads/head dim (teacher n: H_n/D_n), M latent slots, P prefix columns.

    loss(b) = λ_ce·CE(answer | question, latents) + λ_cot·CE(CoT + answer | question)         (kvdistill.losses)
              + α1·CODI(b) + α2·Σ_n w_n·kv_n(b)
    kv_n(b)  = Σ_(i,j,w) w·(α_K·err(P_ni(K_s[i]), sg(K̃_n[j])) + α_V·err(P_ni(V_s[i]), sg(Ṽ_n[j]))) / (2·L_n)

K_s[i] (B, H, M, D): the student's pre-rotation keys at its latent slots in layer i; K̃_n[j] (B, H_n, M, D_n):
teacher n's CoT keys of layer j compressed to M entries per head (kvdistill.compress.latent), slot m against entry
m; (i, j, w): teacher n's layer map (the identity for the self teacher); P_ni: a learnable map from the student
into teacher n's geometry (the identity for the self teacher); err: losses.kv_error over the kept entries. CODI
compares the hidden states at the token before the answer, every layer, with the backbone's own CoT mode (detached).
The K and V errors are averaged (the 2 in kv_n), as KaVa's L_KV states it, so α2 here is KaVa's α2; α_K = α_V = 1
by default (losses.latent_kv.keys / values).
w_n: the fixed weights (self 1, others teachers.N.weight), normalised.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from kvdistill import losses
from kvdistill.align.heads import KVProjector
from kvdistill.compress.latent import latent_target, window_rows
from kvdistill.compress.select import importance_from_attention, query_rows
from kvdistill.data.segments import Segments, segments
from kvdistill.errors import KvdistillError
from kvdistill.eval.heldout import latent_answer_ce
from kvdistill.models.capture import forward_kv, tokenize_for
from kvdistill.models.geometry import geometry_of
from kvdistill.models.queries import capture_queries, query_importance, supports_queries, window_logits
from kvdistill.objectives.base import read_metrics
from kvdistill.objectives.pairs import LayerPairs
from kvdistill.student import save_student, unwrap_student
from kvdistill.student.latent import latent_view

SELF = "self"


# ---------------------------------------------------------------------------------------------- host batches
@dataclass
class CotView:
    """One model's CoT-mode batch (right-padded, CPU): ids, mask (B, T), candidates (B, T) the CoT tokens,
    answer_rows (B, T) the answer tokens, pre_answer (B,) the token before the answer, after_prefix (B, T) the
    tokens predicted in CoT CE (the last prefix token on)."""

    ids: torch.Tensor
    mask: torch.Tensor
    candidates: torch.Tensor
    answer_rows: torch.Tensor
    pre_answer: torch.Tensor
    after_prefix: torch.Tensor


def cot_view(tokenizer, geometry, records: list[dict], segs: list[Segments], max_length: int) -> CotView:
    """Tokenize the full texts (question, CoT, answer) and mark CoT, answer and the token before the answer."""
    ids, mask, spans = tokenize_for(geometry, tokenizer, [s.text for s in segs], max_length=max_length,
                                    padding_side="right")  # (B, T), (B, T), (B, T, 2) bytes
    start, end = spans[..., 0], spans[..., 1]
    content = (end > start) & mask.bool()
    cand, answer, pre, after = [], [], [], []
    for b, s in enumerate(segs):
        lo, hi, ans, pfx = s.byte(s.cot_start), s.byte(s.cot_end), s.byte(s.answer_start), s.byte(s.cot_line)
        c = content[b] & (start[b] < hi) & (end[b] > lo)
        a = content[b] & (end[b] > ans)  # tokens reaching into the answer (BPE: " 42" starts at the space)
        before = (content[b] & (end[b] <= ans)).nonzero().flatten()
        if not c.any() or not a.any() or not len(before):
            raise KvdistillError(
                f"record '{records[b].get('id')}': after truncation to data.max_length = {max_length} tokens its "
                "chain of thought or answer is missing", "raise data.max_length or drop the longest records")
        rest = content[b] & (start[b] >= pfx)
        rest = rest | torch.cat([rest[1:], rest.new_zeros(1)])  # the last prefix token predicts the first CoT token
        cand.append(c)
        answer.append(a)
        pre.append(before.max())
        after.append(rest)
    return CotView(ids, mask, torch.stack(cand).long(), torch.stack(answer).long(), torch.stack(pre),
                   torch.stack(after).long())


# ---------------------------------------------------------------------------------------------- targets
@dataclass
class LatentTargets:
    """One teacher's targets: per teacher layer j keys / values (B, H_n, M, D_n) and kept (B, H_n, M) bool."""

    keys: dict[int, torch.Tensor]
    values: dict[int, torch.Tensor]
    kept: dict[int, torch.Tensor]


def compress_cot(cap, view: CotView, layers: list[int], cfg, tokens: int, importance: dict | None,
                 valid: torch.Tensor | None = None) -> LatentTargets:
    """The CoT K/V of `cap` (a CoT-mode capture) compressed to `tokens` entries per (layer, head), detached.
    importance: layer -> (B, H, T) (scoring kava / minmax) or the window logits (B, H, Q, T) with valid (B, Q)
    (scoring rkv), from `cot_importance`."""
    device = cap.attention_mask.device
    cand = view.candidates.to(device)
    keys, values, kept = {}, {}, {}
    for j in layers:
        k, v = cap.keys[j].detach(), cap.values[j].detach()  # (B, H, T, D)
        plan = latent_target(cfg.kind, cand, tokens, keys=k, importance=None if importance is None else importance[j],
                             lam=cfg.lam, scoring=cfg.scoring, window=cfg.window, valid=valid).heads(k.shape[1])
        keys[j], values[j], kept[j] = plan.gather(k), plan.gather(v), plan.kept
    return LatentTargets(keys, values, kept)


def cached_targets(tkv, layers: list[int], tokens: int, device) -> LatentTargets:
    """A cached teacher's stored latent target (`kvdistill extract` with compression.span cot): keys / values
    (B, H, M_batch, D) and mask (B, H, M_batch), padded with entries that are not kept to `tokens`."""
    keys, values, kept = {}, {}, {}
    for j in layers:
        k, v, m = tkv.keys[j].to(device), tkv.values[j].to(device), tkv.mask[j].to(device).bool()
        short = tokens - k.shape[2]
        if short > 0:
            k = torch.nn.functional.pad(k, (0, 0, 0, short))
            v = torch.nn.functional.pad(v, (0, 0, 0, short))
            m = torch.nn.functional.pad(m, (0, short))
        keys[j], values[j], kept[j] = k.float(), v.float(), m
    return LatentTargets(keys, values, kept)


def cot_importance(model, cap, queries, view: CotView, layers: list[int], cfg) -> tuple[dict, torch.Tensor | None]:
    """(layer -> importance, valid): scorings kava / minmax: (B, H, T) the attention the answer rows pay every token,
    from hooked queries (`queries`) or the capture's eager attention, valid None; scoring rkv: the logits (B, H, Q, T)
    of R-KV's window (the last `window` CoT tokens) from hooked queries, valid (B, Q) its real rows."""
    mask = cap.attention_mask
    with torch.no_grad():
        if cfg.scoring == "rkv":
            if queries is None:
                raise KvdistillError(f"scoring rkv reads the window's attention logits from the queries, which are not "
                                     f"captured for family '{cap.geometry.model_type}'",
                                     "use scoring kava or minmax for this teacher")
            rows, valid = query_rows(window_rows(view.candidates.to(mask.device), cfg.window), mask)
            return window_logits(model, cap, queries, rows, layers), valid
        rows = view.answer_rows.to(mask.device)
        if queries is not None:
            return query_importance(model, cap, queries, rows, layers), None
        return {j: importance_from_attention(cap.attentions[j].detach(), rows, mask, cap.keys[j].shape[1])
                for j in layers}, None


# ---------------------------------------------------------------------------------------------- objective
class KavaObjective(nn.Module):
    """The latent student's objective (module docstring); the trainer's objective interface (forward, evaluate,
    prepare, plan, alignment_sample, save_student)."""

    def __init__(self, cfg, student, tokenizer, teachers: list, device):
        super().__init__()
        self.cfg = cfg
        self.student = student  # LatentStudent
        self.tokenizer = tokenizer
        self.teachers = teachers  # frozen OnlineTeachers, not part of the trained module
        sg = self.student_geometry = geometry_of(unwrap_student(student.backbone),
                                                 name=str(cfg.student.model or "student"))
        lk = cfg.losses.latent_kv
        self.uses_self = lk.weight > 0 and lk.self_teacher
        self.pairs: dict[str, LayerPairs] = {}
        self.projectors = nn.ModuleDict()
        names, weights = [], []
        if self.uses_self:
            identity = LayerPairs(torch.eye(sg.num_layers), keys_weight=lk.keys, values_weight=lk.values, device=device)
            self.pairs[SELF] = identity
            names.append(SELF)
            weights.append(1.0)
        for tcfg, t in zip(cfg.teachers, teachers, strict=True):
            if t.name == SELF:
                raise KvdistillError("a teacher may not be named 'self' (the backbone's own CoT mode is)",
                                     "rename it (teachers.N.name)")
            lp = LayerPairs.of(sg.num_layers, t.geometry.num_layers, tcfg.layer_map, lk, device)
            missing = sorted(set(lp.teacher_layers) - set(t.layers))
            if missing:
                raise KvdistillError(f"teacher '{t.name}' lacks layers {missing} that the layer map uses",
                                     "re-extract the cache with those layers, or change the teacher's layer_map")
            self.pairs[t.name] = lp
            self.projectors[t.name] = nn.ModuleList([KVProjector(sg, t.geometry, tcfg.projector) for _ in lp.i])
            names.append(t.name)
            weights.append(tcfg.weight)
        total = sum(weights)
        self.source_weights = {n: w / total for n, w in zip(names, weights, strict=True)} if total else {}
        self.to(device)
        for teacher in teachers:
            teacher.to(device)

    @property
    def device(self) -> torch.device:
        return self.student.head.init.device

    # ------------------------------------------------------------------------------------------ one step
    def _segments(self, records: list[dict]) -> list[Segments]:
        return [segments(r, self.cfg.data.template) for r in records]

    def _student_pass(self, records, segs, *, hidden: bool):
        view = latent_view(self.tokenizer, segs, self.student.tokens)
        d = self.device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        cap = self.student(view.prefix_ids.to(d), view.prefix_mask.to(d), view.suffix_ids.to(d),
                           view.suffix_mask.to(d), pad_id=pad, geometry=self.student_geometry, hidden_states=hidden)
        return cap, view

    def _cot_pass(self, model, tokenizer, geometry, records, segs, *, grad: bool, logits: bool, hidden: bool,
                  importance: bool):
        """A CoT-mode capture of `model` (the backbone with `grad`, or a frozen teacher) and its importance."""
        view = cot_view(tokenizer, geometry, records, segs, self.cfg.data.max_length)
        hooked = importance and supports_queries(geometry)
        d = self.device
        with (torch.set_grad_enabled(grad and torch.is_grad_enabled()),
              capture_queries(model, geometry) if hooked else nullcontext() as qc):
            cap = forward_kv(model, view.ids.to(d), view.mask.to(d), geometry=geometry, logits=logits,
                             hidden_states=hidden, attentions=importance and not hooked)
        return cap, view, (qc.queries if hooked else None)

    def _targets(self, records, segs, self_cap=None, self_view=None, self_queries=None) -> dict[str, LatentTargets]:
        cfg = self.cfg.losses.latent_kv.target
        M = self.student.tokens
        rkv = cfg.kind == "rkv"
        out = {}
        if self.uses_self:
            layers = self.pairs[SELF].teacher_layers
            imp, valid = (cot_importance(self.student.backbone, self_cap, self_queries, self_view, layers, cfg) if rkv
                          else (None, None))
            out[SELF] = compress_cot(self_cap, self_view, layers, cfg, M, imp, valid)
        for t in self.teachers:
            layers = self.pairs[t.name].teacher_layers
            if t.kind == "cache":  # the cache holds the latent target itself (compression.span cot)
                out[t.name] = cached_targets(t.kv(records, max_length=self.cfg.data.max_length), layers, M, self.device)
                continue
            with torch.no_grad():
                cap, view, queries = self._cot_pass(t.model, t.tokenizer, t.geometry, records, segs, grad=False,
                                                    logits=False, hidden=False, importance=rkv)
                imp, valid = cot_importance(t.model, cap, queries, view, layers, cfg) if rkv else (None, None)
                out[t.name] = compress_cot(cap, view, layers, cfg, M, imp, valid)
        return out

    def kv_terms(self, student_cap, P: int, targets: dict[str, LatentTargets]) -> dict[str, torch.Tensor]:
        """Per teacher kv_n (B,) (module docstring) from the student's latent columns P .. P+M-1."""
        lk = self.cfg.losses.latent_kv
        M = self.student.tokens
        out = {}
        for name, tgt in targets.items():
            lp = self.pairs[name]
            total = 0.0
            for p, (i, j) in enumerate(zip(lp.i, lp.j, strict=True)):
                ks = student_cap.keys[i][:, :, P : P + M]  # (B, H, M, D)
                vs = student_cap.values[i][:, :, P : P + M]
                if name != SELF:
                    proj = self.projectors[name][p]
                    ks, vs = proj(ks, "keys"), proj(vs, "values")  # (B, H_n, M, D_n)
                kept = tgt.kept[j]  # (B, H_n, M)
                err = []
                for pred, target in ((ks, tgt.keys[j]), (vs, tgt.values[j])):
                    rows_p, rows_mask = losses.as_rows(pred, kept)
                    rows_t, _ = losses.as_rows(target.to(pred.dtype), kept)
                    err.append(losses.kv_error(rows_p, rows_t, rows_mask, kind=lk.kind, normalize=lk.normalize))
                total = total + lp.coef[p, 0] * err[0] + lp.coef[p, 1] * err[1]  # (B,)
            out[name] = total / (2 * len(lp.layers))  # K and V errors averaged (KaVa's L_KV)
        return out

    def forward(self, records: list[dict]):
        """(loss, metrics) of a batch (module docstring): loss 0-dim, metrics floats (per-sample means)."""
        c = self.cfg.losses
        segs = self._segments(records)
        codi = c.codi.weight > 0
        s_cap, s_view = self._student_pass(records, segs, hidden=codi)
        P = s_view.prefix_ids.shape[1]
        d = self.device
        ids, answer_mask = s_cap.input_ids, s_view.answer_mask.to(d)
        ce = losses.ce_loss(s_cap.logits, ids, answer_mask)  # (B,) the answer after the latents
        per_sample = c.ce * ce
        metrics = {"loss/ce": ce.detach().mean()}
        t_cap = t_view = t_queries = None
        if c.cot_ce > 0 or codi or self.uses_self:
            t_cap, t_view, t_queries = self._cot_pass(
                self.student.backbone, self.tokenizer, self.student_geometry, records, segs, grad=c.cot_ce > 0,
                logits=c.cot_ce > 0, hidden=codi, importance=self.uses_self and c.latent_kv.target.kind == "rkv")
        if c.cot_ce > 0:
            cot_ce = losses.ce_loss(t_cap.logits, t_cap.input_ids, t_view.after_prefix.to(d))
            per_sample = per_sample + c.cot_ce * cot_ce
            metrics["loss/cot_ce"] = cot_ce.detach().mean()
        if codi:
            b = torch.arange(len(records), device=d)
            s_h = torch.stack([h[b, s_view.pre_answer.to(d)] for h in s_cap.hidden_states[1:]])  # (L, B, F)
            t_h = torch.stack([h[b, t_view.pre_answer.to(d)] for h in t_cap.hidden_states[1:]])
            codi_loss = losses.codi_loss(s_h, t_h, kind=c.codi.kind, normalize=c.codi.normalize)
            per_sample = per_sample + c.codi.weight * codi_loss
            metrics["loss/codi"] = codi_loss.detach().mean()
        if c.latent_kv.weight > 0:
            kv = self.kv_terms(s_cap, P, self._targets(records, segs, t_cap, t_view, t_queries))
            fused = sum(self.source_weights[n] * v for n, v in kv.items())
            per_sample = per_sample + c.latent_kv.weight * fused
            metrics.update({f"loss/latent_kv/{n}": v.detach().mean() for n, v in kv.items()})
            metrics["loss/kd"] = fused.detach().mean()
        total = per_sample.mean()
        metrics["loss"] = total.detach()
        return total, read_metrics(metrics, s_view.answer_mask)

    # ------------------------------------------------------------------------------------------ held out
    @torch.no_grad()
    def evaluate(self, records: list[dict], batch_size: int | None = None) -> dict:
        """Held-out answer CE / perplexity in latent mode (token-level, `latent_answer_ce`) and, per teacher, the latent
        K/V error `eval/latent_kv/<teacher>` (exact match: the trainer's evaluation with train.eval_exact_match,
        `kvdistill.eval.decode.latent_exact_match`)."""
        was = self.training
        self.eval()
        try:
            bs = batch_size or self.cfg.train.batch_size
            ce = latent_answer_ce(self.student, self.tokenizer, records, self.cfg.data.template, batch_size=bs,
                                  geometry=self.student_geometry)["ce"]
            out = {"eval/ce": ce, "eval/ppl": math.exp(min(ce, 50.0))}
            if self.cfg.losses.latent_kv.weight > 0:
                kv_sums: dict[str, list[float]] = {}
                for lo in range(0, len(records), bs):
                    chunk = records[lo : lo + bs]
                    segs = self._segments(chunk)
                    cap, view = self._student_pass(chunk, segs, hidden=False)
                    t_cap = t_view = t_q = None
                    if self.uses_self:
                        t_cap, t_view, t_q = self._cot_pass(
                            self.student.backbone, self.tokenizer, self.student_geometry, chunk, segs, grad=False,
                            logits=False, hidden=False, importance=self.cfg.losses.latent_kv.target.kind == "rkv")
                    kv = self.kv_terms(cap, view.prefix_ids.shape[1], self._targets(chunk, segs, t_cap, t_view, t_q))
                    for n, v in kv.items():
                        kv_sums.setdefault(n, []).extend(v.tolist())
                out.update({f"eval/latent_kv/{n}": sum(v) / len(v) for n, v in kv_sums.items()})
            return out
        finally:
            self.train(was)

    @torch.no_grad()
    def prepare(self, records: list[dict]) -> None:
        """Nothing is fitted; every record is checked to hold a question, a chain of thought and an answer in the
        template's layout (refused before the run directory is written)."""
        self._segments(records)

    # ------------------------------------------------------------------------------------------ reports
    def plan(self) -> dict:
        lat = self.cfg.student.latent
        return {"student": self.student_geometry.to_dict(),
                "latent": {"tokens": lat.tokens, "iterations": lat.iterations, "projection": lat.projection,
                           "head": lat.head},
                "target": self.cfg.losses.latent_kv.target.model_dump(),
                "teachers": [{"name": n, "weight": w, "pairs": [[i, j, x] for i, j, x in zip(
                    self.pairs[n].i, self.pairs[n].j, self.pairs[n].w, strict=True)]}
                    for n, w in self.source_weights.items()]}

    def alignment_sample(self, record: dict) -> dict:
        s = segments(record, self.cfg.data.template)
        return {"text": s.text, "student": {"prefix": s.prefix, "latent_tokens": self.student.tokens,
                                            "suffix": s.suffix}, "teachers": {}}

    def save_student(self, out_dir) -> None:
        save_student(self.student.backbone, self.tokenizer, str(out_dir))
        self.student.save_head(out_dir)
