"""Similarity routing: golden weights per metric, best of K prototypes, per-teacher widths, per-token
queries, masks, and a case where k-means prototypes route differently from the mean."""

from __future__ import annotations

import math

import pytest
import torch

from kvdistill.errors import KvdistillError
from kvdistill.fuse import best_match, prototype, similarity_weights


@pytest.mark.parametrize("metric", ["cosine", "dot", "l2"])
def test_similarity_picks_the_matching_teacher(metric):
    gen = torch.Generator().manual_seed(0)
    protos = (
        torch.nn.functional.normalize(torch.randn(4, 16, generator=gen), dim=-1) * 4
    )  # one norm: fair dot
    query = protos[[2, 0, 3]]  # sample b equals teacher [2, 0, 3][b]
    per_teacher = [protos[n].expand(3, 1, 16) for n in range(4)]  # (B, K=1, F) each
    w = similarity_weights([query] * 4, per_teacher, metric=metric, temperature=0.1)
    assert w.shape == (3, 4)
    assert torch.allclose(w.sum(-1), torch.ones(3))
    assert w.argmax(-1).tolist() == [2, 0, 3]


def test_similarity_golden_per_metric():
    q = torch.tensor([[2.0, 0.0]])  # (B, F)
    p1, p2 = torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[0.0, 1.0]]])  # (B, K, F)
    e = math.e
    # cosine [1, 0]
    w = similarity_weights([q, q], [p1, p2], metric="cosine")
    assert torch.allclose(w, torch.tensor([[e / (e + 1), 1 / (e + 1)]]))
    # dot / sqrt(F): [2 / sqrt(2), 0]
    w = similarity_weights([q, q], [p1, p2], metric="dot")
    assert torch.allclose(w, torch.softmax(torch.tensor([[math.sqrt(2), 0.0]]), -1))
    # l2: -||q - p||² / F = [-1/2, -5/2], temperature 0.5 -> softmax([-1, -5])
    w = similarity_weights([q, q], [p1, p2], metric="l2", temperature=0.5)
    assert torch.allclose(w, torch.softmax(torch.tensor([[-1.0, -5.0]]), -1))


def test_best_of_k_prototypes_counts():
    q = torch.tensor([[1.0, 0.0]])
    a = torch.tensor([[[0.0, 1.0], [0.0, -1.0]]])  # both orthogonal: cos 0
    b = torch.tensor([[[-1.0, 0.0], [1.0, 0.0]]])  # the second equals the query: cos 1
    assert best_match(q, a).tolist() == [0.0] and best_match(q, b).tolist() == [1.0]
    w = similarity_weights([q, q], [a, b])
    assert torch.allclose(w, torch.softmax(torch.tensor([[0.0, 1.0]]), -1))


def test_each_teacher_is_compared_in_its_own_width():
    """Teacher 0 has F = 3 and K = 2, teacher 1 has F = 5 and K = 1: scores as computed by hand."""
    gen = torch.Generator().manual_seed(1)
    q0, q1 = torch.randn(2, 3, generator=gen), torch.randn(2, 5, generator=gen)
    p0, p1 = torch.randn(2, 2, 3, generator=gen), torch.randn(2, 1, 5, generator=gen)
    for metric, sim in [
        ("cosine", lambda q, p: torch.cosine_similarity(q, p, dim=-1)),
        ("dot", lambda q, p: (q * p).sum(-1) / math.sqrt(q.shape[-1])),
        ("l2", lambda q, p: -(q - p).square().sum(-1) / q.shape[-1]),
    ]:
        s0 = torch.maximum(sim(q0, p0[:, 0]), sim(q0, p0[:, 1]))  # (B,)
        s1 = sim(q1, p1[:, 0])
        ref = torch.softmax(torch.stack([s0, s1], -1) / 0.7, -1)
        assert torch.allclose(similarity_weights([q0, q1], [p0, p1], metric, 0.7), ref, atol=1e-6), metric


