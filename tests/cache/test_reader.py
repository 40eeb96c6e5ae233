"""CacheReader: exact round trips in every storage dtype, lookups and compatibility messages."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from kvdistill.cache import CacheReader, CacheWriter, make_meta, verify_cache
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


def write_all(directory: Path, ids: list[str], shard_size: int = 2, **kw) -> None:
    with CacheWriter(directory, meta_for(), shard_size=shard_size, **kw) as w:
        for sid in ids:
            w.add(sid, make_sample(sid))


IDS = [f"s{i}" for i in range(7)]


# ------------------------------------------------------------------------------------------------ round trip


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


# --------------------------------------------------------------------------------------------- compatibility


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
