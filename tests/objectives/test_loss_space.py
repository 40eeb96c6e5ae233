"""What training runs equals the library and independent references: the batched loss-space K/V and cosine
terms against a pair-by-pair dense brute force (values and gradients), per-token fusion weights against a
dense reference, the per-teacher terms and CE against direct calls of `kvdistill.losses`, eval against
training."""

from __future__ import annotations

import pytest
import torch

from kvdistill import losses
from kvdistill.align.tokens import teacher_alignment
from kvdistill.data import load_records
from kvdistill.objectives import build_objective


def _brute_kv_error(pred, target, mask, kind, normalize, weight=None, eps=1e-6):
    """Per-sample error (B,) of pred, target (B, H, M, D) over (head, token) rows where mask (B, H|1, M) is 1,
    one sample at a time by boolean selection; weight (B, M): per-token row weights."""
    out = []
    for b in range(pred.shape[0]):
        rows = mask[b].expand(pred.shape[1], -1).bool()  # (H, M)
        p, t = pred[b][rows], target[b][rows]  # (N, D)
        if p.numel() == 0:
            out.append(pred.new_zeros(()))
            continue
        err = (
            (p - t).square() if kind == "mse" else torch.nn.functional.smooth_l1_loss(p, t, reduction="none")
        )
        if weight is not None:
            err = err * weight[b].expand(pred.shape[1], -1)[rows][:, None]
        var = t.var(unbiased=False).detach() + eps
        out.append(err.mean() / ((var if kind == "mse" else var.sqrt()) if normalize else 1))
    return torch.stack(out)


def _reference(objective, step, n, token_weight=None):
    """Teacher n's K/V (+ cosine) loss, one (student layer, teacher layer) pair at a time: each projector
    applied to K and V separately, the dense alignment A, brute-force errors."""
    cfg = objective.cfg.losses
    kv = cfg.kv
    teacher, tkv = step.teachers[n], step.records[n]
    lp = objective.pairs[teacher.name]
    s, b = step.student, step.batch
    kv_term, cos_term = 0, 0
    for i, row in lp.rows.items():
        proj = objective.space.projectors[teacher.name].projector(i)
        k_s, v_s = proj(s.keys[i], which="keys"), proj(s.values[i], which="values")  # (B, H_t, T_s, D_t)
        for j, w in row:
            A = teacher_alignment(tkv.spans[j], tkv.mask[j], b.spans, b.mask)  # (B, [H_t,] M, T_s)
            eq = "bmt,bhtd->bhmd" if A.dim() == 3 else "bhmt,bhtd->bhmd"
            covered = (A.sum(-1) > 0).long() * tkv.mask[j]  # (B, [H_t,] M)
            m = covered[:, None] if covered.dim() == 2 else covered  # (B, H_t|1, M)
            rw = None if token_weight is None else torch.einsum("bmt,bt->bm", A, token_weight)  # (B, M)
            k_pred, v_pred = torch.einsum(eq, A, k_s), torch.einsum(eq, A, v_s)
            err = kv.keys * _brute_kv_error(k_pred, tkv.keys[j], m, kv.kind, kv.normalize, rw)
            err = err + kv.values * _brute_kv_error(v_pred, tkv.values[j], m, kv.kind, kv.normalize, rw)
            kv_term = kv_term + w * err
            cos = 1 - torch.nn.functional.cosine_similarity(k_pred, tkv.keys[j], dim=-1)  # (B, H_t, M)
            mm = m.expand_as(cos).float()
            cos_term = cos_term + w * (cos * mm).sum((1, 2)) / mm.sum((1, 2)).clamp(min=1)
    L = len(lp.layers)
    return kv_term / L, cos_term / L


