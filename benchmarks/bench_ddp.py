"""Multi-process runs as one command: DDP training throughput and weights, sharded extraction, a killed rank.

    python benchmarks/bench_ddp.py --nprocs 1,2 --out OUTDIR                 # CPU: gloo, tiny preset
    python benchmarks/bench_ddp.py --nprocs 1,2,4 --out OUTDIR               # 4 GPUs: NCCL, real preset
    bash scripts/multigpu/run.sh N OUTDIR                                    # the same, N GPUs, env set

Every phase runs the real commands in subprocesses and reads what they leave on disk:

train    `torchrun --standalone --nproc_per_node N -m kvdistill.cli train CFG` and the same under
         `accelerate launch [--multi_gpu] --num_processes N`, for every N of --nprocs, at one global batch
         G = batch_size · N (grad_accum 1; the trainer's docstring: step s takes stream[s·G:(s+1)·G] on any
         N). tokens/s = tokens / step time summed over the steps after --warmup-steps (metrics.jsonl: tokens
         is the sum over processes, tokens_per_s that sum over process 0's step time); speed-up = tokens/s
         over the 1-process torchrun run's. Weights: final/student of every run against the 1-process torchrun
         run, max |Δ| and torch.testing's default tolerance of the training precision (float32: rtol 1.3e-6,
         atol 1e-5; bf16 autocast: rtol 1.6e-2, atol 1e-5).
extract  `kvdistill extract --teacher DIR --shard-index i --num-shards n` as n concurrent processes
         (process i on GPU i mod #GPUs via CUDA_VISIBLE_DEVICES; --device cpu without GPUs), then
         `kvdistill cache merge`;
         tokens/s per process (the command's own figure) against the 1-process extraction, and every tensor
         of every sample of the merged cache against the 1-process cache (CacheReader, exact).
kill     a torchrun run on the largest N (≥ 2) with a checkpoint every --save-every steps: once step-K exists
         (K = 2 · save_every) rank 1 gets SIGKILL; reported: torchrun's exit code and its failure lines, how
         long every process took to stop, whether any outlived torchrun, the newest checkpoint and
         `checkpoint_problem` of it (None: intact); then `train --resume` on N processes, whose final weights
         and metrics must equal the uninterrupted N-process run of the train phase.

Presets (random weights from configs; the GPU machine has no checkpoints):
    tiny  (CPU) student llama 2 × 64 (gpt2 tokenizer), teacher llama-tiny of benchmarks/common.py (smollm2
          tokenizer); GSM-style JSONL texts of up to 48 tokens, global batch 8, 12 steps, float32
    real  (GPU) student with Qwen2.5-0.5B's config (gpt2 tokenizer), teacher llama-1b (Llama-3.2-1B's config,
          smollm2 tokenizer, bf16); GSM-style JSONL texts of up to 256 tokens, global batch 64, 12 steps, bf16
          autocast
Launch environment of every subprocess: NCCL_NVLS_ENABLE=0 (NVLink multicast off on the shared machines),
TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1, HF_HUB_OFFLINE=1, OMP_NUM_THREADS=1 on CPU.
The result is one JSON (--out/ddp.json, or --json PATH).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import (
    CONFIGS,
    STUDENT_TOKENIZER,
    TOKENIZER_OF,
    build_model,
    environment,
    load_tok,
    make_records,
    write_result,
)

LAUNCH_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
    "COLUMNS": "10000",  # the CLI's closing lines unwrapped, so they can be read back
}

PRESETS = {
    "tiny": {
        "student": {
            "family": "llama",
            "num_hidden_layers": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 32,
            "max_position_embeddings": 256,
            "tie_word_embeddings": True,
        },
        "teacher": "llama-tiny",
        "seq": 48,
        "global_batch": 8,
        "steps": 12,
        "size": 96,
        "extract_size": 48,
        "extract_batch": 4,
        "mixed_precision": "no",
        "teacher_dtype": torch.float32,
    },
    "real": {
        "student": {
            "family": "qwen2",
            **{
                k: v
                for k, v in CONFIGS["qwen2-0.5b"].items()
                if k not in ("model_type", "vocab_size", "rope_theta")
            },
            "rope_parameters": {"rope_type": "default", "rope_theta": CONFIGS["qwen2-0.5b"]["rope_theta"]},
        },
        "teacher": "llama-1b",
        "seq": 256,
        "global_batch": 64,
        "steps": 12,
        "size": 1024,
        "extract_size": 512,
        "extract_batch": 16,
        "mixed_precision": "bf16",
        "teacher_dtype": torch.bfloat16,
    },
}
# torch.testing.assert_close's defaults for the precision the update is computed in
TOLERANCE = {"no": {"rtol": 1.3e-6, "atol": 1e-5}, "bf16": {"rtol": 1.6e-2, "atol": 1e-5}}


# ---------------------------------------------------------------------------------------------- setup
def bin_of(name: str) -> list[str]:
    """`torchrun` / `accelerate` next to this Python (a venv), else on PATH, else their modules."""
    here = Path(os.path.normpath(Path(sys.executable).parent / name))
    found = str(here) if here.exists() else shutil.which(name)
    module = {"torchrun": "torch.distributed.run", "accelerate": "accelerate.commands.accelerate_cli"}[name]
    return [found] if found else [sys.executable, "-m", module]


def child_env(gpus: int, extra: dict | None = None) -> dict:
    env = {**os.environ, **LAUNCH_ENV, **(extra or {})}
    if gpus == 0:  # CPU processes, gloo (also with --cpu where GPUs are visible)
        env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return env


def save_teacher(name: str, out_dir: Path, preset: dict, device: str, tokenizers: str | None) -> Path:
    """A random `name` model (benchmarks/common.py) sized for its family's stand-in tokenizer, saved with
    it."""
    if (out_dir / "config.json").is_file():
        return out_dir
    tok = load_tok(TOKENIZER_OF[CONFIGS[name]["model_type"]], tokenizers)
    model = build_model(name, dtype=preset["teacher_dtype"], device=device, attn="sdpa", vocab_size=len(tok))
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.config, attr, getattr(tok, attr))
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    del model
    return out_dir


def write_data(path: Path, preset: dict, teacher: Path, tokenizers: str | None) -> Path:
    """GSM-style texts (benchmarks/common.py make_records) as long as `seq` tokens allow under the student's
    and the teacher's tokenizers, as JSONL {id, text, answer}: every batch is nearly full, as in real
    training."""
    if path.is_file():
        return path
    from kvdistill.models.load import load_tokenizer

    toks = [load_tok(STUDENT_TOKENIZER, tokenizers), load_tokenizer(str(teacher))]
    rows = make_records(preset["size"], toks, preset["seq"])
    path.write_text(
        "".join(
            json.dumps({"id": r["id"], "text": r["text"], "answer": r["text"][r["answer_start"] :]}) + "\n"
            for r in rows
        )
    )
    return path


def write_run_config(path: Path, teacher: Path, data: Path, preset: dict, args) -> Path:
    """The run config every launch trains; per-launch values go in as overrides."""
    import yaml

    raw = {
        "name": "bench-ddp",
        "student": {"from_config": preset["student"], "tokenizer": tokenizer_ref(STUDENT_TOKENIZER, args)},
        "teachers": [{"name": "teacher", "model": str(teacher)}],
        "data": {
            "source": "jsonl",
            "path": str(data),
            "size": preset["size"],
            "eval_size": 0,
            "max_length": preset["seq"],
            "seed": 0,
        },
        "train": {
            "steps": args.steps,
            "lr": 1e-3,
            "warmup_steps": 2,
            "schedule": "cosine",
            "mixed_precision": preset["mixed_precision"],
            "save_every": args.save_every,
            "log_every": 1,
            "tensorboard": False,
            "seed": 0,
            "distributed": args.distributed,
            "fsdp": {"cpu_offload": args.cpu_offload},
        },
    }
    path.write_text(
        yaml.safe_dump(raw, sort_keys=False)
    )  # YAML's own floats (JSON's 1e-06 reads as a string)
    return path


def tokenizer_ref(name: str, args) -> str:
    return str(Path(args.tokenizers) / name) if args.tokenizers else name


# ---------------------------------------------------------------------------------------------- train
def launcher(kind: str, n: int, gpus: int) -> list[str]:
    if kind == "torchrun":
        return [*bin_of("torchrun"), "--standalone", "--nproc_per_node", str(n)]
    cmd = [
        *bin_of("accelerate"),
        "launch",
        "--num_machines",
        "1",
        "--num_processes",
        str(n),
        "--dynamo_backend",
        "no",
        "--mixed_precision",
        "no",
    ]  # the run config sets mixed precision
    if n > 1:  # torch.distributed.run, as torchrun; on CPU the trainer picks gloo itself
        cmd += ["--multi_gpu", "--main_process_port", str(free_port())]
    return cmd


def free_port() -> int:
    """A TCP port free now (accelerate's default 29500 may be taken by another run on a shared machine)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(kind: str, n: int, gpus: int, config: Path, out: Path, preset: dict, resume: bool = False):
    per_process = preset["global_batch"] // n
    cmd = [
        *launcher(kind, n, gpus),
        "-m",
        "kvdistill.cli",
        "train",
        str(config),
        "--out",
        str(out),
        f"train.batch_size={per_process}",
        "train.grad_accum=1",
    ]
    return cmd + (["--resume"] if resume else [])


def run_logged(cmd: list[str], env: dict, log: Path, timeout: float) -> tuple[int, float]:
    """Run `cmd` with its output in `log`; (exit code, wall seconds)."""
    t0 = time.perf_counter()
    with log.open("w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = 124
    return code, time.perf_counter() - t0


def metrics_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [
        r
        for r in (json.loads(x) for x in path.read_text().splitlines() if x.strip())
        if r.get("split") != "eval"
    ]


def throughput(rows: list[dict], warmup: int) -> dict:
    timed = [r for r in rows if r["step"] > warmup]
    tokens = sum(r["tokens"] for r in timed)
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in timed)
    return {
        "timed_steps": len(timed),
        "tokens": int(tokens),
        "step_s_median": round(sorted(r["tokens"] / r["tokens_per_s"] for r in timed)[len(timed) // 2], 4)
        if timed
        else None,
        "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
    }


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "student" / "model.safetensors"))


def compare_weights(a: dict, b: dict, tol: dict) -> dict:
    """max |Δ| over every tensor, and whether every element is within atol + rtol·|a| (a: the reference)."""
    if a.keys() != b.keys():
        return {"same_keys": False}
    worst, within, outside = 0.0, True, 0
    for k in a:
        x, y = a[k].float(), b[k].float()
        d = (x - y).abs()
        worst = max(worst, float(d.max()))
        bad = int((d > tol["atol"] + tol["rtol"] * x.abs()).sum())
        outside += bad
        within &= bad == 0
    return {
        "same_keys": True,
        "max_abs_diff": worst,
        "within_tolerance": within,
        "elements_outside": outside,
        "tolerance": tol,
    }


def loss_diff(a: list[dict], b: list[dict]) -> float | None:
    if [r["step"] for r in a] != [r["step"] for r in b] or not a:
        return None
    return max(abs(x["loss"] - y["loss"]) / max(abs(x["loss"]), 1e-12) for x, y in zip(a, b, strict=True))


def phase_train(args, root: Path, config: Path, preset: dict, gpus: int, launchers: list[str]) -> dict:
    runs = {}
    for kind in launchers:
        for n in args.nprocs:
            out = root / "train" / f"{kind}-{n}"
            if out.exists():
                shutil.rmtree(out)
            cmd = train_command(kind, n, gpus, config, out, preset)
            code, wall = run_logged(cmd, child_env(gpus), root / "train" / f"{kind}-{n}.log", args.timeout)
            rows = metrics_rows(out)
            runs[f"{kind}-{n}"] = {
                "launcher": kind,
                "processes": n,
                "batch_per_process": preset["global_batch"] // n,
                "command": " ".join(cmd),
                "exit_code": code,
                "wall_s": round(wall, 1),
                "steps_logged": len(rows),
                **throughput(rows, args.warmup_steps),
            }
            if code != 0:
                runs[f"{kind}-{n}"]["log_tail"] = tail(root / "train" / f"{kind}-{n}.log")
            print(
                f"train {kind} x{n}: exit {code}, {runs[f'{kind}-{n}'].get('tokens_per_s')} tokens/s, "
                f"{wall:.0f} s",
                flush=True,
            )
    ref_name = f"torchrun-{args.nprocs[0]}"
    ref = runs.get(ref_name)
    tol = TOLERANCE[preset["mixed_precision"]]
    if ref and ref["exit_code"] == 0:
        ref_w, ref_rows = weights(root / "train" / ref_name), metrics_rows(root / "train" / ref_name)
        for name, r in runs.items():
            if r["exit_code"] != 0:
                continue
            if r["tokens_per_s"] and ref["tokens_per_s"]:
                r["speedup"] = round(r["tokens_per_s"] / ref["tokens_per_s"], 3)
            r["weights_vs_" + ref_name] = compare_weights(ref_w, weights(root / "train" / name), tol)
            r["loss_max_rel_diff_vs_" + ref_name] = loss_diff(ref_rows, metrics_rows(root / "train" / name))
    targets = {2: 1.8, 4: 3.5}
    return {
        "reference": ref_name,
        "speedup_targets": targets,
        "runs": runs,
        "meets_targets": {
            name: r.get("speedup", 0) >= targets[r["processes"]]
            for name, r in runs.items()
            if r["processes"] in targets
        }
        if gpus
        else None,
    }


# ---------------------------------------------------------------------------------------------- extract
EXTRACT_LINE = re.compile(r"\(([\d,]+) tokens in ([\d.]+) s(?:, ([\d,]+) tokens/s)?\)")


def phase_extract(args, root: Path, teacher: Path, data: Path, preset: dict, gpus: int) -> dict:
    from kvdistill.cache.reader import CacheReader

    base = [
        "-m",
        "kvdistill.cli",
        "extract",
        "--teacher",
        str(teacher),
        "--batch-size",
        str(preset["extract_batch"]),
        "--no-progress",
        "--data",
        str(data),
        "--size",
        str(preset["extract_size"]),
        "--max-length",
        str(preset["seq"]),
        "data.eval_size=0",
    ]
    results = {}
    for n in args.shards:
        out = root / "extract" / f"shards-{n}"
        if out.exists():
            shutil.rmtree(out)
        procs = []
        t0 = time.perf_counter()
        for i in range(n):
            cmd = [os.path.normpath(sys.executable), *base, "--out", str(out)] + (
                ["--shard-index", str(i), "--num-shards", str(n)] if n > 1 else []
            )
            # GPU: the cores shared among the processes (torchrun does the same for training)
            threads = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // n))}
            env = child_env(gpus, {"CUDA_VISIBLE_DEVICES": str(i % gpus), **threads} if gpus else None)
            cmd += ["--device", "cuda" if gpus else "cpu"]
            log = (root / "extract" / f"shards-{n}.part-{i}.log").open("w")
            procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log, cmd))
        codes, parts = [], []
        for i, (p, log, _) in enumerate(procs):
            try:
                codes.append(p.wait(timeout=args.timeout))
            except subprocess.TimeoutExpired:
                p.kill()
                codes.append(124)
            log.close()
            text = Path(log.name).read_text()
            m = EXTRACT_LINE.search(text)
            parts.append(
                {
                    "shard": i,
                    "device": f"cuda:{i % gpus}" if gpus else "cpu",
                    "exit_code": codes[-1],
                    "tokens": int(m.group(1).replace(",", "")) if m else None,
                    "seconds": float(m.group(2)) if m else None,
                    "tokens_per_s": float(m.group(3).replace(",", "")) if m and m.group(3) else None,
                    **({} if codes[-1] == 0 else {"log_tail": text[-2000:]}),
                }
            )
        wall = time.perf_counter() - t0
        entry = {"shards": n, "command": " ".join(procs[0][2]), "wall_s": round(wall, 1), "parts": parts}
        if n > 1 and all(c == 0 for c in codes):
            merge = [
                os.path.normpath(sys.executable),
                "-m",
                "kvdistill.cli",
                "cache",
                "merge",
                str(out),
                "--parts",
                str(n),
            ]
            code, _ = run_logged(
                merge, child_env(gpus), root / "extract" / f"shards-{n}.merge.log", args.timeout
            )
            entry.update(merge_command=" ".join(merge), merge_exit_code=code)
        rates = [p["tokens_per_s"] for p in parts if p["tokens_per_s"]]
        entry["tokens"] = sum(p["tokens"] or 0 for p in parts)
        # the parts run at once: their rates add up (the command's figure: tokens over its extraction loop)
        entry["tokens_per_s_per_process"] = round(sum(rates) / n, 1) if len(rates) == n else None
        entry["tokens_per_s_aggregate"] = round(sum(rates), 1) if len(rates) == n else None
        results[n] = entry
        print(
            f"extract x{n}: exit {codes}, {entry['tokens_per_s_per_process']} tokens/s per process",
            flush=True,
        )
    ref_n = args.shards[0]
    ref_dir = root / "extract" / f"shards-{ref_n}"
    for n, entry in results.items():
        if n == ref_n or entry.get("merge_exit_code") != 0 or (ref_dir / "manifest.json").is_file() is False:
            continue
        a, b = CacheReader(ref_dir), CacheReader(root / "extract" / f"shards-{n}")
        same_ids = sorted(a.sample_ids) == sorted(b.sample_ids)
        worst, differing, compared = 0.0, 0, 0
        if same_ids:
            for sid in a.sample_ids:
                ta, tb = a.get(sid), b.get(sid)
                if ta.keys() != tb.keys():
                    differing += 1
                    continue
                for k in ta:
                    compared += 1
                    if ta[k].shape != tb[k].shape or not torch.equal(ta[k], tb[k]):
                        differing += 1
                        if ta[k].shape == tb[k].shape:
                            worst = max(worst, float((ta[k].float() - tb[k].float()).abs().max()))
        entry[f"equal_to_shards_{ref_n}"] = {
            "same_sample_ids": same_ids,
            "samples": len(a),
            "tensors": compared,
            "tensors_differing": differing,
            "max_abs_diff": worst,
        }
        if entry["tokens_per_s_per_process"] and results[ref_n]["tokens_per_s_per_process"]:
            entry["per_process_vs_1"] = round(
                entry["tokens_per_s_per_process"] / results[ref_n]["tokens_per_s_per_process"], 3
            )
    return {"reference": f"shards-{ref_n}", "runs": {f"shards-{n}": e for n, e in results.items()}}


