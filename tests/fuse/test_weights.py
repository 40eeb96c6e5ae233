"""Fixed weights, prototypes, k-means, similarity routing and target-space fusion."""

from __future__ import annotations

import math

import pytest
import torch

from kvdistill.errors import KvdistillError
from kvdistill.fuse import fixed_weights, fuse_targets, kmeans_prototypes, prototype, similarity_weights


# ---------------------------------------------------------------------------------------------- fixed
def test_fixed_weights_normalised():
    w = fixed_weights([1, 3])
    assert w.dtype == torch.float32 and torch.allclose(w, torch.tensor([0.25, 0.75]))
    assert torch.allclose(fixed_weights([0.0, 2.0, 0.0]), torch.tensor([0.0, 1.0, 0.0]))


@pytest.mark.parametrize(("weights", "message"), [([1.0, -0.5], "negative"), ([0, 0], "all 0"), ([], "empty"),
                                                  ([1.0, float("nan")], "non-finite")])
def test_fixed_weights_errors(weights, message):
    with pytest.raises(KvdistillError, match=message):
        fixed_weights(weights)


# ---------------------------------------------------------------------------------------------- prototypes
def test_prototype_kinds_golden_with_padding():
    x = torch.tensor([[[9.0, 9.0], [1.0, 4.0], [3.0, 2.0]],  # left padding at t=0
                      [[2.0, -1.0], [6.0, 0.0], [-5.0, -5.0]]])  # right padding at t=2
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])
    assert torch.equal(prototype(x, mask, "mean"), torch.tensor([[2.0, 3.0], [4.0, -0.5]]))
    assert torch.equal(prototype(x, mask, "first"), torch.tensor([[1.0, 4.0], [2.0, -1.0]]))
    assert torch.equal(prototype(x, mask, "max"), torch.tensor([[3.0, 4.0], [6.0, 0.0]]))
    empty = torch.zeros(2, 3, dtype=torch.long)
    for kind in ("mean", "first", "max"):
        assert torch.equal(prototype(x, empty, kind), torch.zeros(2, 2))
    with pytest.raises(KvdistillError, match="prototype kind 'cls' is unknown"):
        prototype(x, mask, "cls")
    with pytest.raises(KvdistillError, match=r"mask \(2, 2\) does not match x \(2, 3, 2\)"):
        prototype(x, mask[:, :2], "mean")


def test_kmeans_recovers_two_clusters_deterministically():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(40, 3, generator=gen) * 0.3 + torch.tensor([10.0, 0.0, -5.0])
    b = torch.randn(60, 3, generator=gen) * 0.3 + torch.tensor([-10.0, 4.0, 5.0])
    x = torch.cat([a, b])[torch.randperm(100, generator=gen)]
    centres = kmeans_prototypes(x, k=2, seed=3)
    assert centres.shape == (2, 3)
    centres = centres[centres[:, 0].argsort(descending=True)]
    assert torch.allclose(centres[0], a.mean(0), atol=1e-5)
    assert torch.allclose(centres[1], b.mean(0), atol=1e-5)
    assert torch.equal(kmeans_prototypes(x, k=2, seed=3), kmeans_prototypes(x, k=2, seed=3))
    with pytest.raises(KvdistillError, match=r"k \(101\) must be between 1 and the number of points \(100\)"):
        kmeans_prototypes(x, k=101)


# ---------------------------------------------------------------------------------------------- similarity
@pytest.mark.parametrize("metric", ["cosine", "dot", "l2"])
def test_similarity_picks_the_matching_teacher(metric):
    protos = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1) * 4  # same norm: dot is fair too
    query = protos[[2, 0, 3]]  # sample b equals teacher [2, 0, 3][b]
    w = similarity_weights(query, protos, metric=metric, temperature=0.1)
    assert w.shape == (3, 4)
    assert torch.allclose(w.sum(-1), torch.ones(3))
    assert w.argmax(-1).tolist() == [2, 0, 3]


def test_similarity_golden_and_multiple_prototypes_per_teacher():
    query = torch.tensor([[1.0, 0.0]])
    w = similarity_weights(query, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), metric="cosine")
    e = math.e
    assert torch.allclose(w, torch.tensor([[e / (e + 1), 1 / (e + 1)]]))
    # l2: -||q-p||²/F = [0, -1]  (F = 2, distance² 2), temperature 0.5 -> softmax([0, -2])
    w = similarity_weights(query, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), metric="l2", temperature=0.5)
    assert torch.allclose(w, torch.softmax(torch.tensor([[0.0, -2.0]]), -1))
    # (N, K, F): teacher 1 has one prototype equal to the query among K = 2: the max over K counts
    protos = torch.tensor([[[0.0, 1.0], [0.0, -1.0]], [[-1.0, 0.0], [1.0, 0.0]]])
    w = similarity_weights(query, protos, metric="cosine")
    assert torch.allclose(w, torch.softmax(torch.tensor([[0.0, 1.0]]), -1))


def test_similarity_errors():
    with pytest.raises(KvdistillError, match=r"prototypes \(3, 5\) do not match query \(2, 4\)"):
        similarity_weights(torch.zeros(2, 4), torch.zeros(3, 5))
    with pytest.raises(KvdistillError, match="metric 'kl' is unknown"):
        similarity_weights(torch.zeros(2, 4), torch.zeros(3, 4), metric="kl")


# ---------------------------------------------------------------------------------------------- fuse_targets
def test_fuse_targets_per_sample_and_per_token():
    a, b = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    w = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    fused = fuse_targets([a, b], w)
    assert torch.allclose(fused[0], 0.25 * a[0] + 0.75 * b[0])
    assert torch.allclose(fused[1], a[1])
    wt = torch.rand(2, 4, 1)
    wt = torch.cat([wt, 1 - wt], -1)  # (B, T, N)
    fused = fuse_targets([a, b], wt)
    ref = wt[:, None, :, 0, None] * a + wt[:, None, :, 1, None] * b
    assert torch.allclose(fused, ref)


def test_fuse_targets_errors():
    a = torch.zeros(2, 3, 4, 5)
    with pytest.raises(KvdistillError, match=r"targets\[1\] \(2, 3, 4, 6\) and targets\[0\] \(2, 3, 4, 5\) differ"):
        fuse_targets([a, torch.zeros(2, 3, 4, 6)], torch.ones(2, 2) / 2)
    with pytest.raises(KvdistillError, match=r"weights \(2, 3\) do not fit 2 targets"):
        fuse_targets([a, a], torch.ones(2, 3) / 3)
