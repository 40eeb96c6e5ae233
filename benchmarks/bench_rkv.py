"""CPU cost of R-KV selection and the bytes per token a cache stores under full / right_crop / rkv.

    python benchmarks/bench_rkv.py [--out benchmarks/results/rkv_cpu.json] [--repeats 7]

Teacher geometries (bf16 storage): smollm2-135m (30 layers, 3 KV heads of 64, 9 query heads) and
gemma3-270m (18 layers, 1 KV head of 256, 4 query heads). Batch B=4 of T=512 real tokens, budget M=128.
Timings: rkv_select over all layers at once (B, L, H, T, D) and layer by layer; importance_from_attention
for one layer; and, for scale, the naive O(T^2) pairwise key-cosine matmul that `key_redundancy` avoids.
Bytes: a real cache written with `samples_from_capture` + `CacheWriter`, measured by `cache_info`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from kvdistill.cache import CacheWriter, cache_info, make_meta, samples_from_capture
from kvdistill.compress import Compression, importance_from_attention, rkv_select

GEOMETRIES = {
    "smollm2-135m": {"num_layers": 30, "num_kv_heads": 3, "head_dim": 64, "num_attention_heads": 9},
    "gemma3-270m": {"num_layers": 18, "num_kv_heads": 1, "head_dim": 256, "num_attention_heads": 4},
}
B, T, M = 4, 512, 128


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return round(statistics.median(times), 3)


def bench_geometry(name: str, g: dict, repeats: int) -> dict:
    L, H, D, H_q = g["num_layers"], g["num_kv_heads"], g["head_dim"], g["num_attention_heads"]
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(B, L, H, T, D, generator=gen).bfloat16()  # (B, L, H, T, D)
    importance = torch.rand(B, L, H, T, generator=gen)  # (B, L, H, T)
    mask = torch.ones(B, T, dtype=torch.long)
    attn = torch.rand(B, H_q, T, T, generator=gen).softmax(-1)  # (B, H_q, T, T), one layer
    query = torch.zeros(B, T, dtype=torch.long)
    query[:, -64:] = 1

    k32 = keys.float()
    timings = {
        "rkv_select_all_layers_ms": median_ms(lambda: rkv_select(keys, importance, mask, M), repeats),
        "rkv_select_layer_loop_ms": median_ms(
            lambda: [rkv_select(keys[:, i], importance[:, i], mask, M) for i in range(L)], repeats
        ),
        "importance_one_layer_ms": median_ms(
            lambda: importance_from_attention(attn, query, mask, H), repeats
        ),
        "naive_pairwise_cosine_all_layers_ms": median_ms(
            lambda: (
                torch.nn.functional.normalize(k32, dim=-1) @ torch.nn.functional.normalize(k32, dim=-1).mT
            ),
            repeats,
        ),
    }

    cap = SimpleNamespace(
        keys=[keys[:, i] for i in range(L)],
        values=[keys[:, i].flip(-1) for i in range(L)],
        attentions=[attn] * L,  # one tensor shared by every layer: enough to drive the selection
        input_ids=torch.randint(0, 49152, (B, T), generator=gen),
        positions=torch.arange(T).expand(B, T),
        spans=torch.stack([torch.arange(T) * 4, torch.arange(T) * 4 + 4], -1).expand(B, T, 2),
        attention_mask=mask,
        geometry=SimpleNamespace(num_layers=L, num_kv_heads=H),
    )
    sizes = {}
    for label, comp in {
        "full": Compression(kind="full", dtype="bfloat16"),
        f"right_crop_{M}": Compression(kind="right_crop", budget=M, dtype="bfloat16"),
        f"rkv_{M}": Compression(kind="rkv", budget=M, dtype="bfloat16"),
    }.items():
        with tempfile.TemporaryDirectory() as d:
            meta = make_meta(name, g, "bench", comp.to_dict(), "bench")
            with CacheWriter(d, meta, shard_size=B) as w:
                for b, sample in enumerate(samples_from_capture(cap, comp, query)):
                    w.add(f"s{b}", sample)
            info = cache_info(d)
        sizes[label] = {
            "bytes_per_token": round(info["bytes_per_token"], 1),
            "kv_bytes_per_token": round(info["kv_bytes_per_token"], 1),
            "kept_per_head": info["layers"][0]["max_kept"],
        }
    full_kv = 2 * L * H * D * 2
    return {"geometry": g, "kv_bytes_per_token_full_bf16": full_kv, "timings": timings, "storage": sizes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "rkv_cpu.json"))
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    result = {
        "benchmark": "rkv_cpu",
        "shape": {"B": B, "T": T, "M": M},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "results": {name: bench_geometry(name, g, args.repeats) for name, g in GEOMETRIES.items()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
