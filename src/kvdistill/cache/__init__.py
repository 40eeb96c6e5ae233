"""kvdistill.cache: the on-disk teacher-KV store (sharded safetensors + manifest.json) and its extraction.

Modules, one concept each:
    manifest   the manifest and the meta a cache is checked against (teacher, tokenizer, compression, dataset)
    batch      the host side of one captured batch: selection, async copy, the stored sample layout
    writer     `CacheWriter`: crash-safe sharded writer (background thread, resume); the directory layout
    merge      `merge_parts`: one manifest.json from the parts of a SLURM array extraction
    meta       what a cache of a teacher over a dataset holds, from their configs (`expected_meta`)
    reader     `CacheReader`: lazy per-sample reads and right-padded `TeacherKV` batches;
               `open_teacher_cache`, the checked reader a `source: cache` teacher trains from
    verify     `verify_cache` / `cache_info`
    extract    `kvdistill extract` (`kvdistill.cache.extract.extract`, `run_pipeline`)
"""

from __future__ import annotations

from importlib import import_module

from kvdistill.cache.manifest import (
    META_FIELDS,
    SCHEMA_VERSION,
    fingerprint_records,
    fingerprint_tokenizer,
    make_meta,
    meta_mismatches,
    read_manifest,
)
from kvdistill.cache.merge import merge_parts
from kvdistill.cache.verify import cache_info, format_info, verify_cache

# these import torch (and transformers): lazy, so that the CLI (which imports kvdistill.cache.cli) starts fast
_LAZY = {
    "HostBatch": "batch",
    "capture_to_host": "batch",
    "host_samples": "batch",
    "samples_from_capture": "batch",
    "CacheWriter": "writer",
    "CacheReader": "reader",
    "expected_meta": "meta",
    "open_teacher_cache": "reader",
    "run_pipeline": "extract",
}

__all__ = [
    "META_FIELDS",
    "SCHEMA_VERSION",
    "CacheReader",
    "CacheWriter",
    "HostBatch",
    "cache_info",
    "capture_to_host",
    "expected_meta",
    "fingerprint_records",
    "fingerprint_tokenizer",
    "format_info",
    "host_samples",
    "make_meta",
    "merge_parts",
    "meta_mismatches",
    "open_teacher_cache",
    "read_manifest",
    "run_pipeline",
    "samples_from_capture",
    "verify_cache",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f"kvdistill.cache.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'kvdistill.cache' has no attribute '{name}'")
