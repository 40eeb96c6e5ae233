"""capture -> stored samples: independent of the padding side, and read back as a batch equal to the online
compression (`compress_capture`)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kvdistill.cache import CacheReader, CacheWriter, make_meta, samples_from_capture, verify_cache
from kvdistill.compress import Compression
from kvdistill.teachers import compress_capture

GEOMETRY = {"name": "tiny", "num_layers": 2, "num_kv_heads": 2, "head_dim": 4}


def fake_capture(left: bool, seed: int = 0):
    """A 2-layer capture with 2 samples of 5 and 8 real tokens, right or left padded to T=8."""
    gen = torch.Generator().manual_seed(seed)
    B, H_q, H, T, D = 2, 4, 2, 8, 4
    lengths = [5, 8]
    keys = [torch.randn(B, H, T, D, generator=gen) for _ in range(2)]
    values = [torch.randn(B, H, T, D, generator=gen) for _ in range(2)]
    attn = [torch.rand(B, H_q, T, T, generator=gen).softmax(-1) for _ in range(2)]
    ids = torch.randint(0, 100, (B, T), generator=gen)
    spans = torch.stack([torch.arange(T) * 3, torch.arange(T) * 3 + 2], -1).expand(B, T, 2).clone()
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in lengths])
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    query = torch.zeros(B, T, dtype=torch.long)
    query[0, 3:5] = 1
    query[1, 6:8] = 1
    if left:  # move each sample's real tokens to the right end; padding content is garbage
        for b, n in enumerate(lengths):
            s = T - n

            def roll(x, dim, s=s):
                return torch.roll(x, s, dims=dim)

            for layer in range(2):
                keys[layer][b] = roll(keys[layer][b], 1)
                values[layer][b] = roll(values[layer][b], 1)
                attn[layer][b] = roll(roll(attn[layer][b], 1), 2)
                keys[layer][b, :, :s] = 7.0
            ids[b], spans[b], mask[b], positions[b], query[b] = (
                roll(x[b], 0) for x in (ids, spans, mask, positions, query)
            )
    geometry = SimpleNamespace(num_layers=2, num_kv_heads=H)
    cap = SimpleNamespace(
        keys=keys,
        values=values,
        attentions=attn,
        input_ids=ids,
        spans=spans,
        attention_mask=mask,
        positions=positions,
        geometry=geometry,
        spans_cpu=None,
        attention_mask_cpu=None,
        importance=None,
    )
    return cap, query


@pytest.mark.parametrize(
    "comp",
    [
        Compression(kind="full", dtype="float32"),
        Compression(kind="right_crop", budget=6, dtype="float32"),
        Compression(kind="rkv", budget=3, dtype="float32", layers=[1]),
    ],
)
def test_samples_from_capture_padding_independent_and_reader_batch(tmp_path, comp):
    cap_r, q_r = fake_capture(left=False)
    cap_l, q_l = fake_capture(left=True)
    right = samples_from_capture(cap_r, comp, q_r)
    left = samples_from_capture(cap_l, comp, q_l)
    for a, b in zip(right, left, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert right[0]["token_ids"].shape == (5,)
    layers = comp.resolve_layers(2)
    M = {"full": 5, "right_crop": 5, "rkv": 3}[comp.kind]
    assert right[0][f"keys_l{layers[0]}"].shape == (2, M, 4)
    assert ("index_l1" in right[0]) == (comp.kind == "rkv")

    meta = make_meta("org/tiny", GEOMETRY, "tok", comp.to_dict(), "ds")
    with CacheWriter(tmp_path, meta) as w:
        for i, s in enumerate(right):
            w.add(f"r{i}", s)
    assert verify_cache(tmp_path) == []
    tkv = CacheReader(tmp_path).teacher_kv(["r0", "r1"])
    online = compress_capture(cap_r, comp, layers, q_r)
    for layer in layers:
        if comp.kind == "full":  # padded batch equals the capture at real tokens
            m = cap_r.attention_mask.bool()
            assert torch.equal(tkv.mask[layer], cap_r.attention_mask)
            assert torch.equal(tkv.keys[layer].transpose(1, 2)[m], cap_r.keys[layer].transpose(1, 2)[m])
            assert torch.equal(tkv.spans[layer], cap_r.spans * cap_r.attention_mask.unsqueeze(-1))
        else:  # right padding: the cache batch is the online compression, trimmed to the longest kept row
            width = tkv.keys[layer].shape[2]
            kept = online.mask[layer][:, :, :width].bool()
            assert torch.equal(tkv.mask[layer], online.mask[layer][:, :, :width])
            assert torch.equal(tkv.keys[layer][kept], online.keys[layer][:, :, :width][kept])
            assert torch.equal(tkv.values[layer][kept], online.values[layer][:, :, :width][kept])
            assert torch.equal(tkv.spans[layer][kept], online.spans[layer][:, :, :width][kept])


def test_layers_resolved_by_the_caller_equal_the_default():
    """`kvdistill extract` resolves the stored layers once and hands them down; the result is the
    default's."""
    cap, query = fake_capture(left=False)
    comp = Compression(kind="rkv", budget=3, dtype="float32")
    default = samples_from_capture(cap, comp, query)
    given = samples_from_capture(cap, comp, query, layers=comp.resolve_layers(2))
    for a, b in zip(default, given, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    only = samples_from_capture(cap, comp, query, layers=[1])[0]
    assert sorted(only) == ["index_l1", "keys_l1", "positions", "spans", "token_ids", "values_l1"]
    assert torch.equal(only["keys_l1"], default[0]["keys_l1"])


@pytest.mark.parametrize("left", [False, True])
def test_stacked_rkv_selection_equals_the_per_layer_one(left):
    """The extraction scores and ranks groups of layers in one call; the selection is the per-layer one."""
    from kvdistill.compress import importance_from_attention, layer_selection, stacked_rkv_selection

    cap, query = fake_capture(left=left)
    cap.importance = {
        j: importance_from_attention(cap.attentions[j], query, cap.attention_mask, 2) for j in (0, 1)
    }
    comp = Compression(kind="rkv", budget=3, dtype="float32")
    for group in (1, 2):
        stacked = stacked_rkv_selection(cap, comp, [0, 1], group=group)
        for j in (0, 1):
            idx, kept = layer_selection(cap, comp, j, query)
            assert torch.equal(stacked[j][0], idx) and torch.equal(stacked[j][1], kept)
    # not for what it cannot batch: other scorings, a missing importance
    assert stacked_rkv_selection(cap, Compression(kind="rkv", budget=3, scoring="kava"), [0, 1]) is None
    cap.importance.pop(1)
    assert stacked_rkv_selection(cap, comp, [0, 1]) is None


@pytest.mark.parametrize("kind", ["full", "right_crop", "rkv"])
@pytest.mark.parametrize("left", [False, True])
def test_samples_equal_a_per_sample_per_layer_reference(kind, left):
    """`capture_to_host` gathers every layer into one buffer and ranks the rkv index of all layers in one
    gather; each stored tensor equals the one cut from that layer's own selection, sample by sample."""
    from kvdistill.compress import importance_from_attention, layer_selection

    cap, query = fake_capture(left=left)
    cap.importance = {
        j: importance_from_attention(cap.attentions[j], query, cap.attention_mask, 2) for j in (0, 1)
    }
    comp = Compression(kind=kind, budget=None if kind == "full" else 3, dtype="float32")
    samples = samples_from_capture(cap, comp, query)
    for b, sample in enumerate(samples):
        real = cap.attention_mask[b].bool()
        n = int(real.sum())
        rank = real.long().cumsum(0) - 1  # (T,)
        for j in (0, 1):
            K, V = cap.keys[j][b], cap.values[j][b]  # (H, T, D)
            if kind == "full":
                assert torch.equal(sample[f"keys_l{j}"], K[:, real])
                assert torch.equal(sample[f"values_l{j}"], V[:, real])
                continue
            idx = layer_selection(cap, comp, j, query)[0][b]  # (H, M) or (M,)
            idx = (idx if idx.dim() == 2 else idx.expand(K.shape[0], -1))[:, : min(3, n)]  # (H, M_b)
            at = idx[..., None].expand(*idx.shape, K.shape[-1])
            assert torch.equal(sample[f"keys_l{j}"], K.gather(1, at))
            assert torch.equal(sample[f"values_l{j}"], V.gather(1, at))
            if kind == "rkv":
                assert sample[f"index_l{j}"].dtype == torch.int32
                assert torch.equal(sample[f"index_l{j}"], rank[idx].int())


def test_nonfinite_importance_is_refused_once_the_batch_reaches_the_host():
    """The extraction's selection reads nothing back from the device: the finiteness of the rkv importance
    travels with the batch and `host_samples` refuses a NaN."""
    from kvdistill.cache.batch import capture_to_host, host_samples
    from kvdistill.compress import importance_from_attention
    from kvdistill.errors import KvdistillError

    cap, query = fake_capture(left=False)
    cap.importance = {
        j: importance_from_attention(cap.attentions[j], query, cap.attention_mask, 2) for j in (0, 1)
    }
    comp = Compression(kind="rkv", budget=3, dtype="float32")
    host = capture_to_host(cap, comp, [0, 1], query)
    assert host.finite is not None and bool(host.finite)
    assert len(host_samples(host)) == 2
    cap.importance[1][0, 1, 2] = float("nan")  # a real token of sample 0
    host = capture_to_host(cap, comp, [0, 1], query)  # no error yet: nothing was read back
    with pytest.raises(KvdistillError, match="NaN or inf"):
        host_samples(host)
    assert capture_to_host(cap, Compression(kind="right_crop", budget=3), [0, 1]).finite is None