@pytest.mark.parametrize(
    "overrides",
    [
        ["losses.cosine=0.5"],  # online, uncompressed: one alignment shared by all layers
        [
            "teachers.0.compression.kind=right_crop",
            "teachers.0.compression.budget=8",
            "teachers.1.compression.kind=rkv",
            "teachers.1.compression.budget=8",
            "losses.cosine=0.5",
        ],  # per-head spans, one tensor per layer
        [
            "teachers.0.layer_map.strategy=uniform",
            "teachers.1.layer_map.explicit=[-1, [0, 2]]",
            "teachers.1.layer_map.strategy=explicit",
            "losses.kv.kind=smooth_l1",
            "losses.kv.normalize=false",
            "losses.kv.values=0.3",
        ],  # interpolated maps, a shared teacher layer, an unsupervised student layer
    ],
)
def test_loss_space_equals_per_pair_reference_values_and_gradients(tiny_config, overrides):
    cfg = tiny_config(*overrides)
    objective = build_objective(cfg)
    step = objective.step(load_records(cfg.data)[:4])
    out = objective.space(step)
    ref = 0
    for n, teacher in enumerate(step.teachers):
        kv_ref, cos_ref = _reference(objective, step, n)
        assert kv_ref.min() > 0.01  # not trivially zero
        torch.testing.assert_close(
            out.metrics[f"loss/kv/{teacher.name}"], kv_ref.mean(), rtol=1e-5, atol=1e-6
        )
        if cfg.losses.cosine > 0:
            torch.testing.assert_close(
                out.metrics[f"loss/cosine/{teacher.name}"], cos_ref.mean(), rtol=1e-5, atol=1e-6
            )
        ref = ref + out.weights[:, n] * (cfg.losses.kv.weight * kv_ref + cfg.losses.cosine * cos_ref)
    torch.testing.assert_close(out.kd, ref, rtol=1e-5, atol=1e-6)
    params = [p for p in objective.parameters() if p.requires_grad]
    got = torch.autograd.grad(out.kd.sum(), params, retain_graph=True, allow_unused=True)
    want = torch.autograd.grad(ref.sum(), params, allow_unused=True)
    for g, w in zip(got, want, strict=True):
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_per_token_weights_enter_the_rows_as_the_dense_reference(tiny_config):
    cfg = tiny_config("fusion.kind=router", "fusion.router.per_token=true", "fusion.entropy.weight=0")
    objective = build_objective(cfg)
    torch.nn.init.normal_(objective.fusion.router.head[-1].weight, std=1.0)
    step = objective.step(load_records(cfg.data)[:4])
    out = objective.space(step)
    w_tok = out.weights  # (B, T_s, N)
    assert w_tok.dim() == 3 and w_tok[step.batch.mask.bool()].std(0).min() > 1e-3  # weights vary by token
    ref = sum(cfg.losses.kv.weight * _reference(objective, step, n, w_tok[..., n])[0] for n in range(2))
    torch.testing.assert_close(out.kd, ref, rtol=1e-5, atol=1e-6)
    # the same router per sample: weights averaged over tokens, a different loss
    per_sample = build_objective(tiny_config("fusion.kind=router", "fusion.entropy.weight=0"))
    per_sample.load_state_dict(objective.state_dict())
    assert not torch.allclose(per_sample.space(per_sample.step(step.batch.records)).kd, out.kd, rtol=1e-3)


def test_terms_and_ce_are_the_library_functions_on_the_same_tensors(tiny_config):
    cfg = tiny_config("losses.relation=0.5", "losses.attention_kl=0.5", "losses.hidden=0.5")
    objective = build_objective(cfg)
    records = load_records(cfg.data)[:4]
    loss, metrics = objective(records)
    step = objective.step(records)
    b, s = step.batch, step.student
    ce = losses.ce_loss(s.logits, b.ids, b.mask)
    assert metrics["loss/ce"] == pytest.approx(float(ce.mean()), rel=1e-6)
    for n, teacher in enumerate(step.teachers):
        tkv, cap, lp = step.records[n], step.records[n].capture, objective.pairs[teacher.name]
        A = teacher_alignment(tkv.spans[0], tkv.mask[0], b.spans, b.mask).float()  # (B, T_t, T_s)
        covered = (A.sum(-1) > 0).long() * tkv.mask[0]
        rel = att = hid = 0
        for i, j, w in zip(lp.i, lp.j, lp.w, strict=True):
            rel = rel + w * losses.relation_loss(
                torch.einsum("bmt,bhtd->bhmd", A, s.keys[i]), tkv.keys[j], covered
            )
            p = torch.einsum("bmt,bhmn,bnu->bhtu", A, cap.attentions[j], A)
            att = att + w * losses.attention_kl(
                s.attentions[i], p / p.sum(-1, keepdim=True).clamp(min=1e-9), (A.sum(1) > 0).long()
            )
            h = torch.einsum(
                "bmt,btf->bmf", A, objective.terms.hidden_proj[teacher.name](s.hidden_states[i + 1])
            )
            hid = hid + w * losses.hidden_error(h, cap.hidden_states[j + 1], covered)
        L = len(lp.layers)
        for name, value in (("relation", rel), ("attention_kl", att), ("hidden", hid)):
            assert metrics[f"loss/{name}/{teacher.name}"] == pytest.approx(
                float((value / L).mean()), rel=1e-5
            )


def test_eval_kv_error_is_the_training_error(tiny_config):
    cfg = tiny_config("losses.kv.kind=mse", "losses.kv.normalize=true")
    objective = build_objective(cfg)
    records = load_records(cfg.data)[:4]
    ev = objective.evaluate(records, batch_size=4)
    step = objective.step(records)
    out = objective.space(step)
    for teacher in step.teachers:  # keys and values weigh 1 each: the eval error is half the training term
        lp = objective.pairs[teacher.name]
        per_layer = [v for v in ev[f"eval/kv_error_layers/{teacher.name}"] if v is not None]
        assert len(per_layer) == len(lp.layers)
        assert ev[f"eval/kv_error/{teacher.name}"] == pytest.approx(
            float(out.metrics[f"loss/kv/{teacher.name}"]) / 2, rel=1e-5
        )
    nll, counted = losses.token_nll(step.student.logits, step.batch.ids, step.batch.mask)
    assert ev["eval/ce"] == pytest.approx(float(nll[counted].mean()), rel=1e-6)
