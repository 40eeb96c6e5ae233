"""The held-out CE loops run a batch in slices bounded by LOGIT_ELEMENTS and give what one forward of the
whole batch gives (the brute-force per-sample reference of perplexity is in test_metrics.py)."""

from __future__ import annotations

import pytest
import torch
from tests.eval.test_decode import latent_student

from kvdistill.eval import heldout
from kvdistill.eval.heldout import latent_answer_ce, logit_rows, perplexity


def test_logit_rows_bounds_the_slice():
    budget = heldout.LOGIT_ELEMENTS
    # the specialists' gemma teacher: 128 rows of 320 tokens over 256,000 logits -> 3 rows at a time
    assert logit_rows(256_000, 320, 128) == budget // (320 * 256_000) == 3
    assert logit_rows(50_257, 96, 8) == 8  # a small batch is never split
    assert logit_rows(10**9, 10**3, 16) == 1  # one row even when a row alone is over the budget
    for vocab, width, batch in [(61, 7, 5), (256_000, 320, 128), (151_936, 200, 64)]:
        rows = logit_rows(vocab, width, batch)
        assert 1 <= rows <= batch and (rows == 1 or rows * width * vocab <= budget)


class Rows:
    """Records the rows of every forward of a model."""

    def __init__(self, model):
        self.seen: list[int] = []
        model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        self.seen.append(int((ids if ids is not None else embeds).shape[0]))


def test_perplexity_in_slices_equals_one_forward(smollm2, monkeypatch):
    from kvdistill.data.arith import arithmetic_records

    model, tok = smollm2
    records = arithmetic_records(6, 3) + [{"id": "short", "text": "Hi."}]  # right padding in the batch
    whole = perplexity(model, tok, records, max_length=32, batch_size=7)
    vocab = model.get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(heldout, "LOGIT_ELEMENTS", 2 * 32 * vocab)  # 2 rows of at most 32 tokens
    rows = Rows(model)
    sliced = perplexity(model, tok, records, max_length=32, batch_size=7)
    assert rows.seen == [2, 2, 2, 1]
    assert sliced["tokens"] == whole["tokens"]
    assert sliced["ce"] == pytest.approx(whole["ce"], abs=1e-5)


def test_latent_answer_ce_in_slices_equals_one_forward(monkeypatch):
    from kvdistill.data.arith import arithmetic_records
    from kvdistill.data.gsm import DEFAULT_TEMPLATE
    from kvdistill.models.load import load_tokenizer

    tok = load_tokenizer("gpt2-tokenizer")
    records = arithmetic_records(5, 3, template=DEFAULT_TEMPLATE)
    student = latent_student(len(tok), iterations=2)
    whole = latent_answer_ce(student, tok, records, DEFAULT_TEMPLATE, batch_size=5)
    monkeypatch.setattr(heldout, "LOGIT_ELEMENTS", 1)  # one row a forward
    rows = Rows(student.backbone)
    sliced = latent_answer_ce(student, tok, records, DEFAULT_TEMPLATE, batch_size=5)
    assert rows.seen and max(rows.seen) == 1  # every backbone pass (the latents' and the answer's) one row
    assert sliced["tokens"] == whole["tokens"] > 0
    assert sliced["ce"] == pytest.approx(whole["ce"], abs=1e-6)  # token_nll scores in float32
    assert torch.isfinite(torch.tensor(sliced["ce"]))
