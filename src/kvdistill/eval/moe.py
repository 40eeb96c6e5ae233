"""Routing agreement of an MoE student with an MoE teacher on held-out records: top-1 agreement and top-k
overlap.

Both models run on each record (their own tokenizers); the teacher's routing distribution of each MoE block
pair (`align.experts.block_pairs`) is moved onto the student's experts by the expert correspondence (identity
for equal expert counts, else fitted from the teacher's routing on these records, `fit_correspondence`) and
onto the student's tokens' mixture by the character alignment, as in training (`losses.routing_agreement`).
Figures are per-sample means over the teacher's real tokens, averaged over block pairs and then over samples.
"""

from __future__ import annotations

import torch

from kvdistill import losses
from kvdistill.align.experts import block_pairs, fit_correspondence
from kvdistill.align.tokens import teacher_alignment_sparse
from kvdistill.models.capture import tokenize_for
from kvdistill.models.geometry import geometry_of
from kvdistill.models.moe import capture_moe, require_moe


def _routing(model, tokenizer, texts, max_length, layers):
    """(per block logp (B, T, E), mask (B, T), spans (B, T, 2)) of one batch."""
    ids, mask, spans = tokenize_for(
        geometry_of(model), tokenizer, texts, max_length=max_length, padding_side="right"
    )
    device = next(model.parameters()).device
    with torch.no_grad(), capture_moe(model, layers=layers) as cap:
        model(input_ids=ids.to(device), attention_mask=mask.to(device))
    B, T = ids.shape
    logp = [
        losses.routing_log_probs(cap.router_logits[i].reshape(B, T, -1).float().cpu(), layer.scoring)
        for i, layer in enumerate(layers)
    ]
    return logp, mask, spans


@torch.no_grad()
def routing_agreement_of(
    student,
    student_tokenizer,
    teacher,
    teacher_tokenizer,
    records: list[dict],
    *,
    max_length: int,
    batch_size: int = 16,
) -> dict[str, float]:
    """{"routing_top1": mean top-1 agreement, "routing_topk": mean top-k overlap (k = the student's
    top-k)}."""
    s_layers, t_layers = require_moe(student, "the student"), require_moe(teacher, "the teacher")
    pairs = block_pairs(len(s_layers), len(t_layers))
    batches = []
    for lo in range(0, len(records), batch_size):
        texts = [r["text"] for r in records[lo : lo + batch_size]]
        batches.append(
            (
                _routing(student, student_tokenizer, texts, max_length, s_layers),
                _routing(teacher, teacher_tokenizer, texts, max_length, t_layers),
            )
        )
    corrs = []
    for i, j in pairs:
        e_s, e_t = s_layers[i].num_experts, t_layers[j].num_experts
        if e_s == e_t:
            corrs.append(torch.eye(e_s))
            continue
        probs = torch.cat([t_logp[j].exp()[t_mask.bool()] for _, (t_logp, t_mask, _) in batches])  # (N, E_t)
        corrs.append(fit_correspondence(probs, e_s))
    top1, topk = [], []
    for (s_logp, s_mask, s_spans), (t_logp, t_mask, t_spans) in batches:
        index, weight = teacher_alignment_sparse(t_spans, t_mask, s_spans, s_mask, device="cpu")
        index, weight = index[:, 0], weight[:, 0]  # (B, M, K)
        a1 = torch.zeros(t_mask.shape[0])
        ak = torch.zeros(t_mask.shape[0])
        for (i, j), corr in zip(pairs, corrs, strict=True):
            x1, xk = losses.routing_agreement(
                s_logp[i], t_logp[j], t_mask, index, weight, corr, s_layers[i].top_k
            )
            a1, ak = a1 + x1 / len(pairs), ak + xk / len(pairs)
        top1.append(a1)
        topk.append(ak)
    return {"routing_top1": float(torch.cat(top1).mean()), "routing_topk": float(torch.cat(topk).mean())}