# ---------------------------------------------------------------------------------------------- kill
def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):  # the task ended meanwhile
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def phase_kill(args, root: Path, config: Path, preset: dict, gpus: int) -> dict:
    from kvdistill.train.checkpoint import checkpoint_problem, list_checkpoints

    n = max(args.nprocs)
    out = root / "kill" / f"torchrun-{n}"
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = train_command("torchrun", n, gpus, config, out, preset)
    log = (root / "kill" / "killed.log").open("w")
    agent = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(gpus), start_new_session=True
    )
    # one step past the second checkpoint: the kill lands inside a step, the resume redoes logged steps
    at = 2 * args.save_every
    trigger = out / "checkpoints" / f"step-{at}"
    deadline = time.time() + args.timeout
    while (
        not (trigger.is_dir() and len(metrics_rows(out)) > at)
        and agent.poll() is None
        and time.time() < deadline
    ):
        time.sleep(0.01)
    workers = {rank_of(p): p for p in children(agent.pid)}
    report: dict = {
        "command": " ".join(cmd),
        "kill_when": f"{trigger.name} saved and step {at + 1} logged",
        "workers": len(workers),
    }
    if agent.poll() is not None or 1 not in workers:
        log.close()
        report.update(
            error=f"run ended (exit {agent.poll()}) or rank 1 not found before {trigger.name}",
            log_tail=tail(Path(log.name)),
        )
        return report
    steps_at_kill = len(metrics_rows(out))
    os.kill(workers[1], signal.SIGKILL)
    t_kill = time.perf_counter()
    try:
        code = agent.wait(timeout=args.stop_timeout)
        hung = False
    except subprocess.TimeoutExpired:  # a hang: take the whole group down and say so
        os.killpg(agent.pid, signal.SIGKILL)
        code, hung = agent.wait(), True
    stop_s = time.perf_counter() - t_kill
    log.close()
    text = Path(log.name).read_text()
    survivors = [r for r, p in workers.items() if alive(p)]
    for r in survivors:
        os.kill(workers[r], signal.SIGKILL)
    ckpts = list_checkpoints(out)
    newest = ckpts[-1] if ckpts else None
    failure = [
        ln.strip()
        for ln in text.splitlines()
        if re.search(r"ChildFailedError|exitcode|Signal \d+|SIGKILL|SIGTERM|error|Error", ln)
    ][:20]
    report.update(
        steps_logged_at_kill=steps_at_kill,
        torchrun_exit_code=code,
        hung=hung,
        seconds_to_stop=round(stop_s, 2),
        workers_alive_after_torchrun=survivors,
        failure_lines=failure,
        checkpoints=[c.name for c in ckpts],
        newest_checkpoint=newest.name if newest else None,
        newest_checkpoint_problem=checkpoint_problem(newest) if newest else "no checkpoint",
        leftovers=sorted(p.name for p in (out / "checkpoints").iterdir() if p not in ckpts)
        if (out / "checkpoints").is_dir()
        else [],
    )
    resume = train_command("torchrun", n, gpus, config, out, preset, resume=True)
    rcode, wall = run_logged(resume, child_env(gpus), root / "kill" / "resumed.log", args.timeout)
    report.update(resume_command=" ".join(resume), resume_exit_code=rcode, resume_wall_s=round(wall, 1))
    full = root / "train" / f"torchrun-{n}"
    if rcode == 0 and (full / "final").is_dir():
        a, b = metrics_rows(full), metrics_rows(out)
        report["resumed_vs_uninterrupted"] = {
            "uninterrupted": str(full.relative_to(root)),
            "steps": [r["step"] for r in b] == [r["step"] for r in a],
            "tokens_equal": [r["tokens"] for r in b] == [r["tokens"] for r in a],
            "lr_equal": [r["lr"] for r in b] == [r["lr"] for r in a],
            "loss_max_rel_diff": loss_diff(a, b),
            "weights": compare_weights(weights(full), weights(out), TOLERANCE[preset["mixed_precision"]]),
        }
    elif rcode != 0:
        report["resume_log_tail"] = tail(root / "kill" / "resumed.log")
    return report


