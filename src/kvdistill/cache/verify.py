"""Check a teacher-KV cache end to end (`verify_cache`) and summarise it (`cache_info`).

Shapes are read from the safetensors headers, so only the checksums read whole files. The manifest goes
through `read_manifest` (structure, shard files confined to the directory) and every shard path through
`shard_path` before anything is opened.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import safe_open

from kvdistill.atomic import sha256_file
from kvdistill.cache.manifest import MANIFEST, location_problems, read_manifest, shard_path
from kvdistill.errors import CacheError

_DTYPE_NAMES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "uint16": "U16", "int32": "I32"}
_SIZES = {
    "F16": 2,
    "BF16": 2,
    "F32": 4,
    "F64": 8,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
}
LOGIT_TENSORS = ("logit_values", "logit_index", "logit_shift")


def load_cache_manifest(directory: str | Path) -> dict[str, Any]:
    """The checked manifest of the cache at `directory` (CacheError: no manifest, only parts, wrong structure,
    shard files outside the directory)."""
    directory = Path(directory)
    if not (directory / MANIFEST).exists() and any(directory.glob("manifest.part-*.json")):
        raise CacheError(
            f"{directory} holds part manifests but no manifest.json",
            "run kvdistill.cache.merge_parts on it once every part has finished",
        )
    return read_manifest(directory / MANIFEST)


def _headers(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (safetensors dtype, shape) from the file header."""
    out = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            sl = f.get_slice(key)
            out[key] = (sl.get_dtype(), tuple(sl.get_shape()))
    return out


def _expected_layers(manifest: dict[str, Any]) -> list[int] | None:
    layers = manifest["compression"].get("layers")
    if layers is not None:
        return list(layers)
    geometry = manifest["teacher"].get("geometry") or {}
    return list(range(int(geometry["num_layers"]))) if "num_layers" in geometry else None


def _sample_problems(
    where: str, tensors: dict[str, tuple[str, tuple[int, ...]]], manifest: dict
) -> list[str]:
    """Shapes of one stored sample against the teacher geometry and the compression."""
    geometry = manifest["teacher"].get("geometry") or {}
    comp = manifest["compression"]
    H, D = geometry.get("num_kv_heads"), geometry.get("head_dim")
    kind, budget = comp.get("kind", "full"), comp.get("budget")
    want_dtype = _DTYPE_NAMES.get(comp.get("dtype", ""))
    T = tensors["token_ids"][1][0] if "token_ids" in tensors and len(tensors["token_ids"][1]) == 1 else None
    out = []
    for name in ("positions", "spans"):
        if name in tensors and T is not None and tensors[name][1][:1] != (T,):
            out.append(f"{where}: {name} has shape {tensors[name][1]}, expected {T} tokens like token_ids")
    out += _logit_problems(where, tensors, manifest.get("logits"), T)
    layers = _expected_layers(manifest)
    stored = sorted(int(n[6:]) for n in tensors if n.startswith("keys_l") and n[6:].isdigit())
    if layers is not None and stored != sorted(layers):
        out.append(f"{where}: stores key layers {stored}, the compression says {sorted(layers)}")
    for layer in stored:
        kdt, kshape = tensors[f"keys_l{layer}"]
        vname = f"values_l{layer}"
        if vname not in tensors:
            out.append(f"{where}: keys_l{layer} has no {vname}")
        elif tensors[vname] != (kdt, kshape):
            out.append(f"{where}: {vname} {tensors[vname]} differs from keys_l{layer} {(kdt, kshape)}")
        if len(kshape) != 3:
            out.append(f"{where}: keys_l{layer} has shape {kshape}, expected (H_kv, M, D)")
            continue
        h, m, d = kshape
        if H is not None and h != H:
            out.append(f"{where}: keys_l{layer} has {h} heads, the teacher has num_kv_heads={H}")
        if D is not None and d != D:
            out.append(f"{where}: keys_l{layer} has head dim {d}, the teacher has head_dim={D}")
        if want_dtype is not None and kdt != want_dtype:
            out.append(f"{where}: keys_l{layer} is {kdt}, the compression dtype is {comp.get('dtype')}")
        if kind in ("right_crop", "rkv") and budget is not None and m > budget:
            out.append(f"{where}: keys_l{layer} keeps {m} tokens, more than the budget {budget}")
        if T is not None and (m > T or (kind == "full" and m != T)):
            out.append(f"{where}: keys_l{layer} keeps {m} tokens of a {T}-token sample ({kind})")
        iname = f"index_l{layer}"
        if kind == "rkv" and iname not in tensors:
            out.append(f"{where}: rkv sample lacks {iname}")
        elif iname in tensors and tensors[iname][1] != (h, m):
            out.append(f"{where}: {iname} has shape {tensors[iname][1]}, expected {(h, m)}")
    return out


