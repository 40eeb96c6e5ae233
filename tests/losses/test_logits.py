"""token_nll / ce_loss / logit_kd against independent references: a sliced log-softmax for CE, the closed
forms of forward KL, reverse KL and the generalised JSD written with probabilities, at several temperatures,
with padding and with vocabulary entries that both sides make impossible (-inf). Chunked equals unchunked
(value and gradient); the top-k variant equals its closed form with a tail bucket; the cross-tokenizer
projection with one tokenizer is `logit_kd`; on three real tokenizer pairs it equals a brute-force loop over
the prefix partners, and the span (chunk likelihood) variant a loop over the chunks both tokenizations
spell."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from kvdistill import losses as L
from kvdistill.align.tokens import common_chunks, prefix_positions
from kvdistill.align.vocab import shared_vocabulary
from kvdistill.errors import KvdistillError
from kvdistill.models.capture import tokenize


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_ce_equals_sliced_log_softmax_reference_with_gradient():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 9, 50, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, labels[:, 1:, None]).squeeze(-1)  # (B, T-1)
    m = (mask[:, 1:] * mask[:, :-1]).float()
    ref = -(logp * m).sum(1) / m.sum(1)
    got = L.ce_loss(logits, labels, mask)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    g_ref, g_got = (torch.autograd.grad(x.sum(), logits)[0] for x in (ref, got))
    torch.testing.assert_close(g_got, g_ref, rtol=1e-6, atol=1e-7)
    nll, counted = L.token_nll(logits, labels, mask)
    assert counted.sum() == m.sum() and not counted[:, -1].any()
    with pytest.raises(KvdistillError, match="label id 50 is outside the vocabulary of 50"):
        L.ce_loss(logits, torch.full((3, 9), 50), mask)


def _reference(s, t, mask, tau, divergence, beta):
    """Per-sample divergence · τ², averaged over counted positions, from probabilities (0·log 0 = 0)."""
    p_s, p_t = torch.softmax(s / tau, -1), torch.softmax(t / tau, -1)

    def kl(p, q):
        terms = torch.where(
            p > 0, p * (p.clamp_min(1e-300).log() - q.clamp_min(1e-300).log()), torch.zeros(())
        )
        return terms.sum(-1)

    if divergence == "forward":
        div = kl(p_t, p_s)
    elif divergence == "reverse":
        div = kl(p_s, p_t)
    else:
        m = beta * p_t + (1 - beta) * p_s
        div = beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)
    m = mask.double()
    return (div * tau**2 * m).sum(1) / m.sum(1).clamp(min=1)


@pytest.mark.parametrize("divergence, beta", [("forward", 0.5), ("reverse", 0.5), ("jsd", 0.5), ("jsd", 0.1)])
@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0, 4.0])
def test_logit_kd_equals_closed_form(divergence, beta, tau):
    s, t = _rand(3, 6, 11, seed=1) * 3, _rand(3, 6, 11, seed=2) * 3
    s[..., 7:] = t[..., 7:] = -math.inf  # an impossible tail on both sides
    s[2, 4:] = float("nan")  # garbage at padded positions changes nothing
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
    s.requires_grad_()
    got = L.logit_kd(s, t, mask, temperature=tau, divergence=divergence, beta=beta)
    ref = _reference(s.detach().nan_to_num(0.0), t, mask, tau, divergence, beta)
    torch.testing.assert_close(got, ref.float(), rtol=1e-5, atol=1e-6)
    assert torch.isfinite(got).all() and (got > 0).all()
    got.sum().backward()
    assert torch.isfinite(s.grad).all()
    assert s.grad[..., 7:].abs().sum() == 0 and s.grad[2, 4:].abs().sum() == 0


def test_logit_kd_golden_and_zero_on_equal_distributions():
    s = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])
    t = torch.tensor([[[3.0, 2.0, 1.0], [9.0, 9.0, 9.0]]])
    tau = 2.0
    ps, pt = torch.softmax(s[0, 0] / tau, -1).tolist(), torch.softmax(t[0, 0] / tau, -1).tolist()
    kl = sum(b * math.log(b / a) for a, b in zip(ps, pt, strict=True)) * tau**2
    assert L.logit_kd(s, t, torch.tensor([[1, 0]]), temperature=tau).item() == pytest.approx(kl, rel=1e-5)
    assert L.logit_kd(s, t, torch.ones(1, 2), temperature=tau).item() == pytest.approx(kl / 2, rel=1e-5)
    for div in ("forward", "reverse", "jsd"):
        assert L.logit_kd(t, t, torch.ones(1, 2), divergence=div).abs().item() < 1e-6
    # JSD is bounded by ln 2 per position before τ²
    far = torch.tensor([[[50.0, -50.0]]]), torch.tensor([[[-50.0, 50.0]]])
    assert L.logit_kd(*far, torch.ones(1, 1), temperature=1.0, divergence="jsd").item() == pytest.approx(
        math.log(2), rel=1e-4
    )


def test_logit_kd_errors():
    with pytest.raises(KvdistillError, match="(?s)logit KD needs the same vocabulary.*use cross_logit_kd"):
        L.logit_kd(torch.zeros(1, 2, 5), torch.zeros(1, 2, 6), torch.ones(1, 2))
    with pytest.raises(KvdistillError, match="divergence 'tvd' is unknown"):
        L.logit_kd(torch.zeros(1, 2, 5), torch.zeros(1, 2, 5), torch.ones(1, 2), divergence="tvd")
    with pytest.raises(KvdistillError, match=r"jsd beta \(1.0\) must lie strictly between 0 and 1"):
        L.logit_kd(torch.zeros(1, 2, 5), torch.zeros(1, 2, 5), torch.ones(1, 2), divergence="jsd", beta=1.0)
    with pytest.raises(KvdistillError, match=r"chunk \(-1\) must be >= 0"):
        L.logit_kd(torch.zeros(1, 2, 5), torch.zeros(1, 2, 5), torch.ones(1, 2), chunk=-1)
    with pytest.raises(KvdistillError, match=r"top-k k \(5\) must lie in \[1, 4\]"):
        L.topk_log_probs(torch.zeros(1, 2, 5), 5)
    with pytest.raises(KvdistillError, match=r"teacher_ids hold ids outside \[0, 5\)"):
        L.topk_logit_kd(
            torch.zeros(1, 2, 5), torch.full((1, 2, 2), 7), torch.zeros(1, 2, 2), torch.ones(1, 2)
        )
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


def _grad(fn, x):
    x = x.detach().clone().requires_grad_()
    value = fn(x)
    return value.detach(), torch.autograd.grad(value.sum(), x)[0]


@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("chunk", [1, 4, 7])
def test_chunked_equals_unchunked_value_and_gradient(divergence, chunk):
    """Every logit KD function, cut into chunks of positions (recomputed in backward), gives the one-pass
    value and gradient; padded positions (NaN there) stay out of both."""
    B, T, V = 3, 6, 13
    s, t = _rand(B, T, V, seed=3) * 2, _rand(B, T, V, seed=4) * 2
    s[1, 4:] = float("nan")
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
    ids, lp = L.topk_log_probs(t, 5, temperature=1.5)
    pos = torch.tensor(
        [[0, 2, -1, 3, 4, 5], [1, 1, 2, 3, 0, 0], [5, 4, 3, 2, 1, 0]]
    )  # any partners, one missing
    s_b = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 7, 8, 8, 8, 9])  # two merged buckets, bucket 9 = other
    t_b = torch.tensor([9, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 2])
    calls = {
        "logit_kd": lambda x, c: L.logit_kd(x, t, mask, temperature=1.5, divergence=divergence, chunk=c),
        "topk": lambda x, c: L.topk_logit_kd(
            x, ids, lp, mask, temperature=1.5, divergence=divergence, chunk=c
        ),
        "cross": lambda x, c: L.cross_logit_kd(
            x, t, pos, mask, s_b, t_b, shared=9, temperature=1.5, divergence=divergence, chunk=c
        ),
        "cross_topk": lambda x, c: L.cross_logit_kd(
            x, (ids, lp), pos, mask, s_b, t_b, shared=9, temperature=1.5, divergence=divergence, chunk=c
        ),
    }
    for name, fn in calls.items():
        v0, g0 = _grad(lambda x, fn=fn: fn(x, 0), s)
        v1, g1 = _grad(lambda x, fn=fn: fn(x, chunk), s)
        assert torch.isfinite(v0).all() and (v0 > 0).all(), name
        torch.testing.assert_close(v1, v0, rtol=1e-6, atol=1e-7, msg=name)
        torch.testing.assert_close(g1, g0, rtol=1e-6, atol=1e-8, msg=name)
        assert torch.isfinite(g0).all() and g0[1, 4:].abs().sum() == 0 and g0[2, 2:].abs().sum() == 0, name


def _kl_np(p, q):
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q, strict=True) if a > 0)


@pytest.mark.parametrize("divergence, beta", [("forward", 0.5), ("reverse", 0.5), ("jsd", 0.3)])
def test_topk_with_tail_equals_its_closed_form(divergence, beta):
    """k + 1 events: the teacher's top k ids with their probabilities and the rest of the mass as one bucket,
    on both sides; written out with Python floats from softmax probabilities."""
    tau, k = 1.7, 3
    s, t = _rand(2, 4, 9, seed=5) * 2, _rand(2, 4, 9, seed=6) * 2
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    ids, lp = L.topk_log_probs(t, k, temperature=tau)
    got = L.topk_logit_kd(s, ids, lp, mask, temperature=tau, divergence=divergence, beta=beta)
    ref = []
    for b in range(2):
        terms = []
        for i in range(int(mask[b].sum())):
            p_t = torch.softmax(t[b, i] / tau, -1).tolist()
            p_s = torch.softmax(s[b, i] / tau, -1).tolist()
            top = sorted(range(9), key=lambda v: -p_t[v])[:k]
            assert sorted(top) == sorted(ids[b, i].tolist())
            pt = [p_t[v] for v in top] + [1 - sum(p_t[v] for v in top)]
            ps = [p_s[v] for v in top] + [1 - sum(p_s[v] for v in top)]
            if divergence == "forward":
                d = _kl_np(pt, ps)
            elif divergence == "reverse":
                d = _kl_np(ps, pt)
            else:
                m = [beta * a + (1 - beta) * c for a, c in zip(pt, ps, strict=True)]
                d = beta * _kl_np(pt, m) + (1 - beta) * _kl_np(ps, m)
            terms.append(d * tau**2)
        ref.append(sum(terms) / len(terms))
    torch.testing.assert_close(got, torch.tensor(ref, dtype=torch.float32), rtol=2e-5, atol=1e-6)
    # the whole vocabulary but one entry: the tail is that entry, so it is logit_kd
    ids, lp = L.topk_log_probs(t, 8, temperature=tau)
    full = L.logit_kd(s, t, mask, temperature=tau, divergence=divergence, beta=beta)
    torch.testing.assert_close(
        L.topk_logit_kd(s, ids, lp, mask, temperature=tau, divergence=divergence, beta=beta),
        full,
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_cross_logit_kd_with_one_tokenizer_is_logit_kd(divergence, tau):
    """Identity buckets and every position its own partner: the projection changes nothing, value and
    gradient, also with a masked (-inf) vocabulary tail and padding."""
    s, t = _rand(3, 6, 11, seed=1) * 3, _rand(3, 6, 11, seed=2) * 3
    s[..., 9:] = t[..., 9:] = -math.inf
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
    ident = torch.arange(11)
    pos = torch.arange(6).expand(3, 6)
    v0, g0 = _grad(lambda x: L.logit_kd(x, t, mask, temperature=tau, divergence=divergence), s)
    v1, g1 = _grad(
        lambda x: L.cross_logit_kd(
            x, t, pos, mask, ident, ident, shared=11, temperature=tau, divergence=divergence, chunk=4
        ),
        s,
    )
    torch.testing.assert_close(v1, v0, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g1, g0, rtol=1e-6, atol=1e-8)


@functools.cache
def _tokenizer(name: str):
    from kvdistill.models.load import load_tokenizer

    return load_tokenizer(name)


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

    def kl(p, q):
        return torch.where(p > 0, p * (p.clamp_min(1e-300).log() - q.clamp_min(1e-300).log()), 0.0).sum()

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
            if divergence == "forward":
                d = kl(p_t, p_s)
            elif divergence == "reverse":
                d = kl(p_s, p_t)
            else:
                m = beta * p_t + (1 - beta) * p_s
                d = beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)
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
    s_tok, t_tok = _tokenizer(student_name), _tokenizer(teacher_name)
    se, te = tokenize(s_tok, texts, max_length=24), tokenize(t_tok, texts, max_length=20)
    V_s, V_t = len(s_tok) + 3, len(t_tok)  # the student's logits padded past its tokenizer
    proj = shared_vocabulary(s_tok, t_tok, V_s, V_t)
    pos = prefix_positions(
        se["offset_mapping"], se["attention_mask"], te["offset_mapping"], te["attention_mask"]
    )
    B, T_s, T_t = len(texts), se["input_ids"].shape[1], te["input_ids"].shape[1]
    s, t = _rand(B, T_s, V_s, seed=7) * 4, _rand(B, T_t, V_t, seed=8) * 4
    tau, beta = 1.5, 0.4 if divergence == "jsd" else 0.5
    got, g_got = _grad(
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
    ref, g_ref = _grad(
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


def _brute_span(s, t, se, te, s_chunk, t_chunk, tau, divergence, beta):
    """Per sample, per chunk: the chain-rule log-probability of each side's tokens of the chunk, token by
    token from log_softmax(logits[i - 1] / τ), then the divergence of the two-outcome distributions (P, 1 -
    P)."""

    def kl(p, q):
        return sum(torch.where(a > 0, a * (a.log() - c.log()), 0.0) for a, c in zip(p, q, strict=True))

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
            if divergence == "forward":
                d = kl(p_t, p_s)
            elif divergence == "reverse":
                d = kl(p_s, p_t)
            else:
                m = beta * p_t + (1 - beta) * p_s
                d = beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)
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
    s_tok, t_tok = _tokenizer(student_name), _tokenizer(teacher_name)
    se, te = tokenize(s_tok, texts, max_length=24), tokenize(t_tok, texts, max_length=20)
    s_chunk, t_chunk = common_chunks(
        se["offset_mapping"], se["attention_mask"], te["offset_mapping"], te["attention_mask"]
    )
    B, T_s, T_t = len(texts), se["input_ids"].shape[1], te["input_ids"].shape[1]
    s, t = _rand(B, T_s, 301, seed=9), _rand(B, T_t, 257, seed=10)  # small random vocabularies: ids mod V
    se = {k: v % 301 if k == "input_ids" else v for k, v in se.items()}
    te = {k: v % 257 if k == "input_ids" else v for k, v in te.items()}
    tau, beta = 1.3, 0.3 if divergence == "jsd" else 0.5
    got, g_got = _grad(
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
    ref, g_ref = _grad(lambda x: _brute_span(x, t, se, te, s_chunk, t_chunk, tau, divergence, beta), s)
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


def test_cross_topk_equals_its_closed_form():
    """A top-k teacher across vocabularies: the buckets its named entries reach, each with their summed
    probability, and one tail with everything else (its unnamed mass, its entries in "other", the buckets it
    does not reach) on both sides; written out with Python floats."""
    tau, k = 1.4, 4
    s_b = torch.tensor([0, 1, 2, 3, 4, 4, 5, 5])  # student: 8 entries, buckets 0..4 named, 5 = other
    t_b = torch.tensor([0, 0, 1, 2, 3, 4, 5, 5, 5, 2])  # teacher: 10 entries
    s, t = _rand(1, 3, 8, seed=11) * 2, _rand(1, 3, 10, seed=12) * 2
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
        terms.append(_kl_np(pt, ps) * tau**2)
    assert got.item() == pytest.approx(sum(terms) / 3, rel=2e-5)


@pytest.mark.parametrize("fn", ["logit_kd", "cross_logit_kd"])
def test_chunked_holds_no_float32_copy_of_the_logits_for_backward(fn):
    """What a call keeps for its backward, beyond views of its own inputs: one pass keeps float32 (B·T, V)
    softmaxes; chunked, nothing (each chunk is recomputed in backward from views of the inputs)."""
    B, T, V = 2, 32, 500
    s, t = (
        torch.randn(B, T, V, dtype=torch.bfloat16, requires_grad=True),
        torch.randn(B, T, V, dtype=torch.bfloat16),
    )
    mask, ident, pos = torch.ones(B, T), torch.arange(V), torch.arange(T).expand(B, T)
    inputs = {s.untyped_storage().data_ptr(), t.untyped_storage().data_ptr()}

    def kept(chunk):
        new = []

        def pack(x):
            if x.untyped_storage().data_ptr() not in inputs and x.is_floating_point():
                new.append(x.numel() * x.element_size())
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            if fn == "logit_kd":
                value = L.logit_kd(s, t, mask, chunk=chunk)
            else:
                value = L.cross_logit_kd(s, t, pos, mask, ident, ident, shared=V, chunk=chunk)
        value.sum().backward()
        return sum(new)

    assert kept(0) >= 2 * B * T * V * 4  # at least two float32 (B·T, V) tensors
    assert kept(8) <= B * T * 8  # no more than a few bytes per position


@pytest.mark.parametrize("name", ["gpt2-tokenizer", "smollm2-135m"])
def test_cross_logit_kd_through_one_real_tokenizer_is_logit_kd(name):
    """The whole cross-tokenizer path (shared_vocabulary, prefix_positions, cross_logit_kd) with the student's
    own tokenizer on both sides gives the same-tokenizer loss, value and gradient."""
    tok = _tokenizer(name)
    enc = tokenize(tok, ["Question: Compute 3 + 4.\nAnswer: 7", "東京 has 3 🍎"], max_length=16)
    V = len(tok)
    proj = shared_vocabulary(tok, tok, V, V)
    pos = prefix_positions(
        enc["offset_mapping"], enc["attention_mask"], enc["offset_mapping"], enc["attention_mask"]
    )
    s, t = (
        _rand(2, enc["input_ids"].shape[1], V, seed=13) * 3,
        _rand(2, enc["input_ids"].shape[1], V, seed=14) * 3,
    )
    mask = enc["attention_mask"]
    v0, g0 = _grad(lambda x: L.logit_kd(x, t, mask, temperature=1.5, divergence="jsd"), s)
    v1, g1 = _grad(
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
