"""kvdistill.cache: the on-disk teacher-KV store (sharded safetensors + manifest.json).

Write with `CacheWriter` (resumable; one part per SLURM array task, then `merge_parts`), read with
`CacheReader`, check with `verify_cache` / `cache_info`. Layouts are documented in `store` and `manifest`.
"""

from __future__ import annotations

from kvdistill.cache.manifest import (
    META_FIELDS,
    SCHEMA_VERSION,
    fingerprint_records,
    fingerprint_tokenizer,
    make_meta,
    meta_mismatches,
    read_manifest,
)
from kvdistill.cache.verify import cache_info, format_info, verify_cache

_STORE = ("CacheReader", "CacheWriter", "merge_parts", "samples_from_capture")

__all__ = [
    "META_FIELDS",
    "SCHEMA_VERSION",
    "CacheReader",
    "CacheWriter",
    "cache_info",
    "fingerprint_records",
    "fingerprint_tokenizer",
    "format_info",
    "make_meta",
    "merge_parts",
    "meta_mismatches",
    "read_manifest",
    "samples_from_capture",
    "verify_cache",
]


def __getattr__(name: str):
    # the store imports torch: lazy, so that the CLI (which imports kvdistill.cache.cli) starts fast
    if name in _STORE:
        from kvdistill.cache import store

        return getattr(store, name)
    raise AttributeError(f"module 'kvdistill.cache' has no attribute '{name}'")
