"""Prototypes: pooled kinds (golden), batched k-means (golden, brute force, Lloyd fixed point), masks."""

from __future__ import annotations

import itertools

import pytest
import torch

from kvdistill.errors import KvdistillError
from kvdistill.fuse import kmeans, prototype


# ---------------------------------------------------------------------------------------------- pooled kinds
def test_prototype_kinds_golden_with_padding():
    x = torch.tensor(
        [
            [[9.0, 9.0], [1.0, 4.0], [3.0, 2.0]],  # left padding at t=0
            [[2.0, -1.0], [6.0, 0.0], [-5.0, -5.0]],
        ]
    )  # right padding at t=2
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])
    assert torch.equal(prototype(x, mask, "mean"), torch.tensor([[[2.0, 3.0]], [[4.0, -0.5]]]))
    assert torch.equal(prototype(x, mask, "first"), torch.tensor([[[1.0, 4.0]], [[2.0, -1.0]]]))
    assert torch.equal(prototype(x, mask, "max"), torch.tensor([[[3.0, 4.0]], [[6.0, 0.0]]]))
    empty = torch.zeros(2, 3, dtype=torch.long)
    for kind in ("mean", "first", "max", "kmeans"):
        assert torch.equal(prototype(x, empty, kind, k=2), torch.zeros(2, 1 if kind != "kmeans" else 2, 2))
    with pytest.raises(KvdistillError, match="prototype kind 'cls' is unknown"):
        prototype(x, mask, "cls")
    with pytest.raises(KvdistillError, match=r"mask \(2, 2\) does not match x \(2, 3, 2\)"):
        prototype(x, mask[:, :2], "mean")
    with pytest.raises(KvdistillError, match=r"x \(3, 2\) must have 3 dims"):
        prototype(x[0], mask[0], "mean")


# ---------------------------------------------------------------------------------------------- k-means
def test_kmeans_golden():
    """1-D points 0, 1, 10, 11, 12: farthest-point start {0, 12}, one Lloyd step gives {0.5, 11}."""
    x = torch.tensor([[[0.0], [1.0], [10.0], [11.0], [12.0], [5.0]]])  # last token padded
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    assert torch.equal(kmeans(x, mask, k=2), torch.tensor([[[0.5], [11.0]]]))
    assert torch.equal(prototype(x, mask, "kmeans", k=2), kmeans(x, mask, k=2))
    assert torch.equal(kmeans(x, mask, k=1), torch.tensor([[[6.8]]]))  # k = 1 is the mean (34 / 5)


def _sse(points: torch.Tensor, assign: torch.Tensor, k: int) -> tuple[float, torch.Tensor]:
    centres = torch.stack([points[assign == j].mean(0) for j in range(k)])
    return float((points - centres[assign]).square().sum()), centres


def test_kmeans_equals_exhaustive_search_on_separated_clusters():
    """8 points in 3 separated groups, k = 3: the centres are those of the best of all 3^8 partitions."""
    gen = torch.Generator().manual_seed(0)
    groups = torch.tensor([[0.0, 0.0], [6.0, 1.0], [2.0, 7.0]])
    points = groups[torch.tensor([0, 1, 2, 0, 1, 2, 0, 2])] + 0.5 * torch.randn(8, 2, generator=gen)
    best, best_centres = float("inf"), None
    for labels in itertools.product(range(3), repeat=8):
        assign = torch.tensor(labels)
        if len(set(labels)) < 3:
            continue
        sse, centres = _sse(points, assign, 3)
        if sse < best:
            best, best_centres = sse, centres
    got = kmeans(points[None], torch.ones(1, 8), k=3)[0]
    order = lambda c: c[(c[:, 0] * 100 + c[:, 1]).argsort()]  # noqa: E731
    assert torch.allclose(order(got), order(best_centres), atol=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_kmeans_is_a_lloyd_fixed_point_per_sample(seed):
    """Random batch with padding: each centre is the mean of its counted points, each point is nearest its
    centre, and every sample equals k-means of its counted tokens alone."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 9, 4, generator=gen)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, :2] = 0  # left padding
    mask[1, 6:] = 0  # right padding
    x[mask == 0] = 1e6  # what padding holds must not matter
    centres = kmeans(x, mask, k=3, iters=50)
    for b in range(3):
        pts = x[b, mask[b] == 1]  # (M, F)
        dist = (pts[:, None] - centres[b][None]).square().sum(-1)  # (M, K) brute force
        assign = dist.argmin(1)
        assert torch.allclose(dist.gather(1, assign[:, None])[:, 0], dist.min(1).values)
        for j in range(3):
            if (assign == j).any():
                assert torch.allclose(centres[b, j], pts[assign == j].mean(0), atol=1e-6)
        alone = kmeans(pts[None], torch.ones(1, len(pts)), k=3, iters=50)[0]
        assert torch.allclose(alone, centres[b], atol=1e-6)


def test_kmeans_fewer_counted_tokens_than_k_repeats_centres():
    x = torch.tensor([[[1.0, 2.0], [3.0, -1.0], [7.0, 7.0]], [[4.0, 4.0], [0.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    got = kmeans(x, mask, k=4)
    a, b = [1.0, 2.0], [3.0, -1.0]
    assert got[0].tolist() == [a, b, a, a]
    assert torch.equal(got[1], torch.zeros(4, 2))  # no counted token


def test_kmeans_deterministic_dtype_gradient_and_errors():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 12, 8, generator=gen)
    mask = (torch.rand(2, 12, generator=gen) > 0.3).long()
    assert torch.equal(kmeans(x, mask, k=3), kmeans(x.clone(), mask.clone(), k=3))
    assert kmeans(x.bfloat16(), mask, k=3).dtype == torch.bfloat16
    leaf = x.clone().requires_grad_()
    kmeans(leaf, mask, k=3).sum().backward()
    assert torch.isfinite(leaf.grad).all()
    assert torch.equal(leaf.grad[mask == 0], torch.zeros_like(leaf.grad[mask == 0]))
    # each counted token is in exactly one cluster of (size n): d(sum of its centre)/dx = 1/n per feature
    assert bool((leaf.grad[mask == 1] > 0).all())
    with pytest.raises(KvdistillError, match=r"k-means k \(0\) must be an integer >= 1"):
        kmeans(x, mask, k=0)
    with pytest.raises(KvdistillError, match=r"k-means iters \(0\) must be an integer >= 1"):
        kmeans(x, mask, k=2, iters=0)
