"""Every fusion option does what the config says: k-means prototypes route differently from the mean,
similarity weights are `fuse.similarity_weights` of `fuse.prototype` on the space's rows, and target-space
similarity is not the fixed weights."""

from __future__ import annotations

import pytest
import torch

from kvdistill.data import load_records
from kvdistill.fuse import prototype, similarity_weights
from kvdistill.objectives import build_objective


def test_kmeans_prototypes_are_used_and_route_differently_from_the_mean(tiny_config):
    records = load_records(tiny_config().data)[:4]
    weights = {}
    for kind in ("mean", "kmeans"):
        cfg = tiny_config(
            "fusion.kind=similarity",
            f"fusion.similarity.prototype={kind}",
            "fusion.similarity.kmeans_k=3",
            "fusion.similarity.temperature=0.05",
        )
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
    objective = build_objective(
        tiny_config("fusion.space=target", "fusion.kind=similarity", "fusion.similarity.temperature=0.05")
    )
    out = objective.space(objective.step(records))
    assert out.weights.shape == (4, 2)
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(4))
    assert (out.weights - 0.5).abs().max() > 1e-3  # fixed would be 0.5 / 0.5
    assert out.weights.std(0).max() > 1e-4  # and it depends on the sample


def _skills_config(tiny_config, *overrides):
    return tiny_config(
        "data.source=skills",
        "data.skills=[arithmetic,sorting]",
        "data.max_length=64",
        "teachers.0.skill=arithmetic",
        "teachers.1.skill=sorting",
        *overrides,
    )


@torch.no_grad()
def _brute_force_nll_per_byte(objective, step, records) -> torch.Tensor:
    """(B, N): each teacher's model run again, its full log-softmax, and a Python loop over the tokens that
    start at or after the end of the question line and end within the bytes every teacher's tokens reach: Σ
    -log p(token) / Σ bytes."""
    out = torch.zeros(len(records), len(objective.teachers))
    reach = [
        min(
            max(
                int(e)
                for (_, e), m in zip(r.capture.spans[b].tolist(), r.capture.attention_mask[b], strict=True)
                if m
            )
            for r in step.records
        )
        for b in range(len(records))
    ]
    for n, teacher in enumerate(objective.teachers):
        cap = step.records[n].capture
        logp = torch.log_softmax(
            teacher.model(input_ids=cap.input_ids, attention_mask=cap.attention_mask).logits.float(), -1
        )  # (B, T_t, V)
        for b, r in enumerate(records):
            start = len(r["text"][: r["text"].index("\n") + 1].encode())
            total, nbytes = 0.0, 0
            for j in range(1, cap.input_ids.shape[1]):
                lo, hi = (int(x) for x in cap.spans[b, j])
                if (
                    cap.attention_mask[b, j]
                    and cap.attention_mask[b, j - 1]
                    and hi > lo
                    and lo >= start
                    and hi <= reach[b]
                ):
                    total -= float(logp[b, j - 1, cap.input_ids[b, j]])
                    nbytes += hi - lo
            out[b, n] = total / nbytes
    return out


def test_confidence_weights_are_the_teachers_own_nll_per_byte_and_give_the_routing_accuracy(tiny_config):
    from kvdistill.fuse import confidence_weights
    from kvdistill.fuse.routing_accuracy import routing_accuracy
    from kvdistill.objectives.fusion import common_end, scored_start, teacher_nll_per_byte

    cfg = _skills_config(tiny_config, "fusion.kind=confidence", "fusion.confidence.temperature=0.05")
    records = load_records(cfg.data)[:4]
    objective = build_objective(cfg)
    step = objective.step(records)
    assert all(
        r.capture.logits is None for r in step.records
    )  # scored a few samples at a time, never all at once
    nll = _brute_force_nll_per_byte(objective, step, records)
    torch.testing.assert_close(step.teacher_nll, nll, rtol=1e-4, atol=1e-4)
    start = scored_start(records, "continuation", cfg.data.template)
    end = common_end([r.capture for r in step.records])
    for n, teacher in enumerate(objective.teachers):  # chunks of 3 and 1 samples: the same numbers
        for chunk in (3, 1):
            got = teacher_nll_per_byte(teacher.model, step.records[n].capture, start, end, chunk=chunk)
            torch.testing.assert_close(got, nll[:, n], rtol=1e-4, atol=1e-4)
    expected = torch.softmax(-nll / 0.05, -1)
    torch.testing.assert_close(objective.space(step).weights, expected, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(confidence_weights(nll, 0.05), expected)
    got = objective.evaluate(records)
    want = routing_accuracy(expected, [r["skill"] for r in records], {"arithmetic": 0, "sorting": 1})
    assert {k: got[f"eval/{k}"] for k in want} == pytest.approx(want, abs=1e-4)


def test_a_router_trained_toward_the_confidence_weights_gets_no_gradient_from_the_kv_loss(tiny_config):
    from kvdistill.fuse import confidence_weights, router_target_kl

    cfg = _skills_config(
        tiny_config,
        "fusion.kind=router",
        "fusion.router.target=confidence",
        "fusion.router.target_weight=2.0",
        "fusion.entropy.weight=0",
        "fusion.confidence.temperature=0.2",
    )
    records = load_records(cfg.data)[:4]
    objective = build_objective(cfg)
    for p in objective.fusion.router.parameters():  # off the uniform start
        torch.nn.init.normal_(p, std=0.3)
    loss, metrics = objective(records)
    loss.backward()
    got = [p.grad.clone() for p in objective.fusion.router.parameters()]
    objective.zero_grad()
    step = objective.step(records)
    w = objective.fusion.router(step.hidden.detach().float(), step.batch.mask)
    ref = 2.0 * router_target_kl(w, confidence_weights(step.teacher_nll, 0.2))
    ref.backward()
    for g, p in zip(got, objective.fusion.router.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad)
    assert metrics["loss/router_target"] == pytest.approx(float(ref.detach()) / 2, rel=1e-4)
    assert not objective.space(step).weights.requires_grad  # the K/V loss sees the router's weights detached


def test_scored_start_is_the_end_of_the_question_line_in_bytes_and_refuses_records_without_one():
    from kvdistill.errors import KvdistillError
    from kvdistill.objectives.fusion import scored_start

    template = "Question: {question}\nReasoning: {cot}\nAnswer: {answer}\n"
    rec = {"id": "a", "question": "Is 3 € > 2?", "text": "Question: Is 3 € > 2?\nReasoning: yes\nAnswer: 1\n"}
    assert scored_start([rec], "continuation", template).tolist() == [len("Question: Is 3 € > 2?\n".encode())]
    assert scored_start([rec], "text", template).tolist() == [0]
    with pytest.raises(KvdistillError, match="fusion.confidence.span: text"):
        scored_start([{"id": "b", "text": "plain text", "question": None}], "continuation", template)
