"""The one held-out CE loop: token-level CE and perplexity of a student on held-out records, for a text
student (every next token of each record's text) and a latent student (the answer after the question and the
latents, as training's answer CE counts it). `kvdistill eval`, the experiment runner, the quickstart and
training's held-out evaluations all call these.

Notation: B batch, T tokens (text mode), P prefix columns, M latent slots, S suffix columns, V vocab.

CE is the mean next-token NLL (`kvdistill.losses.token_nll`) over every counted token of the records, not a
mean of per-record means: ce = Σ nll / Σ tokens, ppl = exp(min(ce, 50)).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from kvdistill import losses
from kvdistill.data.segments import segments
from kvdistill.eval.decode import batches, pad_id
from kvdistill.models.capture import tokenize
from kvdistill.student.latent import latent_view

__all__ = ["latent_answer_ce", "mean_nll", "perplexity"]


def mean_nll(scored: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> dict:
    """{ce, ppl, tokens} over batches of (logits (B, T, V), labels (B, T), mask (B, T): 1 = a label
    counted)."""
    nll_sum, count = 0.0, 0
    for logits, labels, mask in scored:
        nll, counted = losses.token_nll(logits, labels, mask)  # (B, T) each
        nll_sum += float(nll[counted].sum())
        count += int(counted.sum())
    ce = nll_sum / max(count, 1)
    return {"ce": ce, "ppl": math.exp(min(ce, 50.0)), "tokens": count}


@torch.no_grad()
def perplexity(
    model, tokenizer, records: list[dict], *, max_length: int, batch_size: int = 8, progress: bool = False
) -> dict:
    """{ce, ppl, tokens} of a text model over every next token of the records' texts (right-padded
    batches)."""
    device = next(model.parameters()).device

    def scored():
        for batch in batches(records, batch_size, "perplexity" if progress else None):
            enc = tokenize(tokenizer, [r["text"] for r in batch], max_length=max_length, padding_side="right")
            ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)  # (B, T)
            yield model(input_ids=ids, attention_mask=mask).logits, ids, mask  # (B, T, V)

    return mean_nll(scored())


@torch.no_grad()
def latent_answer_ce(
    student, tokenizer, records: list[dict], template: str, *, batch_size: int, geometry=None
) -> dict:
    """{ce, ppl, tokens} of a latent student in latent mode over the answer (and its line break) after the
    question and the M latents, on the records with an answer (template mode)."""
    device = student.head.init.device
    usable = [r for r in records if r.get("answer")]

    def scored():
        for lo in range(0, len(usable), batch_size):
            view = latent_view(
                tokenizer, [segments(r, template) for r in usable[lo : lo + batch_size]], student.tokens
            )  # prefix (B, P), suffix (B, S), answer_mask (B, P+M+S)
            cap = student(
                view.prefix_ids.to(device),
                view.prefix_mask.to(device),
                view.suffix_ids.to(device),
                view.suffix_mask.to(device),
                pad_id=pad_id(tokenizer),
                geometry=geometry,
            )
            yield cap.logits, cap.input_ids, view.answer_mask.to(device)

    return mean_nll(scored())
