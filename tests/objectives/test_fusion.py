"""Every fusion option does what the config says: k-means prototypes route differently from the mean, similarity
weights are `fuse.similarity_weights` of `fuse.prototype` on the space's rows, and target-space similarity is not
the fixed weights."""

from __future__ import annotations

import torch

from kvdistill.data import load_records
from kvdistill.fuse import prototype, similarity_weights
from kvdistill.objectives import build_objective


def test_kmeans_prototypes_are_used_and_route_differently_from_the_mean(tiny_config):
    records = load_records(tiny_config().data)[:4]
    weights = {}
    for kind in ("mean", "kmeans"):
        cfg = tiny_config("fusion.kind=similarity", f"fusion.similarity.prototype={kind}",
                          "fusion.similarity.kmeans_k=3", "fusion.similarity.temperature=0.05")
        objective = build_objective(cfg)
        step = objective.step(records)
        out = objective.space(step)
        sims = [objective.space.pair_errors(step, n, kind="mse", normalize=True).deepest for n in range(2)]
        queries = [prototype(s.query, s.mask, kind="mean")[:, 0] for s in sims]  # (B, F_n)
        protos = [prototype(s.key, s.mask, kind=kind, k=3) for s in sims]  # (B, K, F_n)
        ref = similarity_weights(queries, protos, metric="cosine", temperature=0.05)  # (B, N)
        torch.testing.assert_close(out.weights, ref)
        weights[kind] = out.weights
    assert (weights["mean"] - weights["kmeans"]).abs().max() > 1e-3


def test_similarity_in_target_space_is_not_the_fixed_weights(tiny_config):
    records = load_records(tiny_config().data)[:4]
    objective = build_objective(tiny_config("fusion.space=target", "fusion.kind=similarity",
                                            "fusion.similarity.temperature=0.05"))
    out = objective.space(objective.step(records))
    assert out.weights.shape == (4, 2)
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(4))
    assert (out.weights - 0.5).abs().max() > 1e-3  # fixed would be 0.5 / 0.5
    assert out.weights.std(0).max() > 1e-4  # and it depends on the sample
