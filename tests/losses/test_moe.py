"""Routing KL, routing agreement, expert-output MSE and load balance == brute-force loops, on the router
logits and expert outputs of tiny Mixtral / Qwen2-MoE models, with padding, with one tokenizer and with two
(the alignment)."""

from __future__ import annotations

import math

import pytest
import torch
from tests.moe_tiny import moe_model

from kvdistill import losses
from kvdistill.align.tokens import batch_token_alignment, batch_token_alignment_sparse
from kvdistill.models.capture import tokenize
from kvdistill.models.load import load_tokenizer
from kvdistill.models.moe import capture_moe

TEXTS = [
    "Question: 12 + 7 = ?\nAnswer: 19",
    "Hi there",
    "Compute 3 * (4 - 1) step by step: 4 - 1 = 3, 3 * 3 = 9.",
]


def _captured(family: str, tokenizer, *, experts: int, seed: int, hidden: int = 32):
    """A tiny model's capture on TEXTS (right padding): mask (B, T), spans (B, T, 2), per block (B, T,
    ...)."""
    model = moe_model(family, vocab_size=len(tokenizer), experts=experts, seed=seed, hidden_size=hidden)
    enc = tokenize(tokenizer, TEXTS, max_length=64, padding_side="right")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad(), capture_moe(model, experts=True) as cap:
        model(input_ids=ids, attention_mask=mask)
    B, T = ids.shape
    return (
        mask,
        enc["offset_mapping"] * mask[..., None],
        [cap.by_token(i, B, T) for i in range(len(cap.layers))],
    )


def _identity_alignment(mask):
    B, T = mask.shape
    index = torch.arange(T).view(1, T, 1).expand(B, T, 1).clone()
    return index, mask[..., None].float()


@pytest.fixture(scope="module")
def pair_one_tokenizer():
    tok = load_tokenizer("gpt2-tokenizer")
    s = _captured("mixtral", tok, experts=4, seed=0)
    t = _captured("qwen2_moe", tok, experts=6, seed=1, hidden=48)
    return s, t


@pytest.fixture(scope="module")
def pair_two_tokenizers():
    s = _captured("mixtral", load_tokenizer("gpt2-tokenizer"), experts=4, seed=0)
    t = _captured("qwen2_moe", load_tokenizer("llama2-tokenizer"), experts=6, seed=1, hidden=48)
    return s, t


