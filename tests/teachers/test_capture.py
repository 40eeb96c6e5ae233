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


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_answer_query_mask_after_multibyte_text(name):
    """answer_start is a character offset, the spans are bytes: 東京 (6 bytes), の, 天気, 😀 (4 bytes), ？ and
    é put the answer at character 24 but byte 42; the mask must cover exactly the answer's tokens '4' '2'."""
    from kvdistill.models.capture import tokenize
    from kvdistill.models.load import load_tokenizer
    from kvdistill.teachers import answer_query_mask

    tok = load_tokenizer(name)
    text = "東京の天気 😀 は？ café\nAnswer: 42"
    records = [
        {"text": text, "answer_start": text.index("42")},
        {"text": "plain\nAnswer: 7", "answer_start": 14},
    ]
    assert records[0]["answer_start"] == 24 and len(text[:24].encode()) == 42
    enc = tokenize(tok, [r["text"] for r in records])
    query = answer_query_mask(records, enc["offset_mapping"], enc["attention_mask"])  # (B, T)
    tokens = [tok.convert_ids_to_tokens(row.tolist()) for row in enc["input_ids"]]
    assert [t for t, q in zip(tokens[0], query[0].tolist(), strict=True) if q] == ["4", "2"]
    assert [t for t, q in zip(tokens[1], query[1].tolist(), strict=True) if q] == ["7"]
    assert query.sum(1).tolist() == [2, 1]
