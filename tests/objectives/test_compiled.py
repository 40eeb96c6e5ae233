"""train.compile: the loss space's compiled K/V errors equal the eager ones (values and gradients), and where
compilation fails the eager function runs instead."""

from __future__ import annotations

import logging

import pytest
import torch

from kvdistill.data import load_records
from kvdistill.objectives import build_objective
from kvdistill.objectives import compiled as compiled_module
from kvdistill.objectives.compiled import CompiledOrEager
from kvdistill.objectives.loss_space import group_errors


def loss_and_grads(objective, records):
    objective.zero_grad(set_to_none=True)
    loss, metrics = objective(records)
    loss.backward()
    return (
        loss.detach(),
        metrics,
        {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None},
    )


# inductor compiles a few graphs (forward, backward, both group layouts): minutes on 2 cores
@pytest.mark.slow
def test_compiled_equals_eager(tiny_config):
    """Teacher 0 keeps every token (shared alignment), teacher 1 keeps rkv tokens per head: both group
    layouts, with the K/V and cosine errors."""
    objective = build_objective(
        tiny_config(
            "train.compile=true",
            "losses.cosine=0.5",
            "teachers.1.compression.kind=rkv",
            "teachers.1.compression.budget=8",
        )
    )
    records = load_records(objective.cfg.data)[:4]
    wrapper = objective.space.group_errors
    assert isinstance(wrapper, CompiledOrEager)
    compiled = loss_and_grads(objective, records)
    if wrapper.compiled is None:
        pytest.skip("torch.compile does not run on this host (the fallback ran; see the log)")
    objective.space.group_errors = group_errors
    eager = loss_and_grads(objective, records)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
    for key, value in eager[1].items():
        assert compiled[1][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert compiled[2].keys() == eager[2].keys()
    for name, grad in eager[2].items():
        torch.testing.assert_close(compiled[2][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_failing_compile_falls_back_to_eager(tiny_config, monkeypatch, caplog):
    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("backend failed: no C++ compiler")

        return run

    monkeypatch.setattr(compiled_module.torch, "compile", broken_compile)
    objective = build_objective(tiny_config("train.compile=true"))
    records = load_records(objective.cfg.data)[:4]
    with caplog.at_level(logging.WARNING, logger=compiled_module.__name__):
        fallen = loss_and_grads(objective, records)
    assert objective.space.group_errors.compiled is None
    assert "no C++ compiler" in caplog.text and caplog.text.count("runs eagerly") == 1
    objective.space.group_errors = group_errors
    eager = loss_and_grads(objective, records)
    assert torch.equal(fallen[0], eager[0])
    for name, grad in eager[2].items():
        assert torch.equal(fallen[2][name], grad), name


def test_an_error_of_the_function_itself_still_surfaces():
    calls = []

    def bad(x):
        calls.append(x)
        raise ValueError("shapes differ")

    wrapper = CompiledOrEager(bad, "bad")
    with pytest.raises(ValueError, match="shapes differ"):
        wrapper(torch.ones(2))
    assert wrapper.compiled is None and calls  # tried compiled, then eagerly: the eager error is raised


@pytest.mark.parametrize(
    "overrides", [["fusion.space=target"], ["fusion.space=latent", "fusion.latent.dim=8"]]
)
def test_compile_where_nothing_reads_it_is_refused(tiny_config, overrides):
    from kvdistill.errors import ConfigError

    with pytest.raises(ConfigError, match="train.compile compiles the K/V errors"):
        tiny_config("train.compile=true", *overrides)
