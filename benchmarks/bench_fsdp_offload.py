"""The largest student kvdistill trains on one GPU beside the `large` preset's teachers: DDP (one process, the
student, its gradients and AdamW state on the GPU) against FSDP2 with CPU offload (train.distributed fsdp,
train.fsdp.cpu_offload: shards, gradients and AdamW state in host memory, one block at a time on the GPU).

    python benchmarks/bench_fsdp_offload.py --out /tmp/fsdp --json benchmarks/results/fsdp_offload_h100.json
    python benchmarks/bench_fsdp_offload.py --out /tmp/fsdp --cpu --tiny      (the script itself, on a CPU)

Teachers: qwen2-1.5b and llama-3b (benchmarks/common.py, random weights, bf16 on the GPU), online. Students:
the Llama-3.2-3B block geometry (width 3072, MLP 8192, 24 heads, 8 KV heads) with the gpt2 tokenizer's
vocabulary at --ddp-layers / --fsdp-layers depths (about 0.15B + 0.1B per layer), trained --steps optimizer
steps of --batch records of --seq tokens under `kvdistill train`, in a child process each (a run that does not
fit dies alone). Per run: the student's parameters, the peak GPU memory allocated (summary.json `memory`), the
median step time (metrics.jsonl, the first step left out), or the error that stopped it (out of memory). A
mode stops growing at its first failure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from common import CONFIGS, STUDENT_TOKENIZER, TOKENIZER_OF, build_model, environment, load_tok, make_records

TEACHERS = ["qwen2-1.5b", "llama-3b"]
TINY_TEACHERS = ["qwen2-tiny", "llama-tiny"]
BLOCK = dict(
    hidden_size=3072, intermediate_size=8192, num_attention_heads=24, num_key_value_heads=8, head_dim=128
)
TINY_BLOCK = dict(
    hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=32
)


def save_teacher(name: str, out: Path, device: str) -> Path:
    """A random `name` model in bf16 (float32 on a CPU) sized for its family's stand-in tokenizer, saved with
    it."""
    if (out / "config.json").is_file():
        return out
    tok = load_tok(TOKENIZER_OF[CONFIGS[name]["model_type"]])
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build_model(name, dtype=dtype, device=device, vocab_size=len(tok))
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.config, attr, getattr(tok, attr))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    return out


def run_config(path: Path, teachers: list[Path], data: Path, layers: int, mode: str, args) -> Path:
    block = TINY_BLOCK if args.tiny else BLOCK
    raw = {
        "name": f"{mode}-{layers}",
        "student": {
            "from_config": {
                "family": "llama",
                "num_hidden_layers": layers,
                **block,
                "max_position_embeddings": 4096,
                "tie_word_embeddings": True,
            },
            "tokenizer": STUDENT_TOKENIZER,
        },
        "teachers": [{"name": p.name.replace(".", "_"), "model": str(p)} for p in teachers],
        "data": {"source": "jsonl", "path": str(data), "eval_size": 0, "max_length": args.seq},
        "train": {
            "steps": args.steps,
            "batch_size": args.batch,
            "lr": 1e-4,
            "warmup_steps": 0,
            "mixed_precision": "no" if args.cpu else "bf16",
            "log_every": 1,
            "tensorboard": False,
            "distributed": "fsdp" if mode == "fsdp_offload" else "ddp",
            "fsdp": {"cpu_offload": mode == "fsdp_offload"},
        },
    }
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def one_run(config: Path, out: Path, timeout: float) -> dict:
    t0 = time.time()
    cmd = [sys.executable, "-m", "kvdistill.cli", "train", str(config), "--out", str(out)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        code, err = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as exc:  # its output so far (bytes whatever `text` says) tells how far
        partial = (exc.stderr or b"").decode(errors="replace")
        code, err = None, f"timed out after {timeout:.0f} s; its log so far:\n{partial}"
    metrics = out / "metrics.jsonl"
    logged = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
    row = {"wall_s": round(time.time() - t0, 1), "steps_logged": logged}
    summary = out / "summary.json"
    if code != 0 or not summary.is_file():
        oom = "out of memory" in err.lower() or "outofmemory" in err.lower()
        return {**row, "ok": False, "oom": oom, "error": err[-1500:]}
    memory = json.loads(summary.read_text())["memory"][0]
    steps = [json.loads(line) for line in metrics.read_text().splitlines()]
    times = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(steps, steps[1:], strict=False)]
    return {
        **row,
        "ok": True,
        "student_params": memory["student_params_bytes"] // 4,
        "peak_allocated_gib": None
        if memory["peak_allocated_bytes"] is None
        else memory["peak_allocated_bytes"] / 2**30,
        "step_s": statistics.median(times) if times else None,
        "memory": memory,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="work directory (teachers, data, runs)")
    ap.add_argument("--json", type=Path, default=None, help="result file (default OUT/fsdp_offload.json)")
    ap.add_argument("--ddp-layers", default="16,28,40", help="student depths tried under ddp, ascending")
    ap.add_argument("--fsdp-layers", default="28,40,56", help="student depths tried under fsdp + cpu_offload")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--timeout", type=float, default=240, help="seconds one run may take")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (checks the script; no peak memory)")
    ap.add_argument("--tiny", action="store_true", help="tiny teachers and student blocks (with --cpu)")
    args = ap.parse_args()
    device = "cpu" if args.cpu or not torch.cuda.is_available() else "cuda"
    args.out.mkdir(parents=True, exist_ok=True)
    teachers = [
        save_teacher(n, args.out / "models" / n, device) for n in (TINY_TEACHERS if args.tiny else TEACHERS)
    ]
    if device == "cuda":
        torch.cuda.empty_cache()
    data = args.out / "data.jsonl"
    if not data.is_file():
        toks = [load_tok(STUDENT_TOKENIZER)] + [load_tok(str(t)) for t in teachers]
        rows = make_records(args.batch * args.steps, toks, args.seq)
        data.write_text("".join(json.dumps({"id": r["id"], "text": r["text"]}) + "\n" for r in rows))
    result = {
        "benchmark": "fsdp_offload",
        **environment(device),
        "teachers": [t.name for t in teachers],
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "runs": {},
    }
    for mode, depths in (("ddp", args.ddp_layers), ("fsdp_offload", args.fsdp_layers)):
        rows = result["runs"][mode] = []
        for layers in [int(x) for x in depths.split(",")]:
            run_dir = args.out / "runs" / f"{mode}-{layers}"
            config = run_config(args.out / f"{mode}-{layers}.yaml", teachers, data, layers, mode, args)
            row = {"layers": layers, **one_run(config, run_dir, args.timeout)}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("memory", "error")}), flush=True)
            if not row["ok"]:
                break
        fits = [r for r in rows if r["ok"]]
        result[f"largest_{mode}"] = (
            max(fits, key=lambda r: r["student_params"])["student_params"] if fits else None
        )
    path = args.json or args.out / "fsdp_offload.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
