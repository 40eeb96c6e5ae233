"""cross_logit_kd (projection onto the shared strings of two vocabularies): with one tokenizer it is
`logit_kd` (also through the whole path of a real tokenizer); on three real tokenizer pairs it equals a
brute-force loop over the prefix partners; a top-k teacher equals its closed form with a tail bucket; bad
input is refused."""

from __future__ import annotations

import math

import pytest
import torch
from tests.losses.reference import divergence as divergence_of
from tests.losses.reference import kl_np, rand64, tokenizer, value_and_grad

from kvdistill import losses as L
from kvdistill.align.tokens import prefix_positions
from kvdistill.align.vocab import shared_vocabulary
from kvdistill.errors import KvdistillError
from kvdistill.models.capture import tokenize


def test_cross_logit_kd_errors():
    ident = torch.arange(5)
    with pytest.raises(KvdistillError, match=r"teacher_positions reach 9 but the teacher has 2 positions"):
        L.cross_logit_kd(
            torch.zeros(1, 2, 5),
            torch.zeros(1, 2, 5),
            torch.tensor([[0, 9]]),
            torch.ones(1, 2),
            ident,
            ident,
            shared=5,
        )
    with pytest.raises(KvdistillError, match=r"student_buckets \(5,\) must hold one bucket in \[0, 3\]"):
        L.cross_logit_kd(
            torch.zeros(1, 2, 5),
            torch.zeros(1, 2, 5),
            torch.tensor([[0, 1]]),
            torch.ones(1, 2),
            ident,
            ident.clamp(max=3),
            shared=3,
        )


@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_cross_logit_kd_with_one_tokenizer_is_logit_kd(divergence, tau):
    """Identity buckets and every position its own partner: the projection changes nothing, value and
    gradient, also with a masked (-inf) vocabulary tail and padding."""
    s, t = rand64(3, 6, 11, seed=1) * 3, rand64(3, 6, 11, seed=2) * 3
    s[..., 9:] = t[..., 9:] = -math.inf
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
    ident = torch.arange(11)
    pos = torch.arange(6).expand(3, 6)
    v0, g0 = value_and_grad(lambda x: L.logit_kd(x, t, mask, temperature=tau, divergence=divergence), s)
    v1, g1 = value_and_grad(
        lambda x: L.cross_logit_kd(
            x, t, pos, mask, ident, ident, shared=11, temperature=tau, divergence=divergence, chunk=4
        ),
        s,
    )
    torch.testing.assert_close(v1, v0, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g1, g0, rtol=1e-6, atol=1e-8)


def _brute_cross(s, t, s_spans, s_mask, t_spans, t_mask, proj, tau, divergence, beta):
    """Per sample: for each real student position, its teacher partner found by comparing the bytes read so
    far, both softmaxes summed into the shared buckets entry by entry (index_add), the divergence written with
    probabilities; the mean over positions with a partner."""

    def reads(spans, mask):
        state, extra, out_ = 0, 0, []
        for (a, e), m in zip(spans.tolist(), mask.tolist(), strict=True):
            if e > a:
                state, extra = max(state, e), 0
            else:
                extra += 1
            out_.append((state, extra) if m else None)
        return out_

    out = []
    for b in range(s.shape[0]):
        t_reads = reads(t_spans[b], t_mask[b])
        terms = []
        for i, key in enumerate(reads(s_spans[b], s_mask[b])):
            js = [j for j, k in enumerate(t_reads) if key is not None and k == key]
            if not js:
                continue
            p_s = torch.zeros(proj.shared + 1, dtype=s.dtype).index_add(
                0, proj.student, torch.softmax(s[b, i] / tau, -1)
            )
            p_t = torch.zeros(proj.shared + 1, dtype=s.dtype).index_add(
                0, proj.teacher, torch.softmax(t[b, js[-1]] / tau, -1)
            )
            d = divergence_of(p_t, p_s, divergence, beta)
            terms.append(d * tau**2)
        out.append(torch.stack(terms).mean() if terms else s.new_zeros(()))
    return torch.stack(out)


