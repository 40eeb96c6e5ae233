"""compress_capture: the online teacher's selection of kept tokens, per layer and head."""

from __future__ import annotations

import pytest
import torch

from kvdistill.compress import Compression, gather_kv, importance_from_attention, rkv_select
from kvdistill.errors import KvdistillError
from kvdistill.teachers import compress_capture


def test_compress_capture_shapes_and_content():
    from types import SimpleNamespace

    B, H_q, H, T, D = 2, 4, 2, 6, 3
    gen = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    cap = SimpleNamespace(
        keys=[torch.randn(B, H, T, D, generator=gen) for _ in range(2)],
        values=[torch.randn(B, H, T, D, generator=gen) for _ in range(2)],
        attentions=[torch.rand(B, H_q, T, T, generator=gen).softmax(-1) for _ in range(2)],
        attention_mask=mask,
        spans=torch.arange(B * T * 2).view(B, T, 2),
        geometry=SimpleNamespace(num_kv_heads=H),
        importance=None,
    )
    query = torch.zeros(B, T, dtype=torch.long)
    query[:, 3] = 1
    tkv = compress_capture(cap, Compression(kind="rkv", budget=3), [1], query)
    assert tkv.keys[1].shape == (B, H, 3, D) and tkv.spans[1].shape == (B, H, 3, 2)
    imp = importance_from_attention(cap.attentions[1], query, mask, H)
    idx, kept = rkv_select(cap.keys[1], imp, mask, 3)
    assert torch.equal(tkv.values[1], gather_kv(cap.values[1], idx))
    assert torch.equal(tkv.mask[1], kept.long())
    crop = compress_capture(cap, Compression(kind="right_crop", budget=5), [0], None)
    assert crop.mask[0][0, 0].tolist() == [1, 1, 1, 1, 0]
    assert torch.equal(crop.keys[0][1], cap.keys[0][1, :, :5])
    with pytest.raises(KvdistillError, match="query mask"):
        compress_capture(cap, Compression(kind="rkv", budget=3), [0], None)
