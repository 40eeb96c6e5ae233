"""CacheWriter: input checks, resume after a kill (simulated and real SIGKILL), meta checks on resume, one
writer per part, the background writer thread."""

from __future__ import annotations

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
    verify_cache,
)
from kvdistill.compress import Compression
from kvdistill.errors import CacheError

# ----------------------------------------------------------------------------------------------------- input


def test_writer_copies_input_and_refuses_bad_input(tmp_path, store):
    w = CacheWriter(tmp_path, store.meta_for(), shard_size=10)
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
        CacheWriter(tmp_path / "x", store.meta_for(), shard_size=0)
    with pytest.raises(CacheError, match="max_pending 0 must be a positive integer"):
        CacheWriter(tmp_path / "y", store.meta_for(), background=True, max_pending=0)
    assert not (tmp_path / "y").exists()  # refused before anything is written


# ---------------------------------------------------------------------------------------------------- resume


def test_resume_after_simulated_kill_equals_uninterrupted(tmp_path, store):
    ref = tmp_path / "ref"
    store.write_all(ref, store.IDS)
    out = tmp_path / "out"
    w = CacheWriter(out, store.meta_for(), shard_size=2)
    for sid in store.IDS[:5]:
        w.add(sid, store.make_sample(sid))  # s0-s3 in two shards, s4 only buffered
    w._lock.release()  # the process "dies": no close, buffer lost, OS drops the lock
    del w
    (out / "shard-00002.safetensors.tmp").write_bytes(b"half a shard")  # killed while writing a shard
    (out / "shard-00007.safetensors").write_bytes(b"renamed but never listed")  # killed before the manifest
    (out / "manifest.json.tmp").write_text("{")
    assert not CacheReader(out).complete and len(CacheReader(out)) == 4

    w = CacheWriter(out, store.meta_for(), shard_size=2)
    assert w.done_ids() == set(store.IDS[:4])
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())
    assert not (out / "shard-00007.safetensors").exists()
    for sid in store.IDS:
        if sid not in w.done_ids():
            w.add(sid, store.make_sample(sid))
    w.close()
    assert verify_cache(out) == []
    store.assert_same_content(ref, out)
    sha = [s["sha256"] for s in json.loads((ref / "manifest.json").read_text())["shards"]]
    assert sha == [s["sha256"] for s in json.loads((out / "manifest.json").read_text())["shards"]]


def test_resume_refuses_different_meta_naming_the_field(tmp_path, store):
    store.write_all(tmp_path, store.IDS[:2])
    cases = {
        "tokenizer differs": store.meta_for(tokenizer="other-sha"),
        "dataset differs": store.meta_for(dataset="other-data"),
        "compression differs": store.meta_for(Compression(kind="rkv", budget=6)),
        "teacher.id differs": make_meta(
            "org/other",
            store.GEOMETRY,
            "tok-sha",
            store.meta_for()["compression"],
            "data-sha",
            revision="abc123",
        ),
        "teacher.revision differs": make_meta(
            "org/tiny", store.GEOMETRY, "tok-sha", store.meta_for()["compression"], "data-sha", revision="def"
        ),
        r"teacher.geometry differs in \['head_dim'\]": make_meta(
            "org/tiny",
            {**store.GEOMETRY, "head_dim": 8},
            "tok-sha",
            store.meta_for()["compression"],
            "data-sha",
            revision="abc123",
        ),
    }
    for field, meta in cases.items():
        with pytest.raises(CacheError, match=field) as err:
            CacheWriter(tmp_path, meta)
        assert "fix:" in str(err.value)
    with pytest.raises(CacheError, match="missing meta field 'dataset'"):
        CacheWriter(tmp_path / "new", {k: v for k, v in store.meta_for().items() if k != "dataset"})


def test_second_writer_on_same_part_is_refused(tmp_path, store):
    w = CacheWriter(tmp_path, store.meta_for())
    with pytest.raises(CacheError, match="another writer"):
        CacheWriter(tmp_path, store.meta_for())
    w.close()
    CacheWriter(tmp_path, store.meta_for()).close()  # free again after close


# ------------------------------------------------------------------------------------------------------ meta


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


# ---------------------------------------------------------------------------------------------- real SIGKILL


