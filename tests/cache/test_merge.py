"""merge_parts: the parts of an array extraction merged equal one writer's cache; every problem named at once."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from kvdistill.cache import CacheReader, CacheWriter, make_meta, merge_parts, verify_cache
from kvdistill.compress import Compression
from kvdistill.errors import CacheError

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
