"""The objective is a mean over samples of per-sample losses, whatever the fusion, loss space or terms.

This is what makes batch 1 × accumulation 4, batch 4 × accumulation 1 and DDP give the same update: the loss
(and its gradient) of a batch equals the mean over its samples of their losses (gradients) taken alone, with
padding that differs between the two.
"""

from __future__ import annotations

import pytest
import torch

from kvdistill.data import load_records
from kvdistill.objectives import build_objective

VARIANTS = {
    "fixed": [],
    "similarity": ["fusion.kind=similarity"],
    "router": ["fusion.kind=router", "fusion.entropy.weight=0"],
    "router_specialized": [
        "fusion.kind=router",
        "fusion.entropy.target=specialized",
        "fusion.entropy.weight=0.1",
    ],
    "target_space": ["fusion.space=target"],
    "latent_space": ["fusion.space=latent", "fusion.latent.dim=8", "fusion.latent.fit_samples=4"],
    "extra_terms": [
        "losses.cosine=0.5",
        "losses.relation=0.5",
        "losses.hidden=0.5",
        "losses.attention_kl=0.5",
        "losses.kv.kind=smooth_l1",
    ],
    "similarity_kmeans": [
        "fusion.kind=similarity",
        "fusion.similarity.prototype=kmeans",
        "fusion.similarity.kmeans_k=3",
    ],
    "router_per_token": [
        "fusion.kind=router",
        "fusion.router.per_token=true",
        "fusion.entropy.target=specialized",
    ],
    "target_similarity": ["fusion.space=target", "fusion.kind=similarity"],
    "target_router_per_token": [
        "fusion.space=target",
        "fusion.kind=router",
        "fusion.router.per_token=true",
        "fusion.entropy.weight=0",
    ],
    "latent_similarity": [
        "fusion.space=latent",
        "fusion.kind=similarity",
        "fusion.latent.dim=8",
        "fusion.latent.fit_samples=4",
    ],
    "latent_router_per_token": [
        "fusion.space=latent",
        "fusion.kind=router",
        "fusion.router.per_token=true",
        "fusion.entropy.weight=0",
        "fusion.latent.dim=8",
        "fusion.latent.fit_samples=4",
    ],
    "compressed": [
        "teachers.0.compression.kind=right_crop",
        "teachers.0.compression.budget=8",
        "teachers.1.compression.kind=rkv",
        "teachers.1.compression.budget=8",
    ],
}


def loss_and_grads(objective, records):
    objective.zero_grad(set_to_none=True)
    loss, metrics = objective(records)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}
    return float(loss), metrics, grads


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_batch_loss_and_gradient_are_means_over_samples(tiny_config, variant):
    cfg = tiny_config(*VARIANTS[variant])
    records = load_records(cfg.data)
    objective = build_objective(cfg)
    if objective.fusion.router is not None:  # a router away from its uniform start: weights differ by token
        torch.nn.init.normal_(objective.fusion.router.head[-1].weight, std=0.5)
    objective.prepare(records[: cfg.fusion.latent.fit_samples])
    batch = records[:4]
    assert len({len(r["text"]) for r in batch}) == 4  # different lengths: the batch is padded
    loss, metrics, grads = loss_and_grads(objective, batch)
    singles = [loss_and_grads(objective, [r]) for r in batch]
    assert loss == pytest.approx(sum(s[0] for s in singles) / 4, rel=1e-5)
    for key, value in metrics.items():  # every logged term is a mean over samples too
        if key != "tokens":
            assert value == pytest.approx(sum(s[1][key] for s in singles) / 4, rel=1e-4, abs=1e-6), key
    assert metrics["tokens"] == sum(s[1]["tokens"] for s in singles)
    assert len(grads) > 10
    for name, grad in grads.items():
        mean = sum(s[2][name] for s in singles if name in s[2]) / 4
        scale = float(grad.abs().max()) + 1e-8
        assert float((grad - mean).abs().max()) / scale < 1e-3, name
    # and the samples really differ from each other
    assert max(s[0] for s in singles) - min(s[0] for s in singles) > 1e-3
