"""The objective is a mean over samples of per-sample losses, whatever the fusion, loss space or terms.

This is what makes batch 1 × accumulation 4, batch 4 × accumulation 1 and DDP give the same update: the loss
(and its gradient) of a batch equals the mean over its samples of their losses (gradients) taken alone, with
padding that differs between the two.
"""

from __future__ import annotations

import pytest

from kvdistill.data import load_records
from kvdistill.train.objective import build_objective

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


@pytest.mark.parametrize("overrides", [[], ["teachers.0.compression.kind=right_crop",
                                             "teachers.0.compression.budget=8"]])
def test_sparse_teacher_loss_equals_dense_einsum_reference(tiny_config, overrides):
    """The gather form of the KV loss (sparse alignment, K and V together) equals the dense formulation
    pred = einsum(A, P(K_s)) with A (B, [H,] M, T_s) on real tokenizations of three tokenizers."""
    import torch

    from kvdistill.models.capture import forward_kv
    from kvdistill.train.objective import kv_error, teacher_alignment

    cfg = tiny_config(*overrides)
    objective = build_objective(cfg)
    records = load_records(cfg.data)[:4]
    kv = cfg.losses.kv
    (ids, mask, spans), cpu = objective._student_inputs(records)
    with torch.no_grad():
        s = forward_kv(objective.student, ids, mask, geometry=objective.student_geometry, logits=True)
        for teacher in objective.teachers:
            tkv = teacher.kv(records, max_length=cfg.data.max_length)
            got, _, _ = objective._teacher_loss(teacher, tkv, s, mask, spans, cpu)
            ref = torch.zeros(len(records))
            pairs = objective._pairs[teacher.name]
            for i, row in pairs:
                proj = objective.projectors[teacher.name][str(i)]
                k_s, v_s = proj(s.keys[i], which="keys"), proj(s.values[i], which="values")
                for j, w in row:
                    A = teacher_alignment(tkv.spans[j], tkv.mask[j], spans, mask)  # (B, [H,] M, T_s)
                    eq = "bmt,bhtd->bhmd" if A.dim() == 3 else "bhmt,bhtd->bhmd"
                    covered = (A.sum(-1) > 0).long() * tkv.mask[j]
                    err = kv.keys * kv_error(torch.einsum(eq, A, k_s), tkv.keys[j], covered, kind=kv.kind)
                    err = err + kv.values * kv_error(torch.einsum(eq, A, v_s), tkv.values[j], covered, kind=kv.kind)
                    ref = ref + w * err
            ref = kv.weight * ref / len(pairs)
            assert ref.min() > 0.1
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_ce_per_sample_equals_sliced_log_softmax_reference():
    import torch

    from kvdistill.train.objective import ce_per_sample, sample_mean

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 9, 50, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    logp = torch.log_softmax(logits[:, :-1], dim=-1)  # (B, T-1, V)
    ref = sample_mean(-logp.gather(-1, labels[:, 1:, None]).squeeze(-1), mask[:, 1:] * mask[:, :-1])
    got = ce_per_sample(logits, labels, mask)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    g_ref, g_got = (torch.autograd.grad(x.sum(), logits)[0] for x in (ref, got))
    torch.testing.assert_close(g_got, g_ref, rtol=1e-6, atol=1e-7)