def _logit_problems(
    where: str, tensors: dict[str, tuple[str, tuple[int, ...]]], spec: dict | None, T: int | None
) -> list[str]:
    """The stored logits of one sample against the manifest's `logits` entry (None: there must be none)."""
    present = [n for n in LOGIT_TENSORS if n in tensors]
    if spec is None:
        return [f"{where}: stores {present} but the manifest records no logits"] if present else []
    k, n = spec["top_k"], len(spec["temperatures"])
    want = {
        "logit_values": (_DTYPE_NAMES[spec["dtype"]], (T, k)),
        "logit_index": (_DTYPE_NAMES[spec["index_dtype"]], (T, k)),
        "logit_shift": ("F32", (T, n)),
    }
    out = []
    for name, (dtype, shape) in want.items():
        if name not in tensors:
            out.append(f"{where}: lacks {name}, which the manifest's logits promise")
        elif tensors[name][0] != dtype or (T is not None and tensors[name][1] != shape):
            out.append(f"{where}: {name} is {tensors[name][0]} {tensors[name][1]}, expected {dtype} {shape}")
    return out


def _nonfinite(path: Path, file: str, k: int, manifest: dict[str, Any]) -> list[str]:
    """Stored K/V of shard `k` holding NaN or inf (an extraction that overflowed, or damage before hashing):
    training on them diverges, so they are problems, one per sample."""
    import torch

    ids = {(e["shard"], e["index"]): sid for sid, e in manifest["samples"].items()}
    bad: dict[str, list[str]] = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            j, _, name = key.partition("/")
            if not name.startswith(("keys_", "values_")):
                continue
            x = f.get_tensor(key)
            if x.is_floating_point() and not bool(torch.isfinite(x).all()):
                sid = ids.get((k, int(j))) if j.isdigit() else None
                bad.setdefault(repr(sid) if sid is not None else f"index {j}", []).append(
                    f"{name} ({int((~torch.isfinite(x)).sum())} non-finite)"
                )
    return [
        f"sample {sid} in shard {file}: {', '.join(names)} hold NaN/inf K/V (re-extract the cache; training "
        "on them would diverge)"
        for sid, names in bad.items()
    ]


def verify_cache(path: str | Path) -> list[str]:
    """Every problem found in the cache at `path` (empty list: healthy); a manifest that cannot be used at all
    is the one problem listed (`load_cache_manifest` raises it instead).

    Checks: manifest readable, well formed, naming shards inside the directory only; every listed shard
    present, of the recorded size and sha256, readable by safetensors; each sample's index inside its shard
    and pointing at stored tensors; no two ids on the same slot; shard sample counts; shapes against the
    teacher geometry and compression; every stored K/V finite; writer closed; no leftover temp files.
    """
    try:
        manifest = load_cache_manifest(path)
    except CacheError as e:
        return [str(e)]
    return cache_problems(path, manifest)


def _where(directory: Path, k: int) -> str:
    return f"manifest {directory / MANIFEST}: shards[{k}].file"


def cache_problems(path: str | Path, manifest: dict[str, Any]) -> list[str]:
    """`verify_cache` on a manifest already loaded by `load_cache_manifest`."""
    directory = Path(path)
    problems: list[str] = []
    if not manifest.get("complete"):
        problems.append(
            "manifest is not marked complete: the writer was interrupted or never closed "
            "(rerun the extraction to resume it)"
        )
    for p in sorted(directory.glob("*.tmp")):
        problems.append(f"leftover temp file {p.name} from a killed writer (reopen the writer to clean it)")
    shards = manifest["shards"]
    contents: dict[int, dict[str, tuple[str, tuple[int, ...]]]] = {}
    for k, entry in enumerate(shards):
        try:
            f = shard_path(directory, entry["file"], _where(directory, k))
        except CacheError as e:
            problems.append(e.problem)
            continue
        if not f.exists():
            problems.append(f"shard {entry['file']} is missing")
            continue
        if not f.is_file():
            problems.append(f"shard {entry['file']} is not a regular file")
            continue
        try:
            size = f.stat().st_size
            digest = sha256_file(f)
        except OSError as e:
            problems.append(f"shard {entry['file']} cannot be read ({type(e).__name__}: {e})")
            continue
        if size != entry["bytes"]:
            problems.append(
                f"shard {entry['file']} is {size} bytes, the manifest says {entry['bytes']} "
                f"({'truncated' if size < entry['bytes'] else 'grown'})"
            )
        if digest != entry["sha256"]:
            problems.append(
                f"shard {entry['file']} fails its checksum: sha256 {digest[:12]}..., "
                f"manifest {entry['sha256'][:12]}... (corrupted; re-extract it)"
            )
        try:
            contents[k] = _headers(f)
        except Exception as e:
            problems.append(f"shard {entry['file']} cannot be read by safetensors ({e})")
            continue
        problems.extend(_nonfinite(f, entry["file"], k, manifest))
    problems.extend(location_problems(manifest))
    for sid, e in manifest["samples"].items():
        k, j = e["shard"], e["index"]
        if k not in contents or not 0 <= j < shards[k]["num_samples"]:
            continue  # an unreadable shard, or a slot location_problems reported
        prefix = f"{j}/"
        tensors = {n[len(prefix) :]: v for n, v in contents[k].items() if n.startswith(prefix)}
        if not tensors:
            problems.append(f"sample {sid!r}: shard {shards[k]['file']} holds no tensors at index {j}")
        else:
            problems.extend(_sample_problems(f"sample {sid!r}", tensors, manifest))
    return problems


