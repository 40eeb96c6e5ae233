"""merge_parts: the parts of an array extraction merged equal one writer's cache; every problem named at
once."""

from __future__ import annotations

import pytest

from kvdistill.cache import CacheReader, CacheWriter, merge_parts, verify_cache
from kvdistill.errors import CacheError


def test_parts_and_merge(tmp_path, store):
    chunks = [store.IDS[0:3], store.IDS[3:5], store.IDS[5:7]]
    for i, chunk in enumerate(chunks):
        store.write_all(tmp_path, chunk, part=i)
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
    store.write_all(ref, store.IDS)
    store.assert_same_content(ref, tmp_path)
    merge_parts(tmp_path)  # idempotent
    with pytest.raises(CacheError, match="part manifests"):
        CacheWriter(tmp_path, store.meta_for())  # no single writer into a sharded extraction


def test_merge_errors(tmp_path, store):
    store.write_all(tmp_path, store.IDS[:2], part=0)
    store.write_all(tmp_path, store.IDS[1:3], part=1)  # s1 twice
    w = CacheWriter(tmp_path, store.meta_for(tokenizer="other"), part=2)
    w.add("s9", store.make_sample("s9"))
    w.close(complete=False)
    with pytest.raises(CacheError) as err:
        merge_parts(tmp_path)
    msg = str(err.value)
    assert "'s1' (parts 0 and 1)" in msg
    assert "part 2 differs from part 0: tokenizer differs" in msg
    assert "part 2 is incomplete" in msg
    with pytest.raises(CacheError, match="no part manifests"):
        merge_parts(tmp_path / "empty_dir_does_not_exist")