@pytest.mark.parametrize(
    "student_name, teacher_name, divergence",
    [
        ("gpt2-tokenizer", "smollm2-135m", "forward"),
        ("smollm2-135m", "llama2-tokenizer", "reverse"),
        ("llama2-tokenizer", "gpt2-tokenizer", "jsd"),
    ],
)
def test_cross_logit_kd_equals_bruteforce_on_real_tokenizer_pairs(student_name, teacher_name, divergence):
    texts = ["Question: Compute 3 + 4.\nAnswer: 7", "東京 has 3 🍎, naïve café"]
    s_tok, t_tok = tokenizer(student_name), tokenizer(teacher_name)
    se, te = tokenize(s_tok, texts, max_length=24), tokenize(t_tok, texts, max_length=20)
    V_s, V_t = len(s_tok) + 3, len(t_tok)  # the student's logits padded past its tokenizer
    proj = shared_vocabulary(s_tok, t_tok, V_s, V_t)
    pos = prefix_positions(
        se["offset_mapping"], se["attention_mask"], te["offset_mapping"], te["attention_mask"]
    )
    B, T_s, T_t = len(texts), se["input_ids"].shape[1], te["input_ids"].shape[1]
    s, t = rand64(B, T_s, V_s, seed=7) * 4, rand64(B, T_t, V_t, seed=8) * 4
    tau, beta = 1.5, 0.4 if divergence == "jsd" else 0.5
    got, g_got = value_and_grad(
        lambda x: L.cross_logit_kd(
            x,
            t,
            pos,
            se["attention_mask"],
            proj.student,
            proj.teacher,
            shared=proj.shared,
            temperature=tau,
            divergence=divergence,
            beta=beta,
            chunk=16,
        ),
        s,
    )
    ref, g_ref = value_and_grad(
        lambda x: _brute_cross(
            x,
            t,
            se["offset_mapping"],
            se["attention_mask"],
            te["offset_mapping"],
            te["attention_mask"],
            proj,
            tau,
            divergence,
            beta,
        ),
        s,
    )
    assert (ref > 0).all()
    torch.testing.assert_close(got, ref.float(), rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-4, atol=1e-7)


def test_cross_topk_equals_its_closed_form():
    """A top-k teacher across vocabularies: the buckets its named entries reach, each with their summed
    probability, and one tail with everything else (its unnamed mass, its entries in "other", the buckets it
    does not reach) on both sides; written out with Python floats."""
    tau, k = 1.4, 4
    s_b = torch.tensor([0, 1, 2, 3, 4, 4, 5, 5])  # student: 8 entries, buckets 0..4 named, 5 = other
    t_b = torch.tensor([0, 0, 1, 2, 3, 4, 5, 5, 5, 2])  # teacher: 10 entries
    s, t = rand64(1, 3, 8, seed=11) * 2, rand64(1, 3, 10, seed=12) * 2
    mask, pos = torch.ones(1, 3), torch.tensor([[2, 0, 1]])
    ids, lp = L.topk_log_probs(t, k, temperature=tau)
    got = L.cross_logit_kd(s, (ids, lp), pos, mask, s_b, t_b, shared=5, temperature=tau)
    terms = []
    for i in range(3):
        p_s = torch.softmax(s[0, i] / tau, -1).tolist()
        p_t = torch.softmax(t[0, int(pos[0, i])] / tau, -1).tolist()
        top = ids[0, int(pos[0, i])].tolist()
        hit = sorted({int(t_b[v]) for v in top if int(t_b[v]) < 5})
        pt = [sum(p_t[v] for v in top if int(t_b[v]) == c) for c in hit]
        ps = [sum(p_s[v] for v in range(8) if int(s_b[v]) == c) for c in hit]
        pt.append(max(1 - sum(pt), L.TAIL_FLOOR))
        ps.append(1 - sum(ps))
        terms.append(kl_np(pt, ps) * tau**2)
    assert got.item() == pytest.approx(sum(terms) / 3, rel=2e-5)


@pytest.mark.parametrize("name", ["gpt2-tokenizer", "smollm2-135m"])
def test_cross_logit_kd_through_one_real_tokenizer_is_logit_kd(name):
    """The whole cross-tokenizer path (shared_vocabulary, prefix_positions, cross_logit_kd) with the student's
    own tokenizer on both sides gives the same-tokenizer loss, value and gradient."""
    tok = tokenizer(name)
    enc = tokenize(tok, ["Question: Compute 3 + 4.\nAnswer: 7", "東京 has 3 🍎"], max_length=16)
    V = len(tok)
    proj = shared_vocabulary(tok, tok, V, V)
    pos = prefix_positions(
        enc["offset_mapping"], enc["attention_mask"], enc["offset_mapping"], enc["attention_mask"]
    )
    s, t = (
        rand64(2, enc["input_ids"].shape[1], V, seed=13) * 3,
        rand64(2, enc["input_ids"].shape[1], V, seed=14) * 3,
    )
    mask = enc["attention_mask"]
    v0, g0 = value_and_grad(lambda x: L.logit_kd(x, t, mask, temperature=1.5, divergence="jsd"), s)
    v1, g1 = value_and_grad(
        lambda x: L.cross_logit_kd(
            x,
            t,
            pos,
            mask,
            proj.student,
            proj.teacher,
            shared=proj.shared,
            temperature=1.5,
            divergence="jsd",
            chunk=8,
        ),
        s,
    )
    torch.testing.assert_close(v1, v0, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g1, g0, rtol=1e-6, atol=1e-8)
