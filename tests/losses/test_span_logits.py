"""span_logit_kd (the likelihood of text both tokenizations spell exactly): on three real tokenizer pairs it
equals a brute-force loop over the chunks, chunked and unchunked."""

from __future__ import annotations

import pytest
import torch
from tests.losses.reference import divergence as divergence_of
from tests.losses.reference import rand64, tokenizer, value_and_grad

from kvdistill import losses as L
from kvdistill.align.tokens import common_chunks
from kvdistill.models.capture import tokenize


def _brute_span(s, t, se, te, s_chunk, t_chunk, tau, divergence, beta):
    """Per sample, per chunk: the chain-rule log-probability of each side's tokens of the chunk, token by
    token from log_softmax(logits[i - 1] / τ), then the divergence of the two-outcome distributions (P, 1 -
    P)."""

    out = []
    for b in range(s.shape[0]):
        chunks = sorted(set(s_chunk[b].tolist()) - {-1})
        terms = []
        for c in chunks:
            logp = []
            for x, enc, ch in ((s, se, s_chunk), (t, te, t_chunk)):
                idx = [i for i in range(ch.shape[1]) if ch[b, i] == c]
                if any(i == 0 or not enc["attention_mask"][b, i - 1] for i in idx):
                    break
                logp.append(
                    sum(torch.log_softmax(x[b, i - 1] / tau, -1)[enc["input_ids"][b, i]] for i in idx)
                )
            if len(logp) < 2:
                continue
            p_s, p_t = (torch.stack([lp.exp(), 1 - lp.exp()]) for lp in logp)
            d = divergence_of(p_t, p_s, divergence, beta)
            terms.append(d * tau**2)
        out.append(torch.stack(terms).mean() if terms else s.new_zeros(()))
    return torch.stack(out)


@pytest.mark.parametrize(
    "student_name, teacher_name, divergence",
    [
        ("gpt2-tokenizer", "smollm2-135m", "reverse"),
        ("smollm2-135m", "llama2-tokenizer", "jsd"),
        ("llama2-tokenizer", "gpt2-tokenizer", "forward"),
    ],
)
def test_span_logit_kd_equals_bruteforce_on_real_tokenizer_pairs(student_name, teacher_name, divergence):
    texts = ["Question: Compute 3 + 4.\nAnswer: 7", "東京 has 3 🍎, naïve café"]
    s_tok, t_tok = tokenizer(student_name), tokenizer(teacher_name)
    se, te = tokenize(s_tok, texts, max_length=24), tokenize(t_tok, texts, max_length=20)
    s_chunk, t_chunk = common_chunks(
        se["offset_mapping"], se["attention_mask"], te["offset_mapping"], te["attention_mask"]
    )
    B, T_s, T_t = len(texts), se["input_ids"].shape[1], te["input_ids"].shape[1]
    s, t = rand64(B, T_s, 301, seed=9), rand64(B, T_t, 257, seed=10)  # small random vocabularies: ids mod V
    se = {k: v % 301 if k == "input_ids" else v for k, v in se.items()}
    te = {k: v % 257 if k == "input_ids" else v for k, v in te.items()}
    tau, beta = 1.3, 0.3 if divergence == "jsd" else 0.5
    got, g_got = value_and_grad(
        lambda x: L.span_logit_kd(
            x,
            t,
            se["input_ids"],
            te["input_ids"],
            se["attention_mask"],
            te["attention_mask"],
            s_chunk,
            t_chunk,
            temperature=tau,
            divergence=divergence,
            beta=beta,
            chunk=5,
        ),
        s,
    )
    ref, g_ref = value_and_grad(
        lambda x: _brute_span(x, t, se, te, s_chunk, t_chunk, tau, divergence, beta), s
    )
    assert (ref > 0).all()
    torch.testing.assert_close(got, ref.float(), rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-4, atol=1e-7)
    # unchunked: the same value
    whole = L.span_logit_kd(
        s,
        t,
        se["input_ids"],
        te["input_ids"],
        se["attention_mask"],
        te["attention_mask"],
        s_chunk,
        t_chunk,
        temperature=tau,
        divergence=divergence,
        beta=beta,
    )
    torch.testing.assert_close(whole, got, rtol=1e-6, atol=1e-7)
