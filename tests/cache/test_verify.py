"""verify_cache finds damage with a clear message; cache_info reports sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kvdistill.cache import CacheReader, CacheWriter, cache_info, format_info, make_meta, verify_cache
from kvdistill.compress import Compression
from kvdistill.errors import CacheError


@pytest.fixture
def cache(tmp_path, store) -> Path:
    store.write_all(tmp_path, store.IDS, shard_size=3)
    assert verify_cache(tmp_path) == []
    return tmp_path


def shard(path: Path, k: int = 1) -> Path:
    return path / f"shard-{k:05d}.safetensors"


def test_flipped_byte_fails_checksum(cache):
    f = shard(cache)
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF  # inside tensor data: still a readable safetensors file
    f.write_bytes(bytes(data))
    problems = verify_cache(cache)
    assert len(problems) == 1
    assert "shard shard-00001.safetensors fails its checksum" in problems[0] and "corrupted" in problems[0]


def test_truncated_shard(cache):
    f = shard(cache)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    problems = verify_cache(cache)
    assert any(f"is {len(data) // 2} bytes, the manifest says {len(data)} (truncated)" in p for p in problems)
    assert any("fails its checksum" in p for p in problems)
    assert any("cannot be read by safetensors" in p for p in problems)
    with pytest.raises(CacheError, match="cannot be read"):
        CacheReader(cache).get("s3")


def test_missing_shard(cache, store):
    shard(cache, 2).unlink()
    assert verify_cache(cache) == ["shard shard-00002.safetensors is missing"]
    with pytest.raises(CacheError, match="is missing"):
        CacheReader(cache).get("s6")
    with pytest.raises(CacheError, match="shard files that are gone"):
        CacheWriter(cache, store.meta_for())


def test_manifest_damage(cache):
    m = json.loads((cache / "manifest.json").read_text())
    m["samples"]["s1"] = {"shard": 0, "index": 9}
    m["samples"]["s2"] = {"shard": 0, "index": 0}
    m["samples"]["s7"] = {"shard": 5, "index": 0}
    (cache / "manifest.json").write_text(json.dumps(m))
    problems = "\n".join(verify_cache(cache))
    assert "sample 's1' points at index 9 of shard shard-00000.safetensors, which holds 3 samples" in problems
    assert "samples 's0' and 's2' point at the same slot 0 of shard-00000.safetensors" in problems
    assert "sample 's7' points at shard 5, the manifest lists 3 shards" in problems
    text = (cache / "manifest.json").read_text().replace('"s0"', '"s3"', 1)  # a duplicate id key
    (cache / "manifest.json").write_text(text)
    assert "lists key 's3' twice" in verify_cache(cache)[0]
    (cache / "manifest.json").write_text("{not json")
    assert "is not valid JSON" in verify_cache(cache)[0]


def test_interrupted_and_tmp_files(tmp_path, store):
    w = CacheWriter(tmp_path, store.meta_for(), shard_size=2)
    for sid in store.IDS[:3]:
        w.add(sid, store.make_sample(sid))
    (tmp_path / "shard-00001.safetensors.tmp").write_bytes(b"x")
    problems = verify_cache(tmp_path)
    assert any("not marked complete" in p for p in problems)
    assert any("leftover temp file shard-00001.safetensors.tmp" in p for p in problems)
    w.close()


def test_shapes_checked_against_geometry_and_compression(tmp_path):
    meta = make_meta(
        "org/tiny",
        {"num_layers": 2, "num_kv_heads": 2, "head_dim": 4},
        "t",
        Compression(kind="rkv", budget=2, dtype="float16").to_dict(),
        "d",
    )
    with CacheWriter(tmp_path, meta) as w:
        w.add(
            "bad",
            {
                "token_ids": torch.arange(5),
                "spans": torch.zeros(4, 2),
                "keys_l0": torch.zeros(3, 4, 5, dtype=torch.bfloat16),
                "values_l0": torch.zeros(3, 4, 4, dtype=torch.bfloat16),
                "index_l0": torch.zeros(3, 4, dtype=torch.int32),
            },
        )
    problems = "\n".join(verify_cache(tmp_path))
    for text in (
        "spans has shape (4, 2), expected 5 tokens",
        "stores key layers [0], the compression says [0, 1]",
        "values_l0 ('BF16', (3, 4, 4)) differs from keys_l0",
        "keys_l0 has 3 heads, the teacher has num_kv_heads=2",
        "keys_l0 has head dim 5, the teacher has head_dim=4",
        "keys_l0 is BF16, the compression dtype is float16",
        "keys_l0 keeps 4 tokens, more than the budget 2",
    ):
        assert text in problems


def test_cache_info(cache, store):
    info = cache_info(cache)
    samples = [store.make_sample(s) for s in store.IDS]
    tokens = sum(s["token_ids"].numel() for s in samples)
    kv = sum(v.numel() * 2 for s in samples for k, v in s.items() if k.startswith(("keys", "values")))
    assert info["num_samples"] == 7 and info["num_shards"] == 3 and info["num_tokens"] == tokens
    assert info["kv_bytes"] == kv and info["kv_bytes_per_token"] == kv / tokens
    assert info["total_bytes"] == sum(p.stat().st_size for p in cache.glob("*.safetensors"))
    assert info["bytes_per_token"] == info["total_bytes"] / tokens
    assert info["layers"][0]["heads"] == 2 and info["layers"][1]["head_dim"] == 4
    assert info["layers"][0]["max_kept"] == 6 and info["compression"]["kind"] == "right_crop"
    assert info["teacher"] == {"id": "org/tiny", "revision": "abc123"}
    assert "7 in 3 shards" in format_info(info)