SCRIPT = textwrap.dedent(
    """
    import importlib.util, sys, time
    spec = importlib.util.spec_from_file_location("cache_helpers", sys.argv[3])
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
def test_sigkill_mid_extraction_then_rerun_equals_uninterrupted(tmp_path, store):
    script = tmp_path / "extract.py"
    script.write_text(SCRIPT)
    here = str(Path(__file__).with_name("conftest.py"))  # the one copy of IDS, meta_for and make_sample
    out, ref = tmp_path / "out", tmp_path / "ref"
    store.write_all(ref, store.IDS)
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
    assert not partial.complete and 2 <= len(partial) < len(store.IDS)
    subprocess.run([sys.executable, str(script), str(out), "0", here], check=True, timeout=60)
    assert verify_cache(out) == []
    store.assert_same_content(ref, out)


# ------------------------------------------------------------------------------------------------ background


def test_background_writer_equals_foreground(tmp_path, store):
    store.write_all(tmp_path / "fg", store.IDS, shard_size=3)
    with CacheWriter(tmp_path / "bg", store.meta_for(), shard_size=3, background=True, max_pending=1) as w:
        for sid in store.IDS:
            w.add(sid, store.make_sample(sid), copy=False)
            assert sid in w.done_ids()  # queued ids count as done: never added twice
    assert verify_cache(tmp_path / "bg") == []
    store.assert_same_content(tmp_path / "fg", tmp_path / "bg")
    a = json.loads((tmp_path / "fg" / "manifest.json").read_text())
    b = json.loads((tmp_path / "bg" / "manifest.json").read_text())
    assert a["shards"] == b["shards"] and a["samples"] == b["samples"] and b["complete"]


def test_background_writer_error_surfaces_and_nothing_half_written_is_listed(tmp_path, monkeypatch, store):
    import kvdistill.cache.writer as writer

    calls = []

    real_parts = writer.safetensors_parts

    def failing_parts(flat, metadata):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_parts(flat, metadata)

    monkeypatch.setattr(writer, "safetensors_parts", failing_parts)
    w = CacheWriter(tmp_path, store.meta_for(), shard_size=2, background=True)
    with pytest.raises(CacheError, match="disk full"):
        for sid in store.IDS:
            w.add(sid, store.make_sample(sid))
            time.sleep(0.05)
        w.close()
    assert w.closed
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == ["shard-00000.safetensors"] and not manifest["complete"]
    monkeypatch.undo()
    with CacheWriter(tmp_path, store.meta_for(), shard_size=2) as w:  # the lock was released: a rerun resumes
        for sid in store.IDS:
            if sid not in w.done_ids():
                w.add(sid, store.make_sample(sid))
    assert verify_cache(tmp_path) == [] and len(CacheReader(tmp_path)) == len(store.IDS)


def test_shard_bytes_equal_safetensors_save():
    """The writer streams a shard as header + each tensor's memory (`safetensors_parts`); the file is byte for
    byte what `safetensors.torch.save` makes, for every stored dtype, scalars, empty tensors and non-ASCII
    ids."""
    import json

    from safetensors.torch import save as st_save

    from kvdistill.cache.writer import safetensors_parts

    gen = torch.Generator().manual_seed(0)
    tensors = {
        "0/keys_l3": torch.randn(2, 5, 4, generator=gen).bfloat16(),
        "0/index_l3": torch.randint(0, 9, (2, 5), generator=gen, dtype=torch.int32),
        "0/token_ids": torch.arange(7),
        "1/values_l10": torch.randn(2, 3, 4, generator=gen).half(),
        "1/f": torch.randn(3, generator=gen),
        "1/d": torch.randn(2, generator=gen, dtype=torch.float64),
        "1/flag": torch.tensor([True, False]),
        "1/byte": torch.tensor([7], dtype=torch.uint8),
        "1/scalar": torch.tensor(2.5),
        "1/empty": torch.zeros(0, 4).bfloat16(),
    }
    for ids in (["a", "b"], ['quo"te', "naïve-東京", "ctl\x01"]):
        meta = {"kvdistill_samples": json.dumps(ids)}
        assert b"".join(bytes(p) for p in safetensors_parts(tensors, meta)) == st_save(tensors, metadata=meta)
    odd = {"c": torch.zeros(2, dtype=torch.complex64)}  # a dtype the table lacks: safetensors' own save
    assert safetensors_parts(odd, {}) == [st_save(odd, metadata={})]
