"""Shared pieces of the benchmark scripts: timing, the environment record, texts, real-family model configs.

    python benchmarks/common.py export-tokenizers DIR    # copy the zoo tokenizers the benchmarks use into DIR

The GPU benchmarks build models from the configs of real checkpoints (random weights, no download); the
numbers in `REAL_CONFIGS` are the fields of each checkpoint's config.json that set its compute and its KV
geometry. Tokenizers come from the offline zoo (`kvdistill.models.zoo`) or, on a machine without it, from a
directory written by `export-tokenizers` (pass it as `--tokenizers DIR`).

Imports torch, transformers and kvdistill.models only (no pydantic, no datasets).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402

from kvdistill.models.geometry import geometry_of  # noqa: E402

# ------------------------------------------------------------------------------------------- model configs
LLAMA3_ROPE = {  # Llama-3.2's rope_scaling
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

REAL_CONFIGS: dict[str, dict] = {
    # meta-llama/Llama-3.2-1B: 1.24B parameters
    "llama-1b": dict(
        model_type="llama",
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling=LLAMA3_ROPE,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        hidden_act="silu",
    ),
    # meta-llama/Llama-3.2-3B: 3.21B parameters
    "llama-3b": dict(
        model_type="llama",
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling=LLAMA3_ROPE,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        hidden_act="silu",
    ),
    # Qwen/Qwen2.5-1.5B: 1.54B parameters (head dim 1536 / 12 = 128, q/k/v with bias)
    "qwen2-1.5b": dict(
        model_type="qwen2",
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=131072,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        use_sliding_window=False,
        hidden_act="silu",
    ),
    # google/gemma-2-2b: 2.61B parameters (alternating 4096-token sliding / global layers, soft-capping)
    "gemma2-2b": dict(
        model_type="gemma2",
        hidden_size=2304,
        intermediate_size=9216,
        num_hidden_layers=26,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        vocab_size=256000,
        max_position_embeddings=8192,
        rope_theta=10000.0,
        sliding_window=4096,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        query_pre_attn_scalar=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        hidden_activation="gelu_pytorch_tanh",
    ),
    # Qwen/Qwen2.5-0.5B: 0.49B parameters (head dim 896 / 14 = 64)
    "qwen2-0.5b": dict(
        model_type="qwen2",
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        use_sliding_window=False,
        hidden_act="silu",
    ),
}

# the same families at toy width and depth, for checking the scripts on CPU
TINY = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
)
TINY_CONFIGS: dict[str, dict] = {
    "llama-tiny": {**REAL_CONFIGS["llama-1b"], **TINY},
    "qwen2-tiny": {**REAL_CONFIGS["qwen2-1.5b"], **TINY},
    "gemma2-tiny": {**REAL_CONFIGS["gemma2-2b"], **TINY, "query_pre_attn_scalar": 32},
    "qwen2-tiny-student": {
        **REAL_CONFIGS["qwen2-0.5b"],
        **TINY,
        "hidden_size": 64,
        "num_hidden_layers": 3,
        "head_dim": 16,
    },
}
CONFIGS = {**REAL_CONFIGS, **TINY_CONFIGS}

# which offline tokenizer stands in for each family's own (real vocabularies are not in the zoo)
TOKENIZER_OF = {
    "llama": "smollm2-135m",  # byte-level BPE, 49,152
    "qwen2": "llama2-tokenizer",  # SentencePiece, 32,000
    "gemma2": "gemma3-270m",  # SentencePiece, 262,144
}
STUDENT_TOKENIZER = "gpt2-tokenizer"  # byte-level BPE, 50,257
BENCH_TOKENIZERS = ("smollm2-135m", "gemma3-270m", "llama2-tokenizer", "gpt2-tokenizer")


def build_config(name: str, vocab_size: int | None = None):
    """The transformers config of `name` (REAL_CONFIGS / TINY_CONFIGS), optionally with another vocabulary.

    Checks that the KV geometry read back from it is the one written down (the rope layout changed between
    transformers 4 and 5), so a version that reads the fields differently fails here, not in the numbers.
    """
    if name not in CONFIGS:
        raise SystemExit(f"unknown model config '{name}'; known: {', '.join(CONFIGS)}")
    fields = dict(CONFIGS[name])
    model_type = fields.pop("model_type")
    if vocab_size is not None:
        fields["vocab_size"] = vocab_size
    config = transformers.AutoConfig.for_model(model_type, **fields)
    g = geometry_of(config, name=name)
    want = {
        "num_layers": fields["num_hidden_layers"],
        "num_kv_heads": fields["num_key_value_heads"],
        "head_dim": fields.get("head_dim", fields["hidden_size"] // fields["num_attention_heads"]),
        "rope theta": fields["rope_theta"],
    }
    got = {
        "num_layers": g.num_layers,
        "num_kv_heads": g.num_kv_heads,
        "head_dim": g.head_dim,
        "rope theta": g.rope.theta_of(g.num_layers - 1) if g.rope else None,
    }
    if got != want:
        raise SystemExit(
            f"config '{name}' reads back as {got}, expected {want} (transformers "
            f"{transformers.__version__} lays the config out differently)"
        )
    return config


def build_model(
    name: str, *, dtype: torch.dtype, device: str, attn: str = "sdpa", vocab_size: int | None = None
):
    """A randomly initialised causal LM of config `name` on `device` in `dtype`, eval mode.

    Families without an sdpa kernel (gemma2's soft-capping) fall back to eager;
    `model.config._attn_implementation` says which one runs.
    """
    config = build_config(name, vocab_size)
    torch.manual_seed(0)
    try:
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(
                config, dtype=dtype, attn_implementation=attn
            )
    except ValueError:
        if attn == "eager":
            raise
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(
                config, dtype=dtype, attn_implementation="eager"
            )
    model.config.name_or_path = name
    return model.to(device).eval()


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------- tokenizers
def tokenizer_path(name: str, tokenizers_dir: str | Path | None) -> str:
    """The zoo name itself, or DIR/name when the tokenizers were exported into a directory."""
    return str(Path(tokenizers_dir) / name) if tokenizers_dir else name


def load_tok(name: str, tokenizers_dir: str | Path | None = None):
    from kvdistill.models.load import load_tokenizer

    return load_tokenizer(tokenizer_path(name, tokenizers_dir))


def export_tokenizers(out_dir: Path, names=BENCH_TOKENIZERS) -> None:
    """Save the zoo tokenizers the benchmarks use into out_dir/<name> (carry that directory to a GPU
    machine)."""
    for name in names:
        tok = load_tok(name)
        tok.save_pretrained(out_dir / name)
        print(f"{name}: {out_dir / name}")


# ------------------------------------------------------------------------------------------- texts
def make_records(n: int, tokenizers: list, max_tokens: int, seed: int = 0) -> list[dict]:
    """n GSM-style records {id, text, answer_start, question}: a question, reasoning steps and an answer, each
    text as long as it can be while staying within `max_tokens` tokens under every tokenizer given (so no
    answer is truncated away; the most verbose tokenizer's batch is nearly unpadded)."""
    rng = random.Random(seed)
    names = ["Ava", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goro", "Hana", "Ivan", "Jun"]
    items = ["apples", "marbles", "stamps", "coins", "pencils", "tickets", "shells", "books"]

    def n_tokens(text: str) -> int:
        return max(len(t(text, add_special_tokens=True)["input_ids"]) for t in tokenizers)

    records = []
    for i in range(n):
        who, what = rng.choice(names), rng.choice(items)
        total = rng.randint(10, 90)
        head = (
            f"Question: {who} has {total} {what} and trades them over a long week. How many are "
            "left?\nReasoning:"
        )
        steps: list[str] = []
        answer = total
        while True:
            k = rng.randint(1, 25)
            op = rng.choice(["gives away", "buys", "finds", "loses"])
            new = answer - k if op in ("gives away", "loses") else answer + k
            step = (
                f" Day {len(steps) + 1}: {who} {op} {k} {what}, so {answer} "
                f"{'-' if new < answer else '+'} {k} = {new}."
            )
            text = head + "".join(steps) + step + f"\nAnswer: {new}"
            if n_tokens(text) > max_tokens:
                break
            steps.append(step)
            answer = new
        body = head + "".join(steps) + "\nAnswer: "
        question = f"{who} has {total} {what} and trades them over a long week. How many are left?"
        records.append(
            {"id": f"bench-{i}", "text": body + str(answer), "answer_start": len(body), "question": question}
        )  # the text starts as the default template renders the question
    return records


# ------------------------------------------------------------------------------------------- timing
def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(
    fns: dict[str, Callable[[], object]], device: str, *, warmup: int, repeats: int, memory: bool = False
) -> dict[str, dict]:
    """Wall time of each fn, ms: `warmup` untimed rounds, then `repeats` rounds that run every fn once in turn
    (interleaving spreads slow drift of a shared machine over all of them). On CUDA each call is synchronised
    before and after, and `memory` adds the peak allocated memory of one call (MiB)."""
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    peak: dict[str, float] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            if cuda and memory:
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
            if cuda and memory:
                peak[name] = max(peak.get(name, 0.0), (torch.cuda.max_memory_allocated() - base) / 2**20)
    out = {}
    for name, ts in times.items():
        out[name] = {
            "median_ms": round(statistics.median(ts), 3),
            "min_ms": round(min(ts), 3),
            "runs_ms": [round(t, 3) for t in ts],
        }
        if name in peak:
            out[name]["peak_extra_mib"] = round(peak[name], 1)
    return out


# ------------------------------------------------------------------------------------------- the record
def environment(device: str) -> dict:
    """Device name, library versions, date: the header of every result file."""
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name()
        extra = {
            "cuda": torch.version.cuda,
            "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
        }
    else:
        name = f"cpu ({platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()})"
        extra = {"cpu_count": os.cpu_count()}
    return {
        "device": name,
        **extra,
        "host": platform.node(),
        "host_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def write_result(path: str | Path, result: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


def print_table(rows: list[dict], columns: list[str]) -> None:
    """A plain fixed-width table of `rows` (dicts) over `columns`."""
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
    return str(v)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    exp = sub.add_parser(
        "export-tokenizers", help="save the zoo tokenizers the benchmarks use into DIR/<name>"
    )
    exp.add_argument("dir", type=Path)
    exp.add_argument("--names", default=",".join(BENCH_TOKENIZERS), help="comma-separated zoo names")
    args = ap.parse_args()
    if args.command == "export-tokenizers":
        export_tokenizers(args.dir, args.names.split(","))


if __name__ == "__main__":
    main()
