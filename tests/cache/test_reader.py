"""CacheReader: exact round trips in every storage dtype, lookups and compatibility messages."""

from __future__ import annotations

import pytest
import torch

from kvdistill.cache import CacheReader, CacheWriter, verify_cache
from kvdistill.compress import Compression
from kvdistill.errors import CacheError

# ------------------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_round_trip_exact(tmp_path, dtype, store):
    comp = Compression(
        kind="right_crop",
        budget=6,
        dtype={torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[dtype],
    )
    written = {sid: store.make_sample(sid, dtype) for sid in store.IDS}
    with CacheWriter(tmp_path, store.meta_for(comp), shard_size=3) as w:
        for sid, t in written.items():
            w.add(sid, t)
    r = CacheReader(tmp_path)
    assert r.sample_ids == store.IDS and len(r) == 7 and r.complete and r.layers == [0, 1]
    assert len(r.manifest["shards"]) == 3  # 3 + 3 + 1
    for sid in store.IDS:
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


def test_reader_compatibility_messages(tmp_path, store):
    store.write_all(tmp_path, store.IDS[:2])
    r = CacheReader(tmp_path)
    assert r.check_compatible(store.meta_for()) == []
    assert r.check_compatible({"dataset": "data-sha"}) == []  # only given fields are checked
    bad = r.check_compatible(store.meta_for(Compression(), tokenizer="x"))
    assert [m.split(" ")[0] for m in bad] == ["tokenizer", "compression"]
    with pytest.raises(CacheError, match="tokenizer differs.*compression differs") as err:
        r.require_compatible(store.meta_for(Compression(), tokenizer="x"))
    assert "re-extract" in str(err.value)
    with pytest.raises(CacheError, match="does not exist"):
        CacheReader(tmp_path / "nope")