def tail(path: Path, n: int = 3000) -> str:
    return path.read_text()[-n:] if path.is_file() else ""


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="work directory (models, runs, caches, logs)")
    ap.add_argument("--json", type=Path, default=None, help="result file (default OUT/ddp.json)")
    ap.add_argument(
        "--nprocs",
        default=None,
        help="process counts, first the reference, e.g. 1,2,4 (default "
        "1,2 on CPU, 1..#GPUs by powers of 2 on GPU)",
    )
    ap.add_argument(
        "--shards", default=None, help="extraction shard counts, first the reference (default: --nprocs)"
    )
    ap.add_argument(
        "--phases", default="train,extract,kill", help="any of train, extract, kill (kill needs train)"
    )
    ap.add_argument("--launchers", default="torchrun,accelerate", help="torchrun and/or accelerate")
    ap.add_argument("--preset", choices=list(PRESETS), default=None, help="default: real on GPU, tiny on CPU")
    ap.add_argument("--cpu", action="store_true", help="gloo on CPU even where GPUs are visible")
    ap.add_argument(
        "--distributed",
        choices=["ddp", "fsdp"],
        default="ddp",
        help="train.distributed of every launch: ddp replicates the student, fsdp shards it (FSDP2)",
    )
    ap.add_argument(
        "--cpu-offload", action="store_true", help="with --distributed fsdp: train.fsdp.cpu_offload"
    )
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the preset's)")
    ap.add_argument(
        "--save-every", type=int, default=3, help="checkpoint interval (the kill lands after 2 of them)"
    )
    ap.add_argument("--warmup-steps", type=int, default=2, help="steps left out of the throughput")
    ap.add_argument("--timeout", type=float, default=600, help="seconds any one command may take")
    ap.add_argument(
        "--stop-timeout",
        type=float,
        default=120,
        help="seconds every process gets to stop after the kill before it counts as a hang",
    )
    ap.add_argument(
        "--tokenizers",
        default=None,
        help="directory from `python benchmarks/common.py export-tokenizers` (default: the zoo)",
    )
    args = ap.parse_args()

    import yaml

    gpus = 0 if args.cpu else torch.cuda.device_count()
    if args.nprocs is None:
        args.nprocs = "1,2" if gpus == 0 else ",".join(str(2**i) for i in range(gpus.bit_length()))
    args.nprocs = [int(x) for x in args.nprocs.split(",")]
    args.shards = [int(x) for x in args.shards.split(",")] if args.shards else list(args.nprocs)
    phases = set(args.phases.split(","))
    launchers = args.launchers.split(",")
    preset_name = args.preset or ("real" if gpus else "tiny")
    preset = PRESETS[preset_name]
    args.steps = args.steps or preset["steps"]
    problems = [
        f"--phases {p!r}: not one of train, extract, kill" for p in phases - {"train", "extract", "kill"}
    ]
    problems += [
        f"--launchers {k!r}: not torchrun or accelerate"
        for k in launchers
        if k not in ("torchrun", "accelerate")
    ]
    problems += [
        f"--nprocs {n}: global batch {preset['global_batch']} does not split into {n} equal parts"
        for n in args.nprocs
        if n < 1 or preset["global_batch"] % n
    ]
    if gpus:
        problems += [f"--nprocs {n}: only {gpus} GPU(s) visible" for n in args.nprocs if n > gpus]
    if "kill" in phases and (max(args.nprocs) < 2 or "train" not in phases or "torchrun" not in launchers):
        problems.append(
            "--phases kill needs a process count >= 2 in --nprocs and the torchrun train phase "
            "(its uninterrupted run is the reference)"
        )
    if "kill" in phases and 2 * args.save_every + 2 >= args.steps:
        problems.append(
            f"--save-every {args.save_every}: the kill lands after step {2 * args.save_every + 1}, "
            f"which must be at least two steps before the last ({args.steps})"
        )
    if problems:
        raise SystemExit("bench_ddp: " + "; ".join(problems))

    root = args.out.resolve()
    for d in ("train", "extract", "kill", "models"):
        (root / d).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    teacher = save_teacher(
        preset["teacher"], root / "models" / "teacher", preset, "cuda" if gpus else "cpu", args.tokenizers
    )
    if gpus:
        torch.cuda.empty_cache()
    data = write_data(root / "data.jsonl", preset, teacher, args.tokenizers)
    config = write_run_config(root / "run.yaml", teacher, data, preset, args)
    result = {
        "benchmark": "ddp",
        **environment("cuda" if gpus else "cpu"),
        "gpus": gpus,
        "backend": "nccl" if gpus else "gloo",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "launch_env": {k: v for k, v in LAUNCH_ENV.items() if k != "COLUMNS"},
        "settings": {
            "preset": preset_name,
            "nprocs": args.nprocs,
            "shards": args.shards,
            "steps": args.steps,
            "global_batch": preset["global_batch"],
            "seq": preset["seq"],
            "save_every": args.save_every,
            "warmup_steps": args.warmup_steps,
            "student": preset["student"],
            "teacher": preset["teacher"],
            "mixed_precision": preset["mixed_precision"],
            "extract_samples": preset["extract_size"],
        },
        "run_config": yaml.safe_load(config.read_text()),
    }
    if "train" in phases:
        result["train"] = phase_train(args, root, config, preset, gpus, launchers)
    if "extract" in phases:
        result["extract"] = phase_extract(args, root, teacher, data, preset, gpus)
    if "kill" in phases:
        result["kill"] = phase_kill(args, root, config, preset, gpus)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    write_result(args.json or root / "ddp.json", result)


if __name__ == "__main__":
    main()
