"""The sparse teacher distribution: top-k log-probabilities and tail masses equal the dense softmax they come from,
at every stored temperature, computed in chunks or at once."""

from __future__ import annotations

import pytest
import torch

import kvdistill.teachers.logits as sparse
from kvdistill.errors import KvdistillError
from kvdistill.teachers.logits import LogitSpec, TeacherLogits, topk_logprobs


def test_topk_and_tails_equal_the_dense_softmax_at_each_temperature(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 5, 40, generator=gen, dtype=torch.float64) * 3  # (B, T, V)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    temps = (1.0, 2.0, 0.5)
    values, index, shift, tail = topk_logprobs(z, 6, temps, mask)
    assert values.shape == index.shape == (2, 5, 6) and shift.shape == tail.shape == (2, 5, 3)
    monkeypatch.setattr(sparse, "_ROW_BYTES", 4 * 40 * 3)  # chunks of 3 rows: the same numbers
    chunked = topk_logprobs(z, 6, temps, mask)
    assert all(torch.equal(a, b) for a, b in zip((values, index, shift, tail), chunked, strict=True))
    real = mask.bool()
    ref_idx = z.topk(6, -1).indices
    assert torch.equal(index[real], ref_idx[real]) and not index[~real].any()
    record = TeacherLogits(values, index, shift, tail, temps, mask)
    for n, tau in enumerate(temps):
        logp = torch.log_softmax(z / tau, -1)  # (B, T, V) the brute-force reference
        top = logp.gather(-1, ref_idx)
        rest = torch.log(1 - top.exp().sum(-1))  # (B, T)
        assert torch.allclose(tail[..., n][real].double(), rest[real], atol=1e-5)
        got_top, got_tail = record.at(tau)
        assert torch.allclose(got_top[real].double(), top[real], atol=1e-5)
        assert torch.allclose(got_tail[real].double(), rest[real], atol=1e-5)
        total = got_top.exp().sum(-1) + got_tail.exp()  # a distribution: k entries + the tail bucket
        assert torch.allclose(total[real], torch.ones(()), atol=1e-5)
    with pytest.raises(KvdistillError, match=r"temperatures \[1.0, 2.0, 0.5\], not at 4.0"):
        record.at(4.0)


def test_k_of_the_whole_vocabulary_leaves_an_empty_tail():
    z = torch.randn(1, 3, 7, generator=torch.Generator().manual_seed(1))
    values, index, shift, tail = topk_logprobs(z, 50, [1.0])
    assert values.shape == (1, 3, 7) and torch.isneginf(tail).all()
    top, log_tail = TeacherLogits(values, index, shift, tail, (1.0,), torch.ones(1, 3)).at(1.0)
    assert torch.allclose(top, torch.log_softmax(z, -1).gather(-1, index), atol=1e-6) and torch.isneginf(log_tail).all()


def test_a_flat_teacher_keeps_its_small_top_k_mass_exactly():
    """A nearly uniform teacher over 49,152 tokens: the top-16 mass is ~3e-4, which 1 − tail would lose in float32;
    the stored shift keeps each log-probability to float32 rounding."""
    z = torch.randn(1, 8, 49152, generator=torch.Generator().manual_seed(2)) * 0.1
    values, index, shift, tail = topk_logprobs(z, 16, [1.0, 2.0])
    record = TeacherLogits(values, index, shift, tail, (1.0, 2.0), torch.ones(1, 8))
    for tau in (1.0, 2.0):
        ref = torch.log_softmax(z.double() / tau, -1)
        top, log_tail = record.at(tau)
        assert float((top.double() - ref.gather(-1, index)).abs().max()) < 1e-5
        assert float((log_tail.double() - torch.log1p(-ref.gather(-1, index).exp().sum(-1))).abs().max()) < 1e-5


def test_spec():
    small, large = LogitSpec(64, "float16", (2.0,), 49152), LogitSpec(64, "float16", (2.0,), 151936)
    assert (small.index_dtype, large.index_dtype) == ("uint16", "int32")
    assert LogitSpec(100, "bfloat16", (1.0,), 30).to_dict()["top_k"] == 30  # at most the vocabulary
    assert LogitSpec.from_dict(small.to_dict()) == small
