"""Logit distillation steps: kvdistill against TRL's GKD loss on one student/teacher pair and batch, and \
the cost of
the cross-tokenizer logit term over the K/V distillation step.

    python benchmarks/bench_logit_kd.py --device cpu --preset tiny --out benchmarks/results/logit_kd_cpu.json
    python benchmarks/bench_logit_kd.py --device cuda --preset real --out $OUT/logit_kd_h100.json \
        [--tokenizers DIR]

TRL: `trl.experimental.gkd.gkd_trainer.GKDTrainer.generalized_jsd_loss` (TRL >= 1.x; older releases:
`trl.trainer.gkd_trainer`), imported if trl is installed; without it the TRL rows are skipped and the JSON
says why. trl 1.16 is one pure-Python wheel (`pip download --no-deps trl`); importing its GKD trainer needs
accelerate, datasets (pandas, pyarrow), transformers, jinja2, psutil, numpy, pyyaml, packaging,
huggingface_hub, which a kvdistill environment already has.

Models: random weights from real checkpoints' configs (benchmarks/common.py), saved with their tokenizer and
built into the objective the way training builds it.
    real  student qwen2-0.5b; teacher `same` llama-1b with the student's tokenizer (gpt2, 50,257); teacher
          `cross` qwen2-1.5b with the llama2 tokenizer (32,000); batch 4 of up to 1024 tokens; bf16 weights
    tiny  the same families at toy size (benchmarks/common.py TINY_CONFIGS), batch 2 of up to 64 tokens;
          float32
--tokenizer NAME gives the student and `same` another zoo tokenizer (gemma3-270m: 262,144 entries, the memory
case).

Part 1, one tokenizer (student + `same`), JSD β = 0.5, τ = 2, every step: student forward with grad, teacher
forward without, the loss, backward, AdamW step:
    trl_step            the loss is TRL's generalized_jsd_loss (batchmean over the real positions)
    kvd_step            the loss is kvdistill.losses.logit_kd (per sample, × τ², chunked over positions)
    kvd_objective_step  kvdistill's Objective with losses {ce: 0, kv: 0, logit_kd: jsd} on the collated batch:
                        the step `kvdistill train` runs (K/V capture hooks and fusion included)
    trl_loss, kvd_loss, kvd_loss_one_pass   the loss alone (forward + backward) on fixed logits; on a GPU
                        with the peak memory one call allocates (the chunked loss holds one chunk's float32
                        softmaxes)
    values: TRL's value against kvdistill's per-sample values weighted by their positions and divided by τ²
            (both in float32): the same divergence, TRL averaging over positions, kvdistill over samples.
    TRL computes in the logits' dtype (bf16 on the GPU here), kvdistill in float32 (a chunk at a time).
Part 2, the `cross` teacher (another tokenizer), Objective steps with losses {ce: 1, kv: 1} plus:
    kv_step             nothing else (the K/V step)
    kv_logit_step       logit_kd 0.5, cross_tokenizer project (shared-string projection at prefix partners)
    kv_logit_topk_step  the same against the teacher's top-64 + tail
    kv_span_step        logit_kd 0.5, cross_tokenizer span (aligned-chunk likelihoods)
    reported: each one's (step - kv_step) / kv_step.
Timings: medians of --repeats interleaved rounds after --warmup (benchmarks/common.time_interleaved).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from bench_train_step import save_random_model
from common import (
    CONFIGS,
    STUDENT_TOKENIZER,
    TOKENIZER_OF,
    default_device,
    environment,
    load_tok,
    make_records,
    print_table,
    time_interleaved,
    write_result,
)

PRESETS = {
    "real": {"student": "qwen2-0.5b", "same": "llama-1b", "cross": "qwen2-1.5b", "batch": 4, "seq": 1024},
    "tiny": {
        "student": "qwen2-tiny-student",
        "same": "llama-tiny",
        "cross": "qwen2-tiny",
        "batch": 2,
        "seq": 64,
    },
}
BETA, TAU = 0.5, 2.0


def trl_loss_fn():
    """TRL's GKD loss as a function, and where it came from (or None and why not)."""
    errors = []
    for where in ("trl.experimental.gkd.gkd_trainer", "trl.trainer.gkd_trainer"):
        try:
            module = __import__(where, fromlist=["GKDTrainer"])
            import trl

            return (
                module.GKDTrainer.generalized_jsd_loss,
                f"{where}.GKDTrainer.generalized_jsd_loss (trl {trl.__version__})",
            )
        except Exception as err:  # ImportError, or a dependency failing inside trl
            errors.append(f"{where}: {type(err).__name__}: {err}")
    return None, "; ".join(errors)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default=default_device())
    ap.add_argument(
        "--out", type=Path, default=None, help="default: benchmarks/results/logit_kd_<device>.json"
    )
    ap.add_argument(
        "--preset", choices=list(PRESETS), default=None, help="default: real on cuda, tiny on cpu"
    )
    ap.add_argument("--tokenizer", default=STUDENT_TOKENIZER, help="the student's and `same`'s zoo tokenizer")
    ap.add_argument(
        "--tokenizers",
        default=None,
        help="directory written by `python benchmarks/common.py export-tokenizers` (default: the zoo)",
    )
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None, help="max tokens per sample, every tokenizer")
    ap.add_argument(
        "--chunk", type=int, default=1024, help="losses.logit_kd.chunk (positions per softmax chunk)"
    )
    ap.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="weights (default bfloat16 on cuda, float32 on cpu)",
    )
    ap.add_argument("--warmup", type=int, default=None, help="default 1 on cpu, 3 on cuda")
    ap.add_argument("--repeats", type=int, default=None, help="default 3 on cpu, 10 on cuda")
    ap.add_argument(
        "--tmp-dir", default=None, help="where the random models are saved (default: system temp)"
    )
    args = ap.parse_args()
    from kvdistill import losses
    from kvdistill.config import load_config
    from kvdistill.objectives import build_objective

    on_gpu = args.device == "cuda"
    if on_gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    preset = PRESETS[args.preset or ("real" if on_gpu else "tiny")]
    batch, seq = args.batch or preset["batch"], args.seq or preset["seq"]
    args.dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 1)
    repeats = args.repeats or (10 if on_gpu else 3)
    out = args.out or Path(__file__).parent / "results" / f"logit_kd_{args.device}.json"
    trl_loss, trl_source = trl_loss_fn()
    print(f"TRL: {trl_source}")

    student_tok = load_tok(args.tokenizer, args.tokenizers)
    cross_tok = load_tok(TOKENIZER_OF[CONFIGS[preset["cross"]]["model_type"]], args.tokenizers)
    records = make_records(batch, [student_tok, cross_tok], seq)

    def objective_of(tmp: Path, teacher: str, logit_kd: dict | None, kv: float, ce: float):
        raw = {
            "name": "bench-logit-kd",
            "student": {"model": str(tmp / "student"), "dtype": args.dtype},
            "teachers": [{"name": teacher, "model": str(tmp / teacher), "dtype": args.dtype}],
            "data": {"max_length": seq},
            "losses": {"ce": ce, "kv": {"weight": kv}, **({"logit_kd": logit_kd} if logit_kd else {})},
            "train": {"batch_size": batch, "seed": 0},
        }
        return build_objective(load_config(raw=raw), device=args.device)

    jsd = {"weight": 1.0, "divergence": "jsd", "beta": BETA, "temperature": TAU, "chunk": args.chunk}
    with tempfile.TemporaryDirectory(dir=args.tmp_dir, prefix="bench-logit-kd-") as tmp_name:
        tmp = Path(tmp_name)
        models = {
            "student": save_random_model(preset["student"], student_tok, tmp / "student", args),
            "same": save_random_model(preset["same"], student_tok, tmp / "same", args),
            "cross": save_random_model(preset["cross"], cross_tok, tmp / "cross", args),
        }
        one = objective_of(tmp, "same", jsd, kv=0.0, ce=0.0)
        cross = {
            "kv_step": objective_of(tmp, "cross", None, kv=1.0, ce=1.0),
            "kv_logit_step": objective_of(tmp, "cross", {"weight": 0.5, "chunk": args.chunk}, kv=1.0, ce=1.0),
            "kv_logit_topk_step": objective_of(
                tmp, "cross", {"weight": 0.5, "top_k": 64, "chunk": args.chunk}, kv=1.0, ce=1.0
            ),
            "kv_span_step": objective_of(
                tmp, "cross", {"weight": 0.5, "cross_tokenizer": "span", "chunk": args.chunk}, kv=1.0, ce=1.0
            ),
        }
    fused = True if on_gpu else None  # as the trainer builds it

    # ---------------------------------------------------------------- part 1: one tokenizer, kvdistill vs TRL
    student, teacher = one.student, one.teachers[0].model
    collated = one.collate(records)
    if on_gpu:
        collated = collated.pin_memory()
    ids, mask = (
        collated.ids.to(args.device),
        collated.mask.to(args.device),
    )  # (B, T): one tokenizer, one batch
    labels = torch.where(mask.bool(), ids, -100)  # TRL's mask: labels != -100, at the same positions
    opt = torch.optim.AdamW(one.parameters(), lr=1e-5, fused=fused)

    def manual_step(loss_of):
        def run():
            s = student(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (B, T, V)
            with torch.no_grad():
                t = teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (B, T, V)
            loss_of(s, t).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return run

    def kvd(s, t, chunk=args.chunk):
        return losses.logit_kd(s, t, mask, temperature=TAU, divergence="jsd", beta=BETA, chunk=chunk).mean()

    def trl(s, t):
        return trl_loss(s, t, labels=labels, beta=BETA, temperature=TAU, reduction="batchmean")

    def objective_step():
        one(collated)[0].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with torch.no_grad():
        s_fixed = student(input_ids=ids, attention_mask=mask, use_cache=False).logits.detach()
        t_fixed = teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits.detach()

    def loss_only(fn):
        def run():
            s = s_fixed.clone().requires_grad_()
            fn(s, t_fixed).backward()

        return run

    fns = {
        "kvd_step": manual_step(kvd),
        "kvd_objective_step": objective_step,
        "kvd_loss": loss_only(kvd),
        "kvd_loss_one_pass": loss_only(lambda s, t: kvd(s, t, chunk=0)),
    }
    values = {}
    if trl_loss is not None:
        fns.update(trl_step=manual_step(trl), trl_loss=loss_only(trl))
        with torch.no_grad():
            per_sample = losses.logit_kd(
                s_fixed.float(), t_fixed.float(), mask, temperature=TAU, divergence="jsd", beta=BETA
            )  # (B,)
            n = mask.sum(1).float()  # (B,) positions per sample
            ours = float((per_sample * n).sum() / n.sum()) / TAU**2
            theirs = float(
                trl_loss(s_fixed.float(), t_fixed.float(), labels=labels, beta=BETA, temperature=TAU)
            )
        values = {
            "trl_batchmean": theirs,
            "kvdistill_position_weighted_over_tau2": ours,
            "relative_difference": abs(ours - theirs) / max(abs(theirs), 1e-12),
        }
        print(f"values: TRL {theirs:.6f}, kvdistill {ours:.6f}")
    part1 = time_interleaved(fns, args.device, warmup=warmup, repeats=repeats, memory=True)

    # ----------------------------------------------------------- part 2: another tokenizer, over the K/V step
    steps = {}
    for name, objective in cross.items():
        objective.train()
        c_opt = torch.optim.AdamW(objective.parameters(), lr=1e-5, fused=fused)
        c_batch = objective.collate(records)
        if on_gpu:
            c_batch = c_batch.pin_memory()

        def step(objective=objective, c_opt=c_opt, c_batch=c_batch):
            objective(c_batch)[0].backward()
            c_opt.step()
            c_opt.zero_grad(set_to_none=True)

        steps[name] = step
    part2 = time_interleaved(steps, args.device, warmup=warmup, repeats=repeats, memory=True)
    base = part2["kv_step"]["median_ms"]
    overhead = {k: round((v["median_ms"] - base) / base, 4) for k, v in part2.items() if k != "kv_step"}
    proj = cross["kv_logit_step"].terms.cross["cross"]
    real_tokens = int(collated.mask.sum())

    result = {
        "benchmark": "logit_kd",
        "env": environment(args.device),
        "settings": {
            "preset": args.preset or ("real" if on_gpu else "tiny"),
            "batch": batch,
            "seq": seq,
            "padded_tokens": int(collated.ids.numel()),
            "real_tokens": real_tokens,
            "dtype": args.dtype,
            "chunk": args.chunk,
            "jsd_beta": BETA,
            "temperature": TAU,
            "warmup": warmup,
            "repeats": repeats,
            "models": models,
            "shared_strings_student_cross": proj.shared,
        },
        "trl": trl_source,
        "one_tokenizer": part1,
        "one_tokenizer_ratios": {
            "kvd_step_over_trl_step": (
                round(part1["kvd_step"]["median_ms"] / part1["trl_step"]["median_ms"], 4)
                if "trl_step" in part1
                else None
            ),
            "kvd_loss_over_trl_loss": (
                round(part1["kvd_loss"]["median_ms"] / part1["trl_loss"]["median_ms"], 4)
                if "trl_loss" in part1
                else None
            ),
            "kvd_objective_step_over_trl_step": (
                round(part1["kvd_objective_step"]["median_ms"] / part1["trl_step"]["median_ms"], 4)
                if "trl_step" in part1
                else None
            ),
        },
        "values": values,
        "cross_tokenizer": part2,
        "cross_tokenizer_overhead_over_kv_step": overhead,
    }
    rows = [
        {"step": k, "median_ms": v["median_ms"], "peak_extra_mib": v.get("peak_extra_mib")}
        for k, v in {**part1, **part2}.items()
    ]
    print_table(rows, ["step", "median_ms", "peak_extra_mib"])
    print("ratios", result["one_tokenizer_ratios"], "cross overhead", overhead)
    write_result(out, result)


if __name__ == "__main__":
    main()
