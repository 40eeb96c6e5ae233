"""Cache writer / reader: exact round trips, resume after a kill (simulated and real SIGKILL), parts, meta checks."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kvdistill.cache import (
    CacheReader,
    CacheWriter,
    fingerprint_records,
    fingerprint_tokenizer,
    make_meta,
    merge_parts,
    samples_from_capture,
    verify_cache,
)
from kvdistill.compress import Compression
from kvdistill.errors import CacheError
from kvdistill.teachers import compress_capture

GEOMETRY = {"name": "tiny", "num_layers": 2, "num_kv_heads": 2, "head_dim": 4}


def meta_for(compression: Compression | None = None, **change) -> dict:
    comp = (compression or Compression(kind="right_crop", budget=6, dtype="bfloat16")).to_dict()
    meta = make_meta("org/tiny", GEOMETRY, "tok-sha", comp, "data-sha", revision="abc123")
    meta.update(change)
    return meta


def make_sample(sid: str, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """Deterministic tensors in the stored layout, seeded by the id."""
    seed = int(hashlib.sha256(sid.encode()).hexdigest()[:8], 16)
    gen = torch.Generator().manual_seed(seed)
    T = 3 + seed % 7
    M = min(6, T)
    out = {
        "token_ids": torch.randint(0, 1000, (T,), generator=gen),
        "positions": torch.arange(T),
        "spans": torch.stack([torch.arange(T) * 2, torch.arange(T) * 2 + 1], -1),
    }
    for layer in range(2):
        out[f"keys_l{layer}"] = torch.randn(2, M, 4, generator=gen).to(dtype)
        out[f"values_l{layer}"] = torch.randn(2, M, 4, generator=gen).to(dtype)
    return out


def assert_same_content(dir_a: Path, dir_b: Path) -> None:
    a, b = CacheReader(dir_a), CacheReader(dir_b)
    assert sorted(a.sample_ids) == sorted(b.sample_ids)
    for sid in a.sample_ids:
        x, y = a.get(sid), b.get(sid)
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), (sid, k)


def write_all(directory: Path, ids: list[str], shard_size: int = 2, **kw) -> None:
    with CacheWriter(directory, meta_for(), shard_size=shard_size, **kw) as w:
        for sid in ids:
            w.add(sid, make_sample(sid))


IDS = [f"s{i}" for i in range(7)]


# ---------------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_round_trip_exact(tmp_path, dtype):
    comp = Compression(
        kind="right_crop",
        budget=6,
        dtype={torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[dtype],
    )
    written = {sid: make_sample(sid, dtype) for sid in IDS}
    with CacheWriter(tmp_path, meta_for(comp), shard_size=3) as w:
        for sid, t in written.items():
            w.add(sid, t)
    r = CacheReader(tmp_path)
    assert r.sample_ids == IDS and len(r) == 7 and r.complete and r.layers == [0, 1]
    assert len(r.manifest["shards"]) == 3  # 3 + 3 + 1
    for sid in IDS:
        got = r.get(sid)
        assert got.keys() == written[sid].keys()
        for k, v in written[sid].items():
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), (sid, k)
    batch = r.get_batch(["s6", "s0"])
    assert torch.equal(batch[0]["keys_l1"], written["s6"]["keys_l1"]) and torch.equal(
        r[0]["spans"], written["s0"]["spans"]
    )
    assert verify_cache(tmp_path) == []


def test_writer_copies_input_and_refuses_bad_input(tmp_path):
    w = CacheWriter(tmp_path, meta_for(), shard_size=10)
    x = torch.zeros(3)
    w.add("a", {"token_ids": x})
    x += 1  # the writer holds its own copy
    w.add("b", {"token_ids": torch.arange(6).view(2, 3).t()})  # non-contiguous
    assert w.done_ids() == {"a", "b"}
    with pytest.raises(CacheError, match="'a' is already in the cache"):
        w.add("a", {"token_ids": x})
    with pytest.raises(CacheError, match="non-empty dict"):
        w.add("c", {})
    with pytest.raises(CacheError, match="tensor name 'a/b'"):
        w.add("c", {"a/b": x})
    with pytest.raises(CacheError, match="not a dense Tensor"):
        w.add("c", {"x": [1, 2]})
    w.close()
    r = CacheReader(tmp_path)
    assert torch.equal(r.get("a")["token_ids"], torch.zeros(3))
    assert torch.equal(r.get("b")["token_ids"], torch.arange(6).view(2, 3).t())
    with pytest.raises(CacheError, match="sample 'zzz' is not in the cache"):
        r.get("zzz")
    with pytest.raises(CacheError, match="shard_size"):
        CacheWriter(tmp_path / "x", meta_for(), shard_size=0)


# ----------------------------------------------------------------------------------------------- resume


def test_resume_after_simulated_kill_equals_uninterrupted(tmp_path):
    ref = tmp_path / "ref"
    write_all(ref, IDS)
    out = tmp_path / "out"
    w = CacheWriter(out, meta_for(), shard_size=2)
    for sid in IDS[:5]:
        w.add(sid, make_sample(sid))  # s0-s3 in two shards, s4 only buffered
    w._lock.release()  # the process "dies": no close, buffer lost, OS drops the lock
    del w
    (out / "shard-00002.safetensors.tmp").write_bytes(b"half a shard")  # killed while writing a shard
    (out / "shard-00007.safetensors").write_bytes(b"renamed but never listed")  # killed before the manifest
    (out / "manifest.json.tmp").write_text("{")
    assert not CacheReader(out).complete and len(CacheReader(out)) == 4

    w = CacheWriter(out, meta_for(), shard_size=2)
    assert w.done_ids() == set(IDS[:4])
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())
    assert not (out / "shard-00007.safetensors").exists()
    for sid in IDS:
        if sid not in w.done_ids():
            w.add(sid, make_sample(sid))
    w.close()
    assert verify_cache(out) == []
    assert_same_content(ref, out)
    sha = [s["sha256"] for s in json.loads((ref / "manifest.json").read_text())["shards"]]
    assert sha == [s["sha256"] for s in json.loads((out / "manifest.json").read_text())["shards"]]


def test_resume_refuses_different_meta_naming_the_field(tmp_path):
    write_all(tmp_path, IDS[:2])
    cases = {
        "tokenizer differs": meta_for(tokenizer="other-sha"),
        "dataset differs": meta_for(dataset="other-data"),
        "compression differs": meta_for(Compression(kind="rkv", budget=6)),
        "teacher.id differs": make_meta(
            "org/other", GEOMETRY, "tok-sha", meta_for()["compression"], "data-sha", revision="abc123"
        ),
        "teacher.revision differs": make_meta(
            "org/tiny", GEOMETRY, "tok-sha", meta_for()["compression"], "data-sha", revision="def"
        ),
        r"teacher.geometry differs in \['head_dim'\]": make_meta(
            "org/tiny",
            {**GEOMETRY, "head_dim": 8},
            "tok-sha",
            meta_for()["compression"],
            "data-sha",
            revision="abc123",
        ),
    }
    for field, meta in cases.items():
        with pytest.raises(CacheError, match=field) as err:
            CacheWriter(tmp_path, meta)
        assert "fix:" in str(err.value)
    with pytest.raises(CacheError, match="missing meta field 'dataset'"):
        CacheWriter(tmp_path / "new", {k: v for k, v in meta_for().items() if k != "dataset"})


def test_second_writer_on_same_part_is_refused(tmp_path):
    w = CacheWriter(tmp_path, meta_for())
    with pytest.raises(CacheError, match="another writer"):
        CacheWriter(tmp_path, meta_for())
    w.close()
    CacheWriter(tmp_path, meta_for()).close()  # free again after close


# ------------------------------------------------------------------------------------------------ parts


def test_parts_and_merge(tmp_path):
    chunks = [IDS[0:3], IDS[3:5], IDS[5:7]]
    for i, chunk in enumerate(chunks):
        write_all(tmp_path, chunk, part=i)
    assert (tmp_path / "part-1-shard-00000.safetensors").exists() and (
        tmp_path / "manifest.part-2.json"
    ).exists()
    with pytest.raises(CacheError, match="merge_parts"):
        CacheReader(tmp_path)
    with pytest.raises(CacheError, match=r"missing parts \['3'\] of 4"):
        merge_parts(tmp_path, expected_parts=4)
    merged = merge_parts(tmp_path, expected_parts=3)
    assert merged["merged_from"] == ["0", "1", "2"] and merged["complete"]
    assert verify_cache(tmp_path) == []
    ref = tmp_path / "ref"
    write_all(ref, IDS)
    assert_same_content(ref, tmp_path)
    merge_parts(tmp_path)  # idempotent
    with pytest.raises(CacheError, match="part manifests"):
        CacheWriter(tmp_path, meta_for())  # no single writer into a sharded extraction


def test_merge_errors(tmp_path):
    write_all(tmp_path, IDS[:2], part=0)
    write_all(tmp_path, IDS[1:3], part=1)  # s1 twice
    w = CacheWriter(tmp_path, meta_for(tokenizer="other"), part=2)
    w.add("s9", make_sample("s9"))
    w.close(complete=False)
    with pytest.raises(CacheError) as err:
        merge_parts(tmp_path)
    msg = str(err.value)
    assert "'s1' (parts 0 and 1)" in msg
    assert "part 2 differs from part 0: tokenizer differs" in msg
    assert "part 2 is incomplete" in msg
    with pytest.raises(CacheError, match="no part manifests"):
        merge_parts(tmp_path / "empty_dir_does_not_exist")


# ----------------------------------------------------------------------------------------------- reader


def test_reader_compatibility_messages(tmp_path):
    write_all(tmp_path, IDS[:2])
    r = CacheReader(tmp_path)
    assert r.check_compatible(meta_for()) == []
    assert r.check_compatible({"dataset": "data-sha"}) == []  # only given fields are checked
    bad = r.check_compatible(meta_for(Compression(), tokenizer="x"))
    assert [m.split(" ")[0] for m in bad] == ["tokenizer", "compression"]
    with pytest.raises(CacheError, match="tokenizer differs.*compression differs") as err:
        r.require_compatible(meta_for(Compression(), tokenizer="x"))
    assert "re-extract" in str(err.value)
    with pytest.raises(CacheError, match="does not exist"):
        CacheReader(tmp_path / "nope")


def test_fingerprints():
    recs = [{"id": "a", "text": "x y"}, {"id": "b", "text": "z"}]
    fp = fingerprint_records(recs)
    assert fp == fingerprint_records([dict(r, answer="1") for r in recs])
    assert fp != fingerprint_records(recs[::-1])
    assert fp != fingerprint_records(
        [{"id": "a", "text": "x"}, {"id": " yb", "text": "z"}]
    )  # no concatenation clash

    class Slow:
        def get_vocab(self):
            return {"a": 0, "b": 1}

    class Fast:
        def __init__(self, s):
            self.backend_tokenizer = SimpleNamespace(to_str=lambda: s)

    assert len(fingerprint_tokenizer(Slow())) == 64
    assert fingerprint_tokenizer(Fast("{1}")) != fingerprint_tokenizer(Fast("{2}"))


# ------------------------------------------------------------------------------------- capture -> samples


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


# --------------------------------------------------------------------------------------- real SIGKILL


SCRIPT = textwrap.dedent(
    """
    import importlib.util, sys, time
    spec = importlib.util.spec_from_file_location("store_helpers", sys.argv[3])
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    IDS, make_sample, meta_for = helpers.IDS, helpers.make_sample, helpers.meta_for
    from kvdistill.cache import CacheWriter

    out, delay = sys.argv[1], float(sys.argv[2])
    with CacheWriter(out, meta_for(), shard_size=2) as w:
        for sid in IDS:
            if sid in w.done_ids():
                continue
            w.add(sid, make_sample(sid))
            time.sleep(delay)
    """
)


@pytest.mark.slow
def test_sigkill_mid_extraction_then_rerun_equals_uninterrupted(tmp_path):
    script = tmp_path / "extract.py"
    script.write_text(SCRIPT)
    here = str(Path(__file__))
    out, ref = tmp_path / "out", tmp_path / "ref"
    write_all(ref, IDS)
    proc = subprocess.Popen([sys.executable, str(script), str(out), "0.3", here])
    deadline = time.time() + 30
    manifest = out / "manifest.json"
    while time.time() < deadline:  # kill once at least one shard is committed and more are in flight
        if manifest.exists() and json.loads(manifest.read_text())["shards"]:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = CacheReader(out)
    assert not partial.complete and 2 <= len(partial) < len(IDS)
    subprocess.run([sys.executable, str(script), str(out), "0", here], check=True, timeout=60)
    assert verify_cache(out) == []
    assert_same_content(ref, out)


# ----------------------------------------------------------------------------------------------- background


def test_background_writer_equals_foreground(tmp_path):
    write_all(tmp_path / "fg", IDS, shard_size=3)
    with CacheWriter(tmp_path / "bg", meta_for(), shard_size=3, background=True, max_pending=1) as w:
        for sid in IDS:
            w.add(sid, make_sample(sid), copy=False)
            assert sid in w.done_ids()  # queued ids count as done: never added twice
    assert verify_cache(tmp_path / "bg") == []
    assert_same_content(tmp_path / "fg", tmp_path / "bg")
    a = json.loads((tmp_path / "fg" / "manifest.json").read_text())
    b = json.loads((tmp_path / "bg" / "manifest.json").read_text())
    assert a["shards"] == b["shards"] and a["samples"] == b["samples"] and b["complete"]


def test_background_writer_error_surfaces_and_nothing_half_written_is_listed(tmp_path, monkeypatch):
    import kvdistill.cache.store as store

    calls = []

    def failing_save(flat, metadata=None):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return store.st_save.__wrapped__(flat, metadata=metadata)

    failing_save.__wrapped__ = store.st_save
    monkeypatch.setattr(store, "st_save", failing_save)
    w = CacheWriter(tmp_path, meta_for(), shard_size=2, background=True)
    with pytest.raises(CacheError, match="disk full"):
        for sid in IDS:
            w.add(sid, make_sample(sid))
            time.sleep(0.05)
        w.close()
    assert w.closed
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == ["shard-00000.safetensors"] and not manifest["complete"]
    monkeypatch.undo()
    with CacheWriter(tmp_path, meta_for(), shard_size=2) as w:  # the lock was released: a rerun resumes
        for sid in IDS:
            if sid not in w.done_ids():
                w.add(sid, make_sample(sid))
    assert verify_cache(tmp_path) == [] and len(CacheReader(tmp_path)) == len(IDS)
