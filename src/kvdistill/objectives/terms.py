"""Per-teacher terms beside the K/V of the fusion space: relation, attention KL, hidden states and logit KD.

Notation: B batch, T_s student tokens, M = T_t teacher tokens (these terms need online, uncompressed
teachers), H heads, F_s/F_t hidden widths, V vocabulary.

Each term is a `kvdistill.losses` function on the teacher's tokens, averaged over the teacher's layer pairs
(i, j, w) as the K/V term is (Σ w·term / #mapped layers); logit KD is one term per teacher. Teacher n's terms
are weighed by its per-sample fusion weight w_n(b) (per-token weights: their mean over the sample's tokens).
Logit KD with a teacher of the student's tokenizer is the exact same-vocabulary term (embeddings padded to
different sizes compare their shared entries); with another tokenizer it goes through the byte alignment
(`losses.logit_kd.cross_tokenizer`: the shared-string projection at prefix partners, or aligned-chunk
likelihoods):

    extra(b) = Σ_n w_n(b) · (λ_rel·rel_n + λ_att·att_n + λ_hid·hid_n + λ_logit·kd_n)(b)
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from kvdistill import losses
from kvdistill.align.tokens import common_chunks, prefix_positions, teacher_alignment
from kvdistill.align.vocab import VocabProjection, shared_vocabulary
from kvdistill.errors import KvdistillError
from kvdistill.objectives.space import Step

log = logging.getLogger(__name__)

TERMS = ("relation", "attention_kl", "hidden", "logit_kd")


class TeacherTerms(nn.Module):
    """The per-teacher terms of `cfg.losses` with a weight > 0; hidden states get a learnable F_s -> F_t
    map."""

    def __init__(self, cfg, student_geometry, teachers: list, tokenizer=None):
        super().__init__()
        c = cfg.losses
        self.scale = {
            "relation": c.relation,
            "attention_kl": c.attention_kl,
            "hidden": c.hidden,
            "logit_kd": c.logit_kd.weight,
        }
        self.logit = c.logit_kd
        self.temperature = (
            c.logit_kd.temperature
        )  # the objective sets each step's τ (losses.logit_kd.schedule)
        self.active = [t for t in TERMS if self.scale[t] > 0]
        # one tokenizer, embeddings padded to different sizes (e.g. 151,936 vs 152,064 entries): logit KD
        # compares the entries both models have, renormalised over them; the padded rows name no token
        self.shared_vocab = {
            t.name: min(student_geometry.vocab_size, t.geometry.vocab_size) for t in teachers
        }
        # another tokenizer: the teachers' names -> None (span) or the shared-string projection (project), on
        # the CPU
        self.cross: dict[str, VocabProjection | None] = {}
        for t in teachers if "logit_kd" in self.active else []:
            if getattr(t, "tokenizer", None) is None or tokenizer is None:
                raise KvdistillError(
                    f"losses.logit_kd needs teacher '{t.name}''s tokenizer to align its logits",
                    f"run teacher '{t.name}' online, or set losses.logit_kd.weight: 0",
                )
            if t.tokenizer.get_vocab() != tokenizer.get_vocab():
                self.cross[t.name] = (
                    None
                    if c.logit_kd.cross_tokenizer == "span"
                    else shared_vocabulary(
                        tokenizer, t.tokenizer, student_geometry.vocab_size, t.geometry.vocab_size, t.name
                    )
                )
                log.info(
                    "logit KD with teacher %s across tokenizers (%s%s)",
                    t.name,
                    c.logit_kd.cross_tokenizer,
                    "" if self.cross[t.name] is None else f", {self.cross[t.name].shared} shared strings",
                )
            elif t.geometry.vocab_size != student_geometry.vocab_size:
                log.info(
                    "logit KD with teacher %s compares the %d shared vocabulary entries (student %d, "
                    "teacher %d)",
                    t.name,
                    self.shared_vocab[t.name],
                    student_geometry.vocab_size,
                    t.geometry.vocab_size,
                )
        self.hidden_proj = nn.ModuleDict(
            {
                t.name: nn.Linear(student_geometry.hidden_size, t.geometry.hidden_size, bias=False)
                for t in teachers
            }
            if c.hidden > 0
            else {}
        )

    def needs(self) -> dict[str, bool]:
        """What the student and the teachers must capture."""
        return dict(
            hidden_states="hidden" in self.active,
            logits="logit_kd" in self.active,
            attentions="attention_kl" in self.active,
        )

    def forward(self, step: Step, weights: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """extra (B,) and metrics; weights (B, N) per-sample fusion weights."""
        B = step.batch.mask.shape[0]
        extra = torch.zeros(B, device=step.batch.mask.device)
        metrics: dict[str, torch.Tensor] = {}
        if not self.active:
            return extra, metrics
        for n, teacher in enumerate(step.teachers):
            for name, value in self.teacher_terms(step, n).items():
                extra = extra + weights[:, n] * self.scale[name] * value
                metrics[f"loss/{name}/{teacher.name}"] = value.detach().mean()
        return extra, metrics

    def teacher_terms(self, step: Step, n: int) -> dict[str, torch.Tensor]:
        """Each active term of teacher n, per sample (B,), before its loss weight."""
        teacher, tkv = step.teachers[n], step.records[n]
        lp = step.pairs[teacher.name]
        s, b = step.student, step.batch
        cap = tkv.capture
        j0 = lp.j[0]
        out: dict[str, torch.Tensor] = {}
        L = len(lp.layers)
        per_layer = any(t in self.active for t in ("relation", "attention_kl", "hidden"))
        if per_layer:
            A = teacher_alignment(tkv.spans[j0], tkv.mask[j0], b.spans, b.mask).float()  # (B, M, T_s)
            covered = (A.sum(-1) > 0).long() * tkv.mask[
                j0
            ]  # (B, M) teacher tokens some student token overlaps
        for i, j, w in zip(lp.i, lp.j, lp.w, strict=True) if per_layer else ():
            if "relation" in self.active:  # student keys resampled onto the teacher's tokens
                k_on_t = torch.einsum("bmt,bhtd->bhmd", A, s.keys[i].float())  # (B, H_s, M, D_s)
                out["relation"] = (
                    out.get("relation", 0) + w * losses.relation_loss(k_on_t, tkv.keys[j], covered) / L
                )
            if "attention_kl" in self.active:  # teacher attention moved onto the student grid: Aᵀ P A
                p_on_s = torch.einsum(
                    "bmt,bhmn,bnu->bhtu", A, cap.attentions[j].float(), A
                )  # (B, H_t, T_s, T_s)
                p_on_s = p_on_s / p_on_s.sum(-1, keepdim=True).clamp(min=1e-9)
                reached = (A.sum(1) > 0).long() * b.mask  # (B, T_s) student tokens covered by the teacher
                value = losses.attention_kl(s.attentions[i].float(), p_on_s, reached)
                out["attention_kl"] = out.get("attention_kl", 0) + w * value / L
            if "hidden" in self.active:
                h_s = self.hidden_proj[teacher.name](s.hidden_states[i + 1].float())  # (B, T_s, F_t)
                h_pred = torch.einsum("bmt,btf->bmf", A, h_s)  # (B, M, F_t)
                value = losses.hidden_error(h_pred, cap.hidden_states[j + 1].float(), covered)
                out["hidden"] = out.get("hidden", 0) + w * value / L
        if "logit_kd" in self.active:
            out["logit_kd"] = self.logit_term(step, n)
        return out

    def logit_term(self, step: Step, n: int) -> torch.Tensor:
        """Teacher n's logit KD per sample (B,): the same-vocabulary term for one tokenizer, else the
        cross-tokenizer term of `losses.logit_kd.cross_tokenizer`; with `top_k` against the teacher's top-k
        and a tail bucket (a cached teacher's top-k come from its cache, `TeacherKV.logits`, at this step's
        τ)."""
        teacher, tkv = step.teachers[n], step.records[n]
        s, b, cap = step.student, step.batch, tkv.capture
        c, k = self.logit, self.logit.top_k
        kw = dict(temperature=self.temperature, divergence=c.divergence, beta=c.beta, chunk=c.chunk)
        stored = tkv.logits  # a cached teacher's top-k (validate requires top_k for it)
        if teacher.name not in self.cross:
            V = self.shared_vocab[teacher.name]
            if stored is not None:
                ids, lp = stored.at(self.temperature, k)  # (B, T_t, k) ids, log-probabilities at τ
                if ids.shape[1] != s.logits.shape[1]:
                    raise KvdistillError(
                        f"teacher '{teacher.name}''s cached logits cover {ids.shape[1]} positions, the "
                        "student's batch "
                        f"{s.logits.shape[1]}: the same tokenizer should give the same tokens",
                        "re-extract the cache with this run's data (data.max_length) and tokenizer",
                    )
                ids, lp = _within(ids, lp, V)
            elif k is None:
                return losses.logit_kd(s.logits[..., :V], cap.logits[..., :V], b.mask, **kw)
            else:
                ids, lp = losses.topk_log_probs(
                    cap.logits[..., :V], k, temperature=self.temperature, chunk=c.chunk
                )
            return losses.topk_logit_kd(s.logits[..., :V], ids, lp, b.mask, **kw)
        if stored is not None:  # every token's spans, whatever the cache kept of the K/V
            spans_t, mask_t = stored.spans.cpu(), stored.mask.cpu()
        else:
            spans_t, mask_t = tkv.host_spans(
                step.pairs[teacher.name].j[0]
            )  # (B, T_t, 2), (B, T_t) on the CPU
        if self.cross[teacher.name] is None:  # span; the chunks (B, T_s), (B, T_t) on the CPU
            s_chunks, t_chunks = common_chunks(b.spans_cpu, b.mask_cpu, spans_t, mask_t)
            return losses.span_logit_kd(
                s.logits,
                cap.logits,
                b.ids,
                cap.input_ids,
                b.mask,
                cap.attention_mask,
                s_chunks,
                t_chunks,
                **kw,
            )
        proj = self.cross[teacher.name]  # on the CPU: checked and planned there, no device synchronisation
        positions = prefix_positions(b.spans_cpu, b.mask_cpu, spans_t, mask_t)  # (B, T_s) on the CPU
        if stored is not None:
            target = stored.at(self.temperature, k)
        else:
            target = (
                cap.logits
                if k is None
                else losses.topk_log_probs(cap.logits, k, temperature=self.temperature, chunk=c.chunk)
            )
        return losses.cross_logit_kd(
            s.logits, target, positions, b.mask, proj.student, proj.teacher, shared=proj.shared, **kw
        )


def _within(ids: torch.Tensor, log_probs: torch.Tensor, V: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A cached top-k restricted to the first V entries (embeddings padded to different sizes): an id at or
    past V (a padded row of the teacher's) gets log-probability -inf, so its mass joins the tail bucket, and
    id 0 (a placeholder the loss sees as carrying no mass)."""
    past = ids >= V  # (B, T, k)
    if not bool(past.any()):
        return ids, log_probs
    return ids.masked_fill(past, 0), log_probs.masked_fill(past, float("-inf"))