def _corr(e_t: int, e_s: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = torch.rand(e_t, e_s, generator=g) * (torch.rand(e_t, e_s, generator=g) > 0.4)
    c[torch.arange(e_t), torch.arange(e_t) % e_s] += 0.5  # every row has mass
    return c / c.sum(1, keepdim=True)


def _brute_routing(p_s, p_t, t_mask, A, corr, kind, top_k):
    """KL per sample by loops in float64: p_s (B, T_s, E_s), p_t (B, M, E_t) probabilities, A (B, M, T_s)
    dense."""
    B, M, E_t = p_t.shape
    E_s = p_s.shape[-1]
    out = []
    for b in range(B):
        total, count = 0.0, 0
        for m in range(M):
            if not t_mask[b, m] or A[b, m].sum() == 0:
                continue
            ps = [
                sum(float(A[b, m, t]) * float(p_s[b, t, s]) for t in range(p_s.shape[1])) for s in range(E_s)
            ]
            pt = [float(x) for x in p_t[b, m]]
            support = set(range(E_s))
            if kind == "topk":
                top = sorted(range(E_t), key=lambda e: -pt[e])[:top_k]
                pt = [pt[e] if e in top else 0.0 for e in range(E_t)]
                z = sum(pt)
                pt = [x / z for x in pt]
                support = {s for e in top for s in range(E_s) if corr[e, s] > 0}
                z = sum(ps[s] for s in support)
                ps = [ps[s] / z if s in support else 0.0 for s in range(E_s)]
            q = [sum(pt[e] * float(corr[e, s]) for e in range(E_t)) for s in range(E_s)]
            total += sum(q[s] * (math.log(q[s]) - math.log(ps[s])) for s in range(E_s) if q[s] > 0)
            count += 1
        out.append(total / max(count, 1))
    return torch.tensor(out, dtype=torch.float64)


def _inputs(pair, two_tokenizers):
    (s_mask, s_spans, s_blocks), (t_mask, t_spans, t_blocks) = pair
    if two_tokenizers:
        index, weight = batch_token_alignment_sparse(t_spans, t_mask, s_spans, s_mask)
        A = batch_token_alignment(t_spans, t_mask, s_spans, s_mask)  # (B, M, T_s) dense, the reference's path
    else:
        index, weight = _identity_alignment(t_mask)
        A = torch.diag_embed(t_mask.float())
    return s_mask, s_blocks, t_mask, t_blocks, index, weight, A


@pytest.mark.parametrize("two_tokenizers", [False, True])
@pytest.mark.parametrize("kind", ["full", "topk"])
def test_routing_kl_equals_brute_force(pair_one_tokenizer, pair_two_tokenizers, two_tokenizers, kind):
    pair = pair_two_tokenizers if two_tokenizers else pair_one_tokenizer
    s_mask, s_blocks, t_mask, t_blocks, index, weight, A = _inputs(pair, two_tokenizers)
    assert (t_mask == 0).any() and (s_mask == 0).any()  # padding on both sides
    corr = _corr(6, 4)
    for s_b, t_b in zip(s_blocks, t_blocks, strict=True):
        s_logp = losses.routing_log_probs(s_b["router_logits"])
        t_logp = losses.routing_log_probs(t_b["router_logits"])
        got = losses.routing_kl(s_logp, t_logp, t_mask, index, weight, corr, kind=kind, top_k=2)
        want = _brute_routing(
            s_logp.double().exp(), t_logp.double().exp(), t_mask, A.double(), corr.double(), kind, 2
        )
        assert got.shape == (3,)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
        assert (got > 0).all()


def test_routing_kl_is_zero_for_the_same_routing_and_has_a_gradient(pair_one_tokenizer):
    s_mask, s_blocks, *_ = _inputs(pair_one_tokenizer, False)
    logits = s_blocks[0]["router_logits"].clone().requires_grad_(True)
    logp = losses.routing_log_probs(logits)
    index, weight = _identity_alignment(s_mask)
    eye = torch.eye(4)
    same = losses.routing_kl(logp, logp.detach(), s_mask, index, weight, eye)
    torch.testing.assert_close(same, torch.zeros(3), atol=1e-6, rtol=0)
    other = losses.routing_kl(logp, logp.detach().flip(-1), s_mask, index, weight, eye)
    other.sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert (logits.grad[s_mask == 0] == 0).all()  # padding tokens get no gradient


def test_routing_log_probs_sigmoid_are_normalised_scores():
    logits = torch.randn(5, 6)
    want = torch.sigmoid(logits) / torch.sigmoid(logits).sum(-1, keepdim=True)
    torch.testing.assert_close(losses.routing_log_probs(logits, "sigmoid").exp(), want)


@pytest.mark.parametrize("two_tokenizers", [False, True])
def test_routing_agreement_equals_brute_force(pair_one_tokenizer, pair_two_tokenizers, two_tokenizers):
    pair = pair_two_tokenizers if two_tokenizers else pair_one_tokenizer
    s_mask, s_blocks, t_mask, t_blocks, index, weight, A = _inputs(pair, two_tokenizers)
    corr = _corr(6, 4, seed=3)
    s_logp = losses.routing_log_probs(s_blocks[1]["router_logits"])
    t_logp = losses.routing_log_probs(t_blocks[1]["router_logits"])
    top1, topk = losses.routing_agreement(s_logp, t_logp, t_mask, index, weight, corr, 2)
    p_s, p_t = s_logp.double().exp(), t_logp.double().exp()
    for b in range(3):
        hits, overlap, n = 0.0, 0.0, 0
        for m in range(t_mask.shape[1]):
            if not t_mask[b, m] or A[b, m].sum() == 0:
                continue
            ps = (A[b, m].double()[:, None] * p_s[b]).sum(0)  # (E_s,)
            q = p_t[b, m] @ corr.double()
            hits += float(ps.argmax() == q.argmax())
            overlap += len(set(ps.topk(2).indices.tolist()) & set(q.topk(2).indices.tolist())) / 2
            n += 1
        assert float(top1[b]) == pytest.approx(hits / n, abs=1e-6)
        assert float(topk[b]) == pytest.approx(overlap / n, abs=1e-6)


def _brute_expert(y_s, i_s, y_t, i_t, t_mask, A, teacher_of, normalize):
    B, M, k_t, F = y_t.shape
    out = []
    for b in range(B):
        num, den = 0.0, 0.0
        for m in range(M):
            if not t_mask[b, m]:
                continue
            for t in range(y_s.shape[1]):
                w = float(A[b, m, t])
                if w == 0:
                    continue
                for j in range(y_s.shape[2]):
                    for i in range(k_t):
                        if int(teacher_of[int(i_s[b, t, j])]) != int(i_t[b, m, i]):
                            continue
                        diff = y_s[b, t, j].double() - y_t[b, m, i].double()
                        num += w * float((diff * diff).sum()) / F
                        den += w * (float((y_t[b, m, i].double() ** 2).sum()) / F if normalize else 1.0)
        out.append(num / den if den > 0 else 0.0)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("two_tokenizers", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_expert_output_error_equals_brute_force(
    pair_one_tokenizer, pair_two_tokenizers, two_tokenizers, normalize
):
    pair = pair_two_tokenizers if two_tokenizers else pair_one_tokenizer
    s_mask, s_blocks, t_mask, t_blocks, index, weight, A = _inputs(pair, two_tokenizers)
    proj = torch.nn.Linear(32, 48, bias=False)
    teacher_of = torch.tensor([0, 5, 2, 3])
    for s_b, t_b in zip(s_blocks, t_blocks, strict=True):
        y_s = proj(s_b["outputs"])  # (B, T_s, 2, 48)
        got = losses.expert_output_error(
            y_s,
            s_b["index"],
            t_b["outputs"],
            t_b["index"],
            t_mask,
            index,
            weight,
            teacher_of,
            normalize=normalize,
        )
        want = _brute_expert(
            y_s.detach(), s_b["index"], t_b["outputs"], t_b["index"], t_mask, A, teacher_of, normalize
        )
        assert (want > 0).sum() >= 2  # tokens routed to corresponding experts in the longer samples
        torch.testing.assert_close(got.detach().double(), want, rtol=1e-4, atol=1e-7)
        got.sum().backward()
        assert torch.isfinite(proj.weight.grad).all() and proj.weight.grad.abs().sum() > 0


def test_expert_output_error_is_zero_for_the_same_outputs(pair_one_tokenizer):
    s_mask, s_blocks, *_ = _inputs(pair_one_tokenizer, False)
    b = s_blocks[0]
    index, weight = _identity_alignment(s_mask)
    got = losses.expert_output_error(
        b["outputs"], b["index"], b["outputs"], b["index"], s_mask, index, weight, torch.arange(4)
    )
    torch.testing.assert_close(got, torch.zeros(3), atol=1e-5, rtol=0)


def test_load_balance_equals_brute_force_and_mixtrals_loss(pair_one_tokenizer):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    s_mask, s_blocks, *_ = _inputs(pair_one_tokenizer, False)
    blk = s_blocks[0]
    logp = losses.routing_log_probs(blk["router_logits"])
    got = losses.load_balance(logp, blk["index"], s_mask)
    p = logp.double().exp()
    for b in range(3):
        real = [t for t in range(s_mask.shape[1]) if s_mask[b, t]]
        f = [sum(int(e in blk["index"][b, t].tolist()) for t in real) / len(real) for e in range(4)]
        P = [sum(float(p[b, t, e]) for t in real) / len(real) for e in range(4)]
        assert float(got[b]) == pytest.approx(4 * sum(fe * pe for fe, pe in zip(f, P, strict=True)), rel=1e-5)
    # one unpadded sequence: Mixtral's own auxiliary loss (transformers) is the same number
    n = int(s_mask[2].sum())
    ref = load_balancing_loss_func((blk["router_logits"][2, :n],), num_experts=4, top_k=2)
    assert float(got[2]) == pytest.approx(float(ref), rel=1e-5)
