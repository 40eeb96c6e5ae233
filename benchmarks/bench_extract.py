"""Teacher-KV extraction throughput: plain teacher forward vs capture + compression, without and with \
disk writes.

    python benchmarks/bench_extract.py --device cpu  --out benchmarks/results/extract_cpu.json
    python benchmarks/bench_extract.py --device cuda --out benchmarks/results/extract_h100.json \
        [--tokenizers DIR]

CPU: the offline real models (smollm2-135m, gemma3-270m) with their own tokenizers, float32, batch 4 of up to
256 tokens. CUDA: llama-1b built from the Llama-3.2-1B config with random weights (benchmarks/common.py), the
smollm2 tokenizer, bfloat16, batch 4 of up to 1024 tokens. Texts: GSM-style question, reasoning, answer.

Every timed call starts from the texts (tokenization included), as `kvdistill extract` does, under no_grad:
    plain            tokenize + model(ids, mask, use_cache=False)           sdpa
    plain_eager      the same with eager attention (what rkv must run)
    body             tokenize + model.base_model(...)                        no LM head (a teacher needs none)
    right_crop       capture_kv + samples_from_capture(right_crop M)         sdpa, nothing written
    right_crop_write the same + CacheWriter.add of every sample              a shard (fsync) per batch,
                                                                             written by the background writer
                                                                             thread
    rkv              capture_teacher (hooked queries) + samples_from_capture(rkv M)                 sdpa
    rkv_write        the same + CacheWriter.add (background writer, as `kvdistill extract`)
    rkv_eager        the old path: capture_kv(attentions=True) + samples_from_capture(rkv M)        eager
    rkv_importance   query_importance of every layer (answer rows only), on a ready capture
                     (stacked_equals_per_layer: its layers stacked vs one at a time, and the stacked rkv
                     selection vs layer_selection, compared exactly on the device)
    rkv_select       rkv_select of every layer, on ready importances
Throughput ratios are baseline / variant (1.0 = as fast as the baseline), against plain (the full forward, LM
head included) and against body (the stricter one: extraction needs no logits); targets: 0.9 without writes,
0.8 with. The R-KV selection fraction is (rkv_importance + rkv_select) / plain.
    plain_batches    plain, --pipeline-batches times in a row
    pipeline_*       run_pipeline (what `kvdistill extract` runs: tokenization, forward + selection and the
                     host side overlapped on three threads) over the same batches, with or without the writer;
                     pipeline_vs_plain = plain_batches / pipeline_* (the end-to-end extraction figure)
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from pathlib import Path

import torch
from common import (
    REAL_CONFIGS,
    TOKENIZER_OF,
    build_model,
    default_device,
    environment,
    load_tok,
    make_records,
    param_count,
    print_table,
    time_interleaved,
    write_result,
)

from kvdistill.cache import CacheWriter, cache_info, fingerprint_tokenizer, make_meta, samples_from_capture
from kvdistill.cache.extract import run_pipeline
from kvdistill.compress import Compression, layer_selection, rkv_select, stacked_rkv_selection
from kvdistill.models.capture import capture_kv
from kvdistill.models.geometry import geometry_of
from kvdistill.models.queries import capture_queries, query_importance
from kvdistill.teachers import answer_query_mask, capture_teacher

CPU_MODELS = ["smollm2-135m", "gemma3-270m"]
GPU_MODELS = ["llama-1b"]
TARGETS = {"no_write": 0.9, "write": 0.8}


def load_pair(name: str, args):
    """(sdpa model, eager model, tokenizer): two copies of the same weights, one per attention kernel."""
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    if name in REAL_CONFIGS or name.endswith("-tiny"):
        family = REAL_CONFIGS.get(name, {}).get("model_type") or name.split("-")[0]
        tok = load_tok(TOKENIZER_OF[family], args.tokenizers)
        vocab = max(REAL_CONFIGS.get(name, {}).get("vocab_size", 0), len(tok))  # real cost, every id valid
        sdpa = build_model(name, dtype=dtype, device=args.device, attn="sdpa", vocab_size=vocab)
        eager = build_model(name, dtype=dtype, device=args.device, attn="eager", vocab_size=vocab)
        return sdpa, eager, tok
    from kvdistill.models.load import load_model

    sdpa, tok = load_model(name, dtype=dtype, device=args.device, attn_implementation="sdpa")
    eager, _ = load_model(name, dtype=dtype, device=args.device, attn_implementation="eager")
    return sdpa, eager, tok


def bench_model(name: str, args, tmp: Path) -> dict:
    on_gpu = args.device == "cuda"
    sdpa, eager, tok = load_pair(name, args)
    geometry = geometry_of(sdpa, name=name)
    records = make_records(args.batch, [tok], args.seq)
    texts = [r["text"] for r in records]
    T, M = args.seq, args.budget
    right_crop = Compression(kind="right_crop", budget=M, dtype=args.store_dtype)
    rkv = Compression(kind="rkv", budget=M, dtype=args.store_dtype)
    layers = list(range(geometry.num_layers))

    def encode():
        enc = tok(texts, padding=True, truncation=True, max_length=T, return_tensors="pt")
        return enc["input_ids"].to(args.device), enc["attention_mask"].to(args.device)  # (B, T)

    def forward(model, body=False):
        ids, mask = encode()
        runner = model.base_model if body else model
        return runner(input_ids=ids, attention_mask=mask, use_cache=False)

    def capture(model, attentions):
        return capture_kv(model, tok, texts, max_length=T, padding_side="right", attentions=attentions)

    def extract_right_crop():
        return samples_from_capture(capture(sdpa, False), right_crop)

    def extract_rkv():
        cap, query = capture_teacher(sdpa, tok, records, max_length=T, compression=rkv)
        return samples_from_capture(cap, rkv, query)

    def extract_rkv_eager():
        cap = capture(eager, True)
        return samples_from_capture(cap, rkv, answer_query_mask(records, cap.spans, cap.attention_mask))

    writers = {
        kind: CacheWriter(
            tmp / f"{name}-{kind}",
            make_meta(name, geometry.to_dict(), fingerprint_tokenizer(tok), comp.to_dict(), "bench"),
            shard_size=args.batch,
            background=True,
        )
        for kind, comp in (("right_crop", right_crop), ("rkv", rkv))
    }
    counter = itertools.count()

    def write(kind, samples):
        call = next(counter)
        for b, sample in enumerate(samples):
            writers[kind].add(f"c{call}-{b}", sample, copy=False)

    # a ready capture for the selection-only timings
    with torch.no_grad(), capture_queries(sdpa, geometry) as qc:
        ready = capture(sdpa, False)
    query = answer_query_mask(records, ready.spans, ready.attention_mask)  # (B, T)
    importances = query_importance(sdpa, ready, qc.queries, query, layers)  # layer -> (B, H_kv, T)
    tokens = int(ready.attention_mask.sum())

    # what `kvdistill extract` runs: the three-thread pipeline over several batches, per batch
    n_pipe = args.pipeline_batches

    def pipeline(kind, comp, write_out):
        def consume(_batch, samples):
            if write_out:
                write(kind, samples)

        run_pipeline(sdpa, tok, [records] * n_pipe, consume, max_length=T, compression=comp, layers=layers)

    def plain_batches():
        for _ in range(n_pipe):
            forward(sdpa)

    fns = {
        "plain_batches": plain_batches,
        "pipeline_right_crop": lambda: pipeline("right_crop", right_crop, False),
        "pipeline_right_crop_write": lambda: pipeline("right_crop", right_crop, True),
        "pipeline_rkv": lambda: pipeline("rkv", rkv, False),
        "pipeline_rkv_write": lambda: pipeline("rkv", rkv, True),
        "plain": lambda: forward(sdpa),
        "plain_eager": lambda: forward(eager),
        "body": lambda: forward(sdpa, body=True),
        "right_crop": extract_right_crop,
        "right_crop_write": lambda: write("right_crop", extract_right_crop()),
        "rkv": extract_rkv,
        "rkv_write": lambda: write("rkv", extract_rkv()),
        "rkv_eager": extract_rkv_eager,
        "rkv_importance": lambda: query_importance(sdpa, ready, qc.queries, query, layers),
        "rkv_select": lambda: [
            rkv_select(ready.keys[i], importances[i], ready.attention_mask, M, rkv.lam) for i in layers
        ],
    }
    with torch.no_grad():
        timings = time_interleaved(fns, args.device, warmup=args.warmup, repeats=args.repeats, memory=on_gpu)
    for w in writers.values():
        w.close()
    with torch.no_grad():  # on this device too, stacked layers give exactly the one-layer-at-a-time results
        alone = {j: query_importance(sdpa, ready, qc.queries, query, [j])[j] for j in layers}
        ready.importance = importances
        stacked = stacked_rkv_selection(ready, rkv, layers)
        per_layer = {j: layer_selection(ready, rkv, j, query) for j in layers}
    stacked_equal = {
        "importance": all(torch.equal(importances[j], alone[j]) for j in layers),
        "selection": all(torch.equal(stacked[j][0], per_layer[j][0]) for j in layers),
    }
    ms = {k: v["median_ms"] for k, v in timings.items()}
    for k in (
        "plain",
        "plain_eager",
        "body",
        "right_crop",
        "right_crop_write",
        "rkv",
        "rkv_write",
        "rkv_eager",
    ):
        timings[k]["tokens_per_s"] = round(tokens / ms[k] * 1e3, 1)
    variants = ("right_crop", "right_crop_write", "rkv", "rkv_write", "rkv_eager")
    vs = {
        base: {k: round(ms[base] / ms[k], 4) for k in variants}
        for base in ("plain", "body", "plain_eager")  # baseline time / variant time
    }
    pipe = ("pipeline_right_crop", "pipeline_right_crop_write", "pipeline_rkv", "pipeline_rkv_write")
    vs_pipeline = {
        k: round(ms["plain_batches"] / ms[k], 4) for k in pipe
    }  # same batches, plain forward / pipeline
    selection_ms = ms["rkv_importance"] + ms["rkv_select"]
    stored = {
        kind: {
            k: round(v, 1)
            for k, v in cache_info(str(tmp / f"{name}-{kind}")).items()
            if k in ("bytes_per_token", "kv_bytes_per_token")
        }
        for kind in writers
    }
    return {
        "weights": "random (real config)" if name in REAL_CONFIGS else "offline real",
        "params": param_count(sdpa),
        "geometry": {
            k: geometry.to_dict()[k]
            for k in (
                "model_type",
                "num_layers",
                "num_attention_heads",
                "num_kv_heads",
                "head_dim",
                "vocab_size",
            )
        },
        "tokenizer": tok.name_or_path.rstrip("/").split("/")[-1],
        "shape": {"B": args.batch, "T_max": T, "real_tokens": tokens, "M": M},
        "timings": timings,
        "pipeline_batches": n_pipe,
        "pipeline_vs_plain": vs_pipeline,
        "throughput_vs_plain": vs["plain"],
        "throughput_vs_body": vs["body"],
        "throughput_vs_plain_eager": vs["plain_eager"],
        "rkv_selection_ms": round(selection_ms, 3),
        "rkv_selection_fraction_of_plain": round(selection_ms / ms["plain"], 4),
        "rkv_selection_fraction_of_plain_eager": round(selection_ms / ms["plain_eager"], 4),
        "meets_target": {
            base: {
                k: vs[base][k] >= TARGETS["write" if k.endswith("_write") else "no_write"] for k in variants
            }
            for base in ("plain", "body")
        },
        "stored": stored,
        "stacked_equals_per_layer": stacked_equal,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default=default_device())
    ap.add_argument(
        "--out", type=Path, default=None, help="default: benchmarks/results/extract_<device>.json"
    )
    ap.add_argument(
        "--models",
        default=None,
        help=f"comma-separated (default: {','.join(CPU_MODELS)} on cpu, {','.join(GPU_MODELS)} on cuda)",
    )
    ap.add_argument(
        "--tokenizers",
        default=None,
        help="directory written by `python benchmarks/common.py export-tokenizers` (default: the zoo)",
    )
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument(
        "--seq", type=int, default=None, help="max tokens per sample (default 256 cpu, 1024 cuda)"
    )
    ap.add_argument("--budget", type=int, default=128, help="M, tokens kept per head (right_crop, rkv)")
    ap.add_argument("--pipeline-batches", type=int, default=8, help="batches per timed call of the pipeline")
    ap.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="model dtype (default float32 on cpu, bfloat16 on cuda)",
    )
    ap.add_argument("--store-dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    ap.add_argument("--tmp-dir", default=None, help="where the caches are written (default: the system temp)")
    ap.add_argument("--warmup", type=int, default=None, help="default 1 on cpu, 3 on cuda")
    ap.add_argument("--repeats", type=int, default=None, help="default 3 on cpu, 10 on cuda")
    args = ap.parse_args()
    on_gpu = args.device == "cuda"
    if on_gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    args.seq = args.seq or (1024 if on_gpu else 256)
    args.dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    args.warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 1)
    args.repeats = args.repeats or (10 if on_gpu else 3)
    models = args.models.split(",") if args.models else (GPU_MODELS if on_gpu else CPU_MODELS)
    out = args.out or Path(__file__).parent / "results" / f"extract_{args.device}.json"

    results = {}
    with tempfile.TemporaryDirectory(dir=args.tmp_dir, prefix="bench-extract-") as tmp:
        for name in models:
            results[name] = bench_model(name, args, Path(tmp))
            if on_gpu:
                torch.cuda.empty_cache()
    rows = []
    for name, r in results.items():
        t = r["timings"]
        for base in ("plain", "body"):
            rows.append(
                {
                    "model": name,
                    "baseline": base,
                    "baseline tok/s": t[base]["tokens_per_s"],
                    **r[f"throughput_vs_{base}"],
                    "rkv sel/plain": r["rkv_selection_fraction_of_plain"],
                }
            )
    print(
        "throughput relative to the baseline (plain: with LM head; body: without; targets 0.9 / 0.8 with "
        "writes)"
    )
    print_table(rows, list(rows[0]))
    print("end to end: plain forward of the same batches / run_pipeline")
    print_table(
        [{"model": name, **r["pipeline_vs_plain"]} for name, r in results.items()],
        ["model", *next(iter(results.values()))["pipeline_vs_plain"]],
    )
    write_result(
        out,
        {
            "benchmark": "extract",
            **environment(args.device),
            "dtype": args.dtype,
            "settings": {
                "batch": args.batch,
                "seq": args.seq,
                "budget": args.budget,
                "store_dtype": args.store_dtype,
                "shard_size": args.batch,
                "warmup": args.warmup,
                "repeats": args.repeats,
            },
            "targets": TARGETS,
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
