"""Weights over the teachers of a batch: fixed, similarity to teacher prototypes, the teachers' own
confidence, or a learned router (trained on the weighted K/V loss, or toward the confidence weights).

Notation: B batch, T_s student tokens, N teachers, F_n the width a teacher's similarity is computed in, K
prototypes.

The weights are (B, N) per sample, or (B, T_s, N) per student token (`fusion.router.per_token`). Similarity
compares, per teacher, a query pooled from the student's side with the teacher's prototypes (mean / first /
max pooling, or the k-means centres of the sample's teacher tokens), in the space the fusion runs in: the
teacher's geometry (loss space, through the trained projector), the student's (target space, through the
frozen maps) or Z (latent space). Confidence weights come from every teacher's NLL per byte of the sample's
scored text (`kvdistill.fuse.confidence`), computed in the teachers' pass (`teacher_nll_per_byte`). A router
with `router.target: confidence` is trained by KL(confidence weights || its weights) alone: the K/V loss sees
its weights detached.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kvdistill import losses
from kvdistill.data.template import question_prompt
from kvdistill.errors import KvdistillError
from kvdistill.fuse import (
    Router,
    byte_nll,
    confidence_weights,
    covered_end,
    entropy_regularizer,
    fixed_weights,
    prototype,
    router_target_kl,
    similarity_weights,
)


@dataclass
class SimilarityInputs:
    """One teacher's side of similarity routing: query rows from the student, key rows of the teacher, both
    (B, N_rows, F_n) on the same rows, with the rows that count (B, N_rows)."""

    query: torch.Tensor
    key: torch.Tensor
    mask: torch.Tensor


class Fusion(nn.Module):
    """The fusion weights of `cfg.fusion` for N teachers over a student of width `hidden_size`."""

    def __init__(self, cfg, num_teachers: int, hidden_size: int, teacher_weights: list[float]):
        super().__init__()
        self.cfg = cfg
        self.kind = cfg.kind
        self.per_token = cfg.kind == "router" and cfg.router.per_token
        self.register_buffer(
            "fixed",
            fixed_weights(cfg.weights or teacher_weights) if num_teachers else torch.zeros(0),
            persistent=False,
        )
        self.router = (
            Router(hidden_size, num_teachers, kind=cfg.router.kind, per_token=cfg.router.per_token)
            if cfg.kind == "router"
            else None
        )
        self.supervised = (
            cfg.kind == "router" and cfg.router.target == "confidence"
        )  # trained toward confidence

    @property
    def needs_hidden(self) -> bool:
        return self.router is not None

    @property
    def needs_teacher_nll(self) -> bool:
        """Whether the teachers' pass must score each sample (`teacher_nll_per_byte`)."""
        return self.cfg.scores_teachers

    def token_weights(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-token router weights (B, T_s, N) from the student's last hidden states (B, T_s, F_s), detached
        from the student; also from the router when it is trained toward the confidence weights instead."""
        w = self.router(hidden.detach().float(), mask)
        return w.detach() if self.supervised else w

    def weights(
        self,
        hidden: torch.Tensor | None,
        mask: torch.Tensor,
        similarity: list[SimilarityInputs] | None = None,
        teacher_nll: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, N) weights per sample, or (B, T_s, N) per token (router with per_token). teacher_nll (B, N):
        every teacher's NLL per byte of each sample (`Step.teacher_nll`), read by kind confidence."""
        B = mask.shape[0]
        if self.kind == "fixed":
            return self.fixed[None].expand(B, -1)
        if self.kind == "confidence":
            if teacher_nll is None:
                raise KvdistillError(
                    "fusion.kind confidence was given no teacher NLL for this batch",
                    "run the teachers online (the objective's teacher pass scores each sample)",
                )
            return confidence_weights(teacher_nll, self.cfg.confidence.temperature).to(mask.device)
        if self.kind == "router":
            w = self.router(hidden.detach().float(), mask)
            return w.detach() if self.supervised else w
        sim = self.cfg.similarity
        pool = "mean" if sim.prototype == "kmeans" else sim.prototype
        queries = [
            prototype(s.query.detach().float(), s.mask, kind=pool)[:, 0] for s in similarity
        ]  # (B, F_n)
        protos = [
            prototype(s.key.detach().float(), s.mask, kind=sim.prototype, k=sim.kmeans_k) for s in similarity
        ]
        return similarity_weights(queries, protos, metric=sim.metric, temperature=sim.temperature)  # (B, N)

    def regularizer(
        self,
        weights: torch.Tensor,
        mask: torch.Tensor,
        hidden: torch.Tensor | None = None,
        teacher_nll: torch.Tensor | None = None,
    ) -> dict[str, tuple[float, torch.Tensor]]:
        """The router's terms to add to the loss: name -> (weight, 0-dim value); empty without a router.

        "entropy" (fusion.entropy, when its weight > 0) on the router's weights; "router_target"
        (router.target confidence): KL(confidence weights || router weights). A router trained toward the
        confidence weights is run again here on `hidden` (the weights the space used are detached from it)."""
        if self.router is None:
            return {}
        if self.supervised:
            if hidden is None or teacher_nll is None:
                raise KvdistillError(
                    "the router trained toward the confidence weights got no hidden states or teacher NLL",
                    "pass the step's hidden states and teacher_nll",
                )
            weights = self.router(hidden.detach().float(), mask)  # (B, N) or (B, T_s, N), with gradient
        token_mask = mask if weights.dim() == 3 else None
        out = {}
        if self.cfg.entropy.weight > 0:
            out["entropy"] = (
                self.cfg.entropy.weight,
                entropy_regularizer(weights, target=self.cfg.entropy.target, mask=token_mask),
            )
        if self.supervised:
            target = confidence_weights(teacher_nll, self.cfg.confidence.temperature).to(
                weights.device
            )  # (B, N)
            out["router_target"] = (
                self.cfg.router.target_weight,
                router_target_kl(weights, target, token_mask),
            )
        return out


SCORE_CHUNK = 4
"""Samples per scoring forward of a teacher: its (chunk, T_t, V) logits are all that exist at once (a
262k-entry vocabulary at batch 16 x 320 tokens would otherwise hold 2.7 GB of bf16 logits per teacher)."""


@torch.no_grad()
def teacher_nll_per_byte(
    model: nn.Module, capture, start: torch.Tensor, end: torch.Tensor | None = None, chunk: int = SCORE_CHUNK
) -> torch.Tensor:
    """One teacher's NLL per byte of each sample's scored text (B,) (`fuse.confidence.byte_nll`), from its own
    logits on its own tokens: the K/V capture's input_ids, attention_mask, positions (B, T_t) and byte spans
    (B, T_t, 2) run through the teacher again `chunk` samples at a time (the K/V pass skips the LM head), each
    sample's NLL computed alone (its float32 log-softmax is the only one held). start, end (B,): each sample's
    scored bytes (end None: to the end of this teacher's tokens)."""
    rows = []
    ids, mask, positions, spans = capture.input_ids, capture.attention_mask, capture.positions, capture.spans
    for lo in range(0, ids.shape[0], chunk):
        hi = min(lo + chunk, ids.shape[0])
        logits = model(input_ids=ids[lo:hi], attention_mask=mask[lo:hi], position_ids=positions[lo:hi]).logits
        for b in range(lo, hi):  # logits (hi - lo, T_t, V)
            nll, counted = losses.token_nll(logits[b - lo : b - lo + 1], ids[b : b + 1], mask[b : b + 1])
            rows.append(
                byte_nll(
                    nll,
                    counted,
                    spans[b : b + 1].to(nll.device),
                    start[b : b + 1].to(nll.device),
                    None if end is None else end[b : b + 1].to(nll.device),
                )
            )
        del logits
    return torch.cat(rows)


def common_end(captures: list) -> torch.Tensor:
    """(B,) the last byte every teacher's (possibly truncated) tokens cover, from their captures' spans and
    masks."""
    ends = [covered_end(c.spans.to(c.attention_mask.device), c.attention_mask).cpu() for c in captures]
    return torch.stack(ends).amin(0)


def scored_start(records: list[dict], span: str, template: str) -> torch.Tensor:
    """(B,) the UTF-8 byte offset where each record's scored text begins (`fusion.confidence.span`): 0 for the
    whole text, else the end of the question line of the data template (the labelled continuation)."""
    if span == "text":
        return torch.zeros(len(records), dtype=torch.long)
    starts = []
    for r in records:
        if not r.get("question") or type(r["text"]) is not str:  # a conversation's text is a ChatText
            raise KvdistillError(
                f"record '{r.get('id')}' has no question line (a plain-text or chat record), so "
                "fusion.confidence.span continuation cannot tell where its continuation starts",
                "set fusion.confidence.span: text (the whole text is scored)",
            )
        try:
            prompt = question_prompt(r, template)
        except KvdistillError as err:
            raise KvdistillError(
                f"fusion.confidence.span continuation scores what follows the question: {err.problem}",
                "set fusion.confidence.span: text (the whole text is scored), or use template-mode records",
            ) from None
        starts.append(len(prompt.encode("utf-8", "surrogatepass")))
    return torch.tensor(starts, dtype=torch.long)


def per_sample(weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, N) weights: per-sample weights as they are, per-token (B, T_s, N) averaged over counted tokens."""
    if weights.dim() == 2:
        return weights
    m = mask.to(weights.dtype)[..., None]  # (B, T_s, 1)
    return (weights * m).sum(1) / m.sum(1).clamp(min=1.0)