def cache_info(path: str) -> dict[str, Any]:
    """Summary: teacher, geometry, compression, samples, tokens, bytes, bytes per token, per-layer shapes."""
    directory = Path(path)
    manifest = load_cache_manifest(directory)
    geometry = manifest["teacher"].get("geometry") or {}
    num_tokens = kept_slots = kv_bytes = logit_bytes = 0
    layer_shapes: dict[str, dict[str, Any]] = {}
    fix = f"run `kvdistill cache verify {directory}` for the full list, then re-extract the cache"
    for k, entry in enumerate(manifest["shards"]):
        f = shard_path(directory, entry["file"], _where(directory, k))
        if not f.exists():
            raise CacheError(f"shard {entry['file']} of {directory} is missing", fix)
        try:
            headers = _headers(f)
        except Exception as e:  # safetensors' own error types, OSError, a directory in its place
            raise CacheError(f"shard {entry['file']} of {directory} cannot be read ({e})", fix) from None
        for name, (dt, shape) in headers.items():
            j, _, tname = name.partition("/")
            layer = tname.removeprefix("keys_l").removeprefix("values_l")
            kv = tname.startswith(("keys_l", "values_l")) and layer.isdigit()
            rank = 1 if tname == "token_ids" else 3 if kv else None
            if not j.isdigit() or (tname.startswith(("keys_l", "values_l")) and not kv):
                raise CacheError(
                    f"shard {entry['file']} of {directory} holds a tensor named {name!r}, not "
                    "'<index>/token_ids' or '<index>/keys_l<layer>' like a cache shard",
                    fix,
                )
            if rank is not None and len(shape) != rank:
                raise CacheError(
                    f"shard {entry['file']} of {directory}: tensor {name!r} has shape {tuple(shape)}, "
                    f"expected {rank} dimensions",
                    fix,
                )
            if tname in LOGIT_TENSORS:
                n = 1
                for s in shape:
                    n *= s
                logit_bytes += n * _SIZES.get(dt, 0)
            if tname == "token_ids":
                num_tokens += shape[0]
            elif kv:
                n = 1
                for s in shape:
                    n *= s
                kv_bytes += n * _SIZES.get(dt, 0)
                if tname.startswith("keys_l"):
                    kept_slots += shape[1]
                    info = layer_shapes.setdefault(
                        layer,
                        {
                            "heads": shape[0],
                            "head_dim": shape[2],
                            "dtype": dt,
                            "min_kept": shape[1],
                            "max_kept": shape[1],
                        },
                    )
                    info["min_kept"] = min(info["min_kept"], shape[1])
                    info["max_kept"] = max(info["max_kept"], shape[1])
    total = sum(s["bytes"] for s in manifest["shards"])
    per_layer = {int(k): v for k, v in sorted(layer_shapes.items(), key=lambda kv: int(kv[0]))}
    return {
        "path": str(directory),
        "teacher": {"id": manifest["teacher"]["id"], "revision": manifest["teacher"].get("revision")},
        "geometry": geometry,
        "compression": manifest["compression"],
        "complete": bool(manifest.get("complete")),
        "num_samples": len(manifest["samples"]),
        "num_shards": len(manifest["shards"]),
        "num_tokens": num_tokens,
        "num_kept_slots": kept_slots // max(len(per_layer), 1),
        "total_bytes": total,
        "kv_bytes": kv_bytes,
        "bytes_per_token": total / num_tokens if num_tokens else None,
        "kv_bytes_per_token": kv_bytes / num_tokens if num_tokens else None,
        "logits": manifest.get("logits"),
        "logit_bytes": logit_bytes,
        "logit_bytes_per_token": logit_bytes / num_tokens if num_tokens else None,
        "layers": per_layer,
        "tokenizer": manifest["tokenizer"],
        "dataset": manifest["dataset"],
        "created": manifest.get("created"),
        "merged_from": manifest.get("merged_from"),
    }


def format_info(info: dict[str, Any]) -> str:
    """A few lines for the CLI."""
    comp = info["compression"]
    bpt, kv, lg = info["bytes_per_token"], info["kv_bytes_per_token"], info["logit_bytes_per_token"]
    per = f" (K/V {kv:.1f}, logits {lg:.1f})" if bpt else ""
    return "\n".join(
        [
            f"teacher      {info['teacher']['id']} ({info['geometry'].get('num_layers', '?')} layers, "
            f"{info['geometry'].get('num_kv_heads', '?')} kv heads, head dim "
            f"{info['geometry'].get('head_dim', '?')})",
            f"compression  {json.dumps(comp)}",
            f"samples      {info['num_samples']} in {info['num_shards']} shards, {info['num_tokens']} tokens",
            f"logits       {json.dumps(info['logits']) if info['logits'] else 'none (K/V only)'}",
            f"size         {info['total_bytes']} bytes" + (f", {bpt:.1f} bytes/token{per}" if bpt else ""),
        ]
    )
