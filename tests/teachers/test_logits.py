"""The sparse teacher distribution: top-k log-probabilities equal the dense softmax they come from at every
stored temperature (also for a flat teacher, whose top-k mass is tiny), computed in chunks or at once."""

from __future__ import annotations

import pytest
import torch

import kvdistill.teachers.logits as sparse
from kvdistill.errors import KvdistillError
from kvdistill.teachers.logits import LogitSpec, TeacherLogits, topk_logprobs


def test_topk_equals_the_dense_softmax_at_each_temperature(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 5, 40, generator=gen, dtype=torch.float64) * 3  # (B, T, V)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    temps = (1.0, 2.0, 0.5)
    values, index, shift = topk_logprobs(z, 6, temps, mask)
    assert values.shape == index.shape == (2, 5, 6) and shift.shape == (2, 5, 3)
    monkeypatch.setattr(sparse, "_ROW_BYTES", 4 * 40 * 3)  # chunks of 3 rows: the same numbers
    chunked = topk_logprobs(z, 6, temps, mask)
    assert all(torch.equal(a, b) for a, b in zip((values, index, shift), chunked, strict=True))
    real = mask.bool()
    ref_idx = z.topk(6, -1).indices
    assert torch.equal(index[real], ref_idx[real]) and not index[~real].any()
    record = TeacherLogits(values, index, shift, temps, mask, torch.zeros(2, 5, 2, dtype=torch.long))
    for tau in temps:
        ref = torch.log_softmax(z / tau, -1).gather(-1, ref_idx)  # (B, T, k) the brute-force reference
        ids, logp = record.at(tau)
        assert torch.equal(ids, index) and torch.allclose(logp[real].double(), ref[real], atol=1e-5)
        ids3, logp3 = record.at(tau, k=3)  # a smaller k is the first k: the top-3
        assert torch.equal(ids3, index[..., :3]) and torch.equal(logp3, logp[..., :3])
    with pytest.raises(KvdistillError, match=r"normalised at temperatures \[1.0, 2.0, 0.5\], not at 4.0"):
        record.at(4.0)


def test_a_flat_teacher_keeps_its_small_top_k_mass_exactly():
    """A nearly uniform teacher over 49,152 tokens: the top-16 mass is ~3e-4; the float32 shift keeps each
    log-probability to float32 rounding at every stored τ (renormalising the top-k would give it mass 1)."""
    z = torch.randn(1, 8, 49152, generator=torch.Generator().manual_seed(2)) * 0.1
    values, index, shift = topk_logprobs(z, 16, [1.0, 2.0])
    record = TeacherLogits(
        values, index, shift, (1.0, 2.0), torch.ones(1, 8), torch.zeros(1, 8, 2, dtype=torch.long)
    )
    for tau in (1.0, 2.0):
        ref = torch.log_softmax(z.double() / tau, -1).gather(-1, index)
        _, logp = record.at(tau)
        assert float((logp.double() - ref).abs().max()) < 1e-5
        assert float(logp.exp().sum(-1).max()) < 1e-3  # the tail bucket keeps nearly all the mass


def test_spec():
    small, large = LogitSpec(64, "float16", (2.0,), 49152), LogitSpec(64, "float16", (2.0,), 151936)
    assert (small.index_dtype, large.index_dtype) == ("uint16", "int32")
    assert LogitSpec(100, "bfloat16", (1.0,), 30).to_dict()["top_k"] == 30  # at most the vocabulary
    assert LogitSpec.from_dict(small.to_dict()) == small
