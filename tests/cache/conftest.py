"""One copy of the cache test helpers, shared through the `store` fixture.

Pytest runs with --import-mode=importlib, so test modules cannot import each other; tests take `store` and
call `store.meta_for(...)`, `store.make_sample(...)`, `store.write_all(...)`,
`store.assert_same_content(...)`. test_writer.py's SIGKILL test also loads this file by path in a child
process (for IDS, meta_for and make_sample), so it imports nothing from the test tree.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kvdistill.cache import CacheReader, CacheWriter, make_meta
from kvdistill.compress import Compression

GEOMETRY = {"name": "tiny", "num_layers": 2, "num_kv_heads": 2, "head_dim": 4}
IDS = [f"s{i}" for i in range(7)]


def meta_for(compression: Compression | None = None, **change) -> dict:
    """The tiny teacher's meta (right_crop budget 6, bfloat16 unless `compression`), top-level fields replaced
    by `change`."""
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
    """The two caches hold the same ids with bit-identical tensors of the same dtypes."""
    a, b = CacheReader(dir_a), CacheReader(dir_b)
    assert sorted(a.sample_ids) == sorted(b.sample_ids)
    for sid in a.sample_ids:
        x, y = a.get(sid), b.get(sid)
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), (sid, k)


def write_all(directory: Path, ids: list[str], shard_size: int = 2, **kw) -> None:
    """One writer (CacheWriter keywords in `kw`, e.g. part=) adds `make_sample` of every id and closes."""
    with CacheWriter(directory, meta_for(), shard_size=shard_size, **kw) as w:
        for sid in ids:
            w.add(sid, make_sample(sid))


@pytest.fixture(scope="session")
def store() -> SimpleNamespace:
    """The helpers above and their constants (GEOMETRY, IDS)."""
    return SimpleNamespace(
        GEOMETRY=GEOMETRY,
        IDS=IDS,
        meta_for=meta_for,
        make_sample=make_sample,
        assert_same_content=assert_same_content,
        write_all=write_all,
    )
