"""The manifest records the span unit: schema 2 caches hold UTF-8 byte spans, schema 1 caches (character
spans) and any other unit are refused with a message to re-extract."""

from __future__ import annotations

import json

import pytest

from kvdistill.cache import CacheReader, CacheWriter, make_meta
from kvdistill.cache.manifest import MANIFEST, SCHEMA_VERSION, SPAN_UNIT, check_meta, read_manifest
from kvdistill.compress import Compression
from kvdistill.errors import CacheError


def meta() -> dict:
    comp = Compression(kind="full", dtype="float32").to_dict()
    return make_meta("org/tiny", {"num_layers": 1, "num_kv_heads": 1, "head_dim": 2}, "tok", comp, "data")


@pytest.fixture
def cache(tmp_path):
    import torch

    with CacheWriter(tmp_path, meta()) as w:
        w.add(
            "s0",
            {
                "token_ids": torch.arange(3),
                "positions": torch.arange(3),
                "spans": torch.tensor([[0, 3], [3, 4], [4, 6]]),
                "keys_l0": torch.zeros(1, 3, 2),
                "values_l0": torch.zeros(1, 3, 2),
            },
        )
    return tmp_path


def test_new_caches_record_byte_spans(cache):
    manifest = json.loads((cache / MANIFEST).read_text())
    assert manifest["schema_version"] == SCHEMA_VERSION == 2
    assert manifest["span_unit"] == SPAN_UNIT == "utf8_bytes"
    reader = CacheReader(cache)
    assert reader.meta["span_unit"] == "utf8_bytes"
    assert reader.get("s0")["spans"].tolist() == [[0, 3], [3, 4], [4, 6]]
    assert reader.check_compatible(meta()) == []


def test_schema_1_cache_is_refused_with_a_reextract_message(cache):
    path = cache / MANIFEST
    old = json.loads(path.read_text())
    old["schema_version"] = 1
    del old["span_unit"]  # schema 1 had no span_unit: its spans were character offsets
    path.write_text(json.dumps(old))
    for open_it in (read_manifest, CacheReader):
        with pytest.raises(
            CacheError, match="schema_version 1 cache: its token spans are character offsets"
        ) as err:
            open_it(path if open_it is read_manifest else cache)
        assert "re-extract the cache" in err.value.fix


def test_other_span_units_are_refused(cache):
    path = cache / MANIFEST
    data = json.loads(path.read_text())
    data["span_unit"] = "chars"
    path.write_text(json.dumps(data))
    with pytest.raises(CacheError, match="stores spans in 'chars', this kvdistill reads 'utf8_bytes'"):
        read_manifest(path)
    with pytest.raises(
        CacheError, match="meta.span_unit is 'chars', this kvdistill stores 'utf8_bytes' spans"
    ):
        check_meta({**meta(), "span_unit": "chars"})
    with pytest.raises(CacheError, match="missing meta field 'span_unit'"):
        check_meta({k: v for k, v in meta().items() if k != "span_unit"})
