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


def _brute_kv_error(pred, target, mask, kind, normalize, eps=1e-6):
    """Per-sample error (B,) of pred, target (B, H, M, D) over the (head, token) rows where mask (B, H|1, M) is 1:
    boolean selection, one sample at a time."""
    import torch

    out = []
    for b in range(pred.shape[0]):
        rows = mask[b].expand(pred.shape[1], -1).bool()  # (H, M)
        p, t = pred[b][rows], target[b][rows]  # (N, D)
        if p.numel() == 0:
            out.append(pred.new_zeros(()))
            continue
        err = (p - t).square() if kind == "mse" else torch.nn.functional.smooth_l1_loss(p, t, reduction="none")
        var = t.var(unbiased=False).detach() + eps
        out.append(err.mean() / ((var if kind == "mse" else var.sqrt()) if normalize else 1))
    return torch.stack(out)


def _per_pair_reference(objective, teacher, tkv, s, mask, spans):
    """The KV (+ cosine) loss of one teacher, one (student layer, teacher layer) pair at a time: each layer's
    projector applied to K and V separately, the dense alignment A, brute-force errors."""
    import torch

    from kvdistill.train.objective import teacher_alignment

    cfg = objective.cfg.losses
    kv = cfg.kv
    pairs = objective._pairs[teacher.name]
    kv_term, cos_term = 0, 0
    for i, row in pairs:
        proj = objective.projectors[teacher.name][str(i)]
        k_s, v_s = proj(s.keys[i], which="keys"), proj(s.values[i], which="values")  # (B, H_t, T_s, D_t)
        for j, w in row:
            A = teacher_alignment(tkv.spans[j], tkv.mask[j], spans, mask)  # (B, [H_t,] M, T_s)
            eq = "bmt,bhtd->bhmd" if A.dim() == 3 else "bhmt,bhtd->bhmd"
            covered = (A.sum(-1) > 0).long() * tkv.mask[j]  # (B, [H_t,] M)
            m = covered[:, None] if covered.dim() == 2 else covered  # (B, H_t|1, M)
            k_pred, v_pred = torch.einsum(eq, A, k_s), torch.einsum(eq, A, v_s)
            err = kv.keys * _brute_kv_error(k_pred, tkv.keys[j], m, kv.kind, kv.normalize)
            err = err + kv.values * _brute_kv_error(v_pred, tkv.values[j], m, kv.kind, kv.normalize)
            kv_term = kv_term + w * err
            cos = 1 - torch.nn.functional.cosine_similarity(k_pred, tkv.keys[j], dim=-1)  # (B, H_t, M)
            mm = m.expand_as(cos).float()
            cos_term = cos_term + w * (cos * mm).sum((1, 2)) / mm.sum((1, 2)).clamp(min=1)
    return (kv.weight * kv_term + cfg.cosine * cos_term) / len(pairs)


@pytest.mark.parametrize("overrides", [
    ["losses.cosine=0.5"],  # online, uncompressed: one alignment shared by all layers
    ["teachers.0.compression.kind=right_crop", "teachers.0.compression.budget=8", "teachers.1.compression.kind=rkv",
     "teachers.1.compression.budget=8", "losses.cosine=0.5"],  # per-head spans, one tensor per layer
    ["teachers.0.layer_map.strategy=uniform", "teachers.1.layer_map.explicit=[-1, [0, 2]]",
     "teachers.1.layer_map.strategy=explicit", "losses.kv.kind=smooth_l1", "losses.kv.normalize=false",
     "losses.kv.values=0.3"],  # interpolated maps, a shared teacher layer, an unsupervised student layer
])
def test_batched_teacher_loss_equals_per_pair_reference(tiny_config, overrides):
    """`_teacher_loss` (all layer pairs batched) equals the pair-by-pair brute-force loss, values and gradients
    of the student and projector parameters, float32."""
    import torch

    from kvdistill.models.capture import forward_kv

    cfg = tiny_config(*overrides)
    objective = build_objective(cfg)
    records = load_records(cfg.data)[:4]
    (ids, mask, spans), cpu = objective._student_inputs(records)
    s = forward_kv(objective.student, ids, mask, geometry=objective.student_geometry, logits=True)
    assert s.keys[0].dtype == torch.float32
    for teacher in objective.teachers:
        tkv = teacher.kv(records, max_length=cfg.data.max_length)
        params = [p for p in [*objective.student.parameters(), *objective.projectors[teacher.name].parameters()]
                  if p.requires_grad]
        got, deepest, _ = objective._teacher_loss(teacher, tkv, s, mask, spans, cpu)
        ref = _per_pair_reference(objective, teacher, tkv, s, mask, spans)
        assert ref.min() > 1e-3  # not trivially zero
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        g_got = torch.autograd.grad(got.sum(), params, retain_graph=True, allow_unused=True)
        g_ref = torch.autograd.grad(ref.sum(), params, retain_graph=True, allow_unused=True)
        assert sum(g is not None for g in g_ref) > 10
        for g, r in zip(g_got, g_ref, strict=True):
            assert (g is None) == (r is None)
            if r is not None:
                torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6 * float(r.abs().max() + 1e-3))
        # deepest: the last pair's projected keys (B, H_t, M, D_t), its teacher keys and covered mask
        k_pred, k_t, covered = deepest
        assert k_pred.shape == k_t.shape and k_t is tkv.keys[objective._pairs[teacher.name][-1][1][-1][0]]
