"""The one held-out CE loop: token-level CE and perplexity of a student on held-out records, for a text
student (every next token of each record's text) and a latent student (the answer after the question and the
latents, as training's answer CE counts it). `kvdistill eval`, the experiment runner, the quickstart and
training's held-out evaluations all call these.

Notation: B batch, T tokens (text mode), P prefix columns, M latent slots, S suffix columns, V vocab.

CE is the mean next-token NLL (`kvdistill.losses.token_nll`) over every counted token of the records, not a
mean of per-record means: ce = Σ nll / Σ tokens, ppl = exp(min(ce, 50)).

A batch's forward runs in slices of `logit_rows` rows so that no slice holds more than `LOGIT_ELEMENTS`
vocabulary logits: the batch size chooses how many records are tokenized (and padded) together, the slices
bound the (rows, T, V) logits, their float32 copy and softcapping.
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

__all__ = ["LOGIT_ELEMENTS", "latent_answer_ce", "logit_rows", "mean_nll", "perplexity"]

LOGIT_ELEMENTS = 2**28
"""At most this many vocabulary logits (rows × T × V) in one forward of the held-out loops: 1 GiB in
float32. Without it a 256k-vocabulary teacher's perplexity at batch 128 × 320 tokens asked for 35 GiB at once
and died of CUDA out of memory on an 80 GB H100 (the specialists spec, 2026-12-08); it now runs 3 rows at a
time."""


def logit_rows(vocab: int, width: int, batch: int) -> int:
    """How many of a batch's `batch` rows of `width` columns one forward may hold: their (rows, width, vocab)
    logits at most LOGIT_ELEMENTS, at least one row."""
    return max(1, min(batch, LOGIT_ELEMENTS // max(1, width * vocab)))


def _vocab(model, tokenizer) -> int:
    """V of the model's logits: its output embedding's rows (a model without one: the tokenizer's size)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if weight is not None else len(tokenizer)


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
    vocab = _vocab(model, tokenizer)

    def scored():
        for batch in batches(records, batch_size, "perplexity" if progress else None):
            enc = tokenize(tokenizer, [r["text"] for r in batch], max_length=max_length, padding_side="right")
            ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)  # (B, T)
            rows = logit_rows(vocab, ids.shape[1], ids.shape[0])
            for lo in range(0, ids.shape[0], rows):
                part, part_mask = ids[lo : lo + rows], mask[lo : lo + rows]  # (rows, T)
                yield model(input_ids=part, attention_mask=part_mask).logits, part, part_mask  # (rows, T, V)

    return mean_nll(scored())


@torch.no_grad()
def latent_answer_ce(
    student, tokenizer, records: list[dict], template: str, *, batch_size: int, geometry=None
) -> dict:
    """{ce, ppl, tokens} of a latent student in latent mode over the answer (and its line break) after the
    question and the M latents, on the records with an answer (template mode)."""
    device = student.head.init.device
    usable = [r for r in records if r.get("answer")]
    vocab = _vocab(student.backbone, tokenizer)

    def scored():
        for lo in range(0, len(usable), batch_size):
            view = latent_view(
                tokenizer, [segments(r, template) for r in usable[lo : lo + batch_size]], student.tokens
            )  # prefix (B, P), suffix (B, S), answer_mask (B, P+M+S)
            B, width = view.answer_mask.shape
            rows = logit_rows(vocab, width, B)
            for r0 in range(0, B, rows):
                part = slice(r0, r0 + rows)
                cap = student(
                    view.prefix_ids[part].to(device),
                    view.prefix_mask[part].to(device),
                    view.suffix_ids[part].to(device),
                    view.suffix_mask[part].to(device),
                    pad_id=pad_id(tokenizer),
                    geometry=geometry,
                )  # logits (rows, P+M+S, V)
                yield cap.logits, cap.input_ids, view.answer_mask[part].to(device)

    return mean_nll(scored())
