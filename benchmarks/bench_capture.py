"""Cost of K/V capture (forward_kv / capture_kv) over a plain forward of the same model on the same batch.

    python benchmarks/bench_capture.py --device cpu  --out benchmarks/results/capture_cpu.json
    python benchmarks/bench_capture.py --device cuda --out benchmarks/results/capture_h100.json

CPU: the offline real models (smollm2-135m, gemma3-270m), float32, batch 4 of 256 real tokens of GSM-style
text. CUDA: models built from real configs with random weights (llama-1b, qwen2-1.5b, gemma2-2b; see
benchmarks/common.py), bfloat16, batch 4 of 1024 random token ids.

Timed, each under no_grad (median of --repeats, interleaved):
    plain          model(input_ids, attention_mask)            HF default: logits, and a cache when use_cache
    plain_nocache  model(..., use_cache=False)                 logits, no cache
    body           model.base_model(..., use_cache=False)      hidden states only (what a teacher needs)
    forward_kv     forward_kv(model, ids, mask)                body + K/V (projection hooks where the
                                                               family has them, else cache + rope undone
                                                               on every key)
    forward_kv_cache   forward_kv(..., source="cache")         body + cache + rope undone (the fallback path)
    forward_kv_logits  forward_kv(..., logits=True)            the same as forward_kv with the LM head
    capture_kv     capture_kv(model, tokenizer, texts)         tokenization with offsets + forward_kv
                                                               (CPU only)
Overheads: forward_kv / body - 1 and forward_kv_logits / plain_nocache - 1 (same work apart from the capture).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import (
    build_model,
    default_device,
    environment,
    make_records,
    param_count,
    print_table,
    time_interleaved,
    write_result,
)

from kvdistill.models.capture import capture_kv, forward_kv, tokenize
from kvdistill.models.geometry import geometry_of

CPU_MODELS = ["smollm2-135m", "gemma3-270m"]
GPU_MODELS = ["llama-1b", "qwen2-1.5b", "gemma2-2b"]


def bench_model(name: str, args) -> dict:
    on_gpu = args.device == "cuda"
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    texts = None
    if name in CPU_MODELS:  # an offline real model and its tokenizer, on real text
        from kvdistill.models.load import load_model

        model, tok = load_model(name, dtype=dtype, device=args.device, attn_implementation=args.attn)
        texts = [r["text"] for r in make_records(args.batch, [tok], args.seq)]
        enc = tokenize(tok, texts, max_length=args.seq, padding_side="right")
        ids, mask = enc["input_ids"].to(args.device), enc["attention_mask"].to(args.device)  # (B, T)
    else:  # a real config with random weights, on random ids
        model = build_model(name, dtype=dtype, device=args.device, attn=args.attn)
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=gen).to(args.device)
        mask = torch.ones_like(ids)  # (B, T)
    geometry = geometry_of(model, name=name)

    fns = {
        "plain": lambda: model(input_ids=ids, attention_mask=mask),
        "plain_nocache": lambda: model(input_ids=ids, attention_mask=mask, use_cache=False),
        "body": lambda: model.base_model(input_ids=ids, attention_mask=mask, use_cache=False),
        "forward_kv": lambda: forward_kv(model, ids, mask, geometry=geometry),
        "forward_kv_cache": lambda: forward_kv(model, ids, mask, geometry=geometry, source="cache"),
        "forward_kv_logits": lambda: forward_kv(model, ids, mask, geometry=geometry, logits=True),
    }
    if texts is not None:
        fns["capture_kv"] = lambda: capture_kv(model, tok, texts, max_length=args.seq, padding_side="right")
    with torch.no_grad():
        timings = time_interleaved(fns, args.device, warmup=args.warmup, repeats=args.repeats, memory=on_gpu)
    ms = {k: v["median_ms"] for k, v in timings.items()}
    overhead = {
        "forward_kv_vs_body": round(ms["forward_kv"] / ms["body"] - 1, 4),
        "forward_kv_cache_vs_body": round(ms["forward_kv_cache"] / ms["body"] - 1, 4),
        "forward_kv_logits_vs_plain_nocache": round(ms["forward_kv_logits"] / ms["plain_nocache"] - 1, 4),
        "forward_kv_logits_vs_plain": round(ms["forward_kv_logits"] / ms["plain"] - 1, 4),
    }
    if "capture_kv" in ms:
        overhead["capture_kv_vs_body"] = round(ms["capture_kv"] / ms["body"] - 1, 4)
    result = {
        "weights": "offline real" if texts is not None else "random (real config)",
        "attn_implementation": model.config._attn_implementation,
        "params": param_count(model),
        "geometry": {
            k: geometry.to_dict()[k]
            for k in (
                "model_type",
                "num_layers",
                "num_attention_heads",
                "num_kv_heads",
                "head_dim",
                "hidden_size",
                "vocab_size",
                "kv_bytes_per_token_bf16",
            )
        },
        "shape": {"B": int(ids.shape[0]), "T": int(ids.shape[1]), "real_tokens": int(mask.sum())},
        "timings": timings,
        "overhead": overhead,
    }
    return result  # the model goes with this frame; the caller empties the CUDA cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default=default_device())
    ap.add_argument(
        "--out", type=Path, default=None, help="default: benchmarks/results/capture_<device>.json"
    )
    ap.add_argument(
        "--models",
        default=None,
        help=f"comma-separated (default: {','.join(CPU_MODELS)} on cpu, {','.join(GPU_MODELS)} on cuda)",
    )
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument(
        "--seq", type=int, default=None, help="tokens per sample (default 256 on cpu, 1024 on cuda)"
    )
    ap.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="default float32 on cpu, bfloat16 on cuda",
    )
    ap.add_argument(
        "--attn",
        choices=["sdpa", "eager"],
        default="sdpa",
        help="attention kernel (families without sdpa fall back to eager)",
    )
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
    out = args.out or Path(__file__).parent / "results" / f"capture_{args.device}.json"

    results = {}
    for name in models:
        results[name] = bench_model(name, args)
        if on_gpu:
            torch.cuda.empty_cache()
    rows = [
        {
            "model": name,
            **{k: r["timings"][k]["median_ms"] for k in r["timings"]},
            "kv_vs_body": r["overhead"]["forward_kv_vs_body"],
            "cache_vs_body": r["overhead"]["forward_kv_cache_vs_body"],
        }
        for name, r in results.items()
    ]
    print_table(
        rows,
        [
            "model",
            "plain",
            "plain_nocache",
            "body",
            "forward_kv",
            "forward_kv_cache",
            "forward_kv_logits",
            "capture_kv",
            "kv_vs_body",
            "cache_vs_body",
        ],
    )
    write_result(
        out,
        {
            "benchmark": "capture",
            **environment(args.device),
            "dtype": args.dtype,
            "settings": {
                "batch": args.batch,
                "seq": args.seq,
                "attn": args.attn,
                "warmup": args.warmup,
                "repeats": args.repeats,
            },
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