def test_per_token_queries_give_per_token_weights():
    gen = torch.Generator().manual_seed(2)
    q0, q1 = torch.randn(2, 4, 3, generator=gen), torch.randn(2, 4, 6, generator=gen)  # (B, T, F_n)
    p0, p1 = torch.randn(2, 3, 3, generator=gen), torch.randn(2, 2, 6, generator=gen)
    w = similarity_weights([q0, q1], [p0, p1], "l2")
    assert w.shape == (2, 4, 2)
    for t in range(4):  # token t alone, as a per-sample query
        assert torch.allclose(w[:, t], similarity_weights([q0[:, t], q1[:, t]], [p0, p1], "l2"), atol=1e-6)


def test_kmeans_prototypes_route_differently_from_the_mean():
    """Teacher A's tokens form two tight clusters, at (10, 1) and (-10, 1): their mean (0, 1) is near
    neither. Teacher B's tokens all sit at (1, 1). A query along (1, 0) is close to A's first cluster: k-means
    prototypes send it to A, the mean sends it to B. Padded tokens hold junk that changes nothing."""
    a = torch.tensor([[10.0, 1.0], [10.1, 1.0], [-10.0, 1.0], [9.9, 1.0], [-10.1, 1.0], [-9.9, 1.0]])
    b = torch.ones(6, 2)  # k-means repeats its one distinct point
    junk = torch.tensor([[1e4, -1e4], [float("nan"), 0.0]])
    xa, xb = torch.cat([a, junk])[None], torch.cat([b, junk])[None]  # (1, 8, 2): last two tokens padded
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]])
    q = torch.tensor([[1.0, 0.0]])
    weights = {}
    for kind in ("mean", "kmeans"):
        protos = [prototype(xa, mask, kind, k=2), prototype(xb, mask, kind, k=2)]
        assert all(torch.isfinite(p).all() for p in protos)
        clean = [
            prototype(a[None], torch.ones(1, 6), kind, k=2),
            prototype(b[None], torch.ones(1, 6), kind, k=2),
        ]
        assert all(torch.allclose(p, c) for p, c in zip(protos, clean, strict=True))
        weights[kind] = similarity_weights([q, q], protos, "cosine", temperature=0.1)
    # mean: cos(q, (0, 1)) = 0 vs cos(q, (1, 1)) ≈ 0.707; k-means: cos(q, (10, 1)) ≈ 0.995 vs 0.707
    assert weights["mean"].argmax(-1).tolist() == [1]
    assert weights["kmeans"].argmax(-1).tolist() == [0]
    s_mean = torch.tensor([[0.0, 1 / math.sqrt(2)]])
    assert torch.allclose(weights["mean"], torch.softmax(s_mean / 0.1, -1), atol=1e-4)
    s_kmeans = torch.tensor([[10 / math.sqrt(101), 1 / math.sqrt(2)]])
    assert torch.allclose(weights["kmeans"], torch.softmax(s_kmeans / 0.1, -1), atol=1e-4)


def test_similarity_errors():
    q, p = torch.zeros(2, 4), torch.zeros(2, 3, 4)
    with pytest.raises(KvdistillError, match="one tensor per teacher, got a tensor"):
        similarity_weights(q, p)
    with pytest.raises(
        KvdistillError, match=r"teacher 1: prototypes \(2, 3, 5\) do not match query \(2, 4\)"
    ):
        similarity_weights([q, q], [p, torch.zeros(2, 3, 5)])
    with pytest.raises(KvdistillError, match="2 queries and 1 prototype sets"):
        similarity_weights([q, q], [p])
    with pytest.raises(KvdistillError, match=r"queries\[1\] \(2, 5, 4\) and queries\[0\] \(2, 4\)"):
        similarity_weights([q, torch.zeros(2, 5, 4)], [p, p])
    with pytest.raises(KvdistillError, match="metric 'kl' is unknown"):
        similarity_weights([q], [p], metric="kl")
    with pytest.raises(KvdistillError, match=r"temperature \(0.0\) must be finite and > 0"):
        similarity_weights([q], [p], temperature=0.0)
