"""Combining the parts of a sharded extraction (one `CacheWriter` part per SLURM array task, see
`kvdistill.cache.writer`) into the one `manifest.json` a `CacheReader` opens. Shards stay where they are.

Every part manifest goes through `read_manifest` (structure, shard files inside the directory) and
`location_problems` before anything is written, so a hostile or broken part is refused, never merged."""

from __future__ import annotations

import datetime as _dt
import os
import re
from pathlib import Path
from typing import Any

from kvdistill.atomic import write_json_atomic
from kvdistill.cache.manifest import (
    MANIFEST,
    META_FIELDS,
    location_problems,
    meta_mismatches,
    read_manifest,
)
from kvdistill.errors import CacheError

_PART_MANIFEST_RE = re.compile(r"^manifest\.part-([A-Za-z0-9_]+)\.json$")


def merge_parts(
    out_dir: str | os.PathLike, expected_parts: int | None = None, require_complete: bool = True
) -> dict[str, Any]:
    """Combine `manifest.part-*.json` into `manifest.json` (part manifests are kept, so it can be rerun).

    Errors name the parts whose meta differs, that are incomplete or missing (`expected_parts`: 0..n-1), and
    sample ids stored twice.
    """
    directory = Path(out_dir)
    found = {}
    for p in directory.glob("manifest.part-*.json"):
        m = _PART_MANIFEST_RE.match(p.name)
        if m:
            found[m.group(1)] = read_manifest(p)
    if not found:
        raise CacheError(
            f"no part manifests (manifest.part-*.json) in {directory}",
            "run the extraction with part=<index> first",
        )
    if (directory / MANIFEST).exists() and "merged_from" not in _existing(directory / MANIFEST):
        raise CacheError(
            f"{directory} also holds a single-writer manifest.json", "merge parts in their own dir"
        )
    order = sorted(found, key=lambda s: (0, int(s), s) if s.isdigit() else (1, 0, s))
    problems = _problems(found, order, expected_parts, require_complete)
    if problems:
        raise CacheError(
            f"cannot merge parts in {directory}: " + "; ".join(problems),
            "rerun the failed / missing array tasks (they resume), or pass require_complete=False",
        )
    first = order[0]
    merged = {k: found[first][k] for k in ("schema_version", *META_FIELDS)}
    merged.update(
        shards=[],
        samples={},
        complete=all(found[p].get("complete") for p in order),
        part=None,
        merged_from=order,
        created=min((found[p]["created"] for p in order if found[p].get("created")), default=None),
        kvdistill_version=found[first].get("kvdistill_version"),
    )
    for part in order:
        offset = len(merged["shards"])
        merged["shards"].extend(found[part]["shards"])
        for sid, entry in found[part]["samples"].items():
            merged["samples"][sid] = {"shard": entry["shard"] + offset, "index": entry["index"]}
    merged["merged"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    write_json_atomic(directory / MANIFEST, merged)
    return merged


def _existing(path: Path) -> dict[str, Any]:
    """The manifest.json already in a parts directory (a previous merge, or a single writer's)."""
    try:
        return read_manifest(path)
    except CacheError as err:
        raise CacheError(
            err.problem,
            f"if it is the output of an earlier merge, delete {path} and rerun `kvdistill cache merge`; "
            "otherwise restore it or re-extract",
        ) from None


def _problems(
    found: dict[str, dict], order: list[str], expected_parts: int | None, require_complete: bool
) -> list[str]:
    """Every reason the part manifests `found` (part -> manifest, `order` sorted) cannot be merged."""
    problems = []
    if expected_parts is not None:
        missing = [str(i) for i in range(expected_parts) if str(i) not in found]
        if missing:
            problems.append(f"missing parts {missing} of {expected_parts}")
    first = order[0]
    for part in order:
        m = found[part]
        bad = meta_mismatches(found[first], m)
        if bad:
            problems.append(f"part {part} differs from part {first}: " + "; ".join(bad))
        if require_complete and not m.get("complete"):
            problems.append(f"part {part} is incomplete (its writer was not closed)")
        problems.extend(f"part {part}: {p}" for p in location_problems(m)[:5])
    owner: dict[str, str] = {}
    dups = []
    for part in order:
        for sid in found[part]["samples"]:
            if sid in owner:
                dups.append(f"{sid!r} (parts {owner[sid]} and {part})")
            owner[sid] = part
    if dups:
        problems.append(f"{len(dups)} sample id(s) stored twice: {', '.join(dups[:5])}")
    return problems
