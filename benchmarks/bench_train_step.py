"""The speed target of a distillation step: overhead = (c - a - b) / a <= 0.15, where on one batch
    a = a CE-only optimizer step of the student,
    b = the teachers' forward passes (no grad),
    c = a full distillation step: Objective forward (student + online teachers + losses), backward, optimizer
        step.

    python benchmarks/bench_train_step.py --device cpu  --preset tiny \
        --out benchmarks/results/train_step_cpu.json
    python benchmarks/bench_train_step.py --device cuda --preset real \
        --out benchmarks/results/train_step_h100.json [--tokenizers DIR]
    python benchmarks/bench_train_step.py --device cuda --preset large ...   (GPU-filling)
    python benchmarks/bench_train_step.py --device cuda --preset real --on-policy 128 --out ...
        (on-policy step)

Presets (model configs in benchmarks/common.py, random weights):
    real  teachers llama-1b (Llama-3.2-1B config, smollm2 tokenizer) and qwen2-1.5b (Qwen2.5-1.5B config,
          llama2 tokenizer); student qwen2-0.5b (Qwen2.5-0.5B config, gpt2 tokenizer); batch 4 of up to 1024
          tokens, bf16
    large student llama-1b (Llama-3.2-1B config, gpt2 tokenizer), teachers qwen2-1.5b and llama-3b
          (Llama-3.2-3B config, smollm2 tokenizer); batch 8 of up to 2048 tokens, bf16: a step that fills the
          GPU (--batch 16 for more)
    tiny  the same families at 4 layers × width 128 (student 3 × 64), batch 2 of up to 128 tokens, float32
Every model's vocabulary is its tokenizer's. The models are saved into a temporary directory and the objective
is built the way training builds it: `build_objective(load_config(raw=...))` (sdpa attention where nothing
reads attention probabilities, as the library loads models; teachers bf16 on GPU), default losses (CE +
normalised KV MSE, ratio layer map, fixed fusion).

Timed (median of --repeats, interleaved). --inputs collated (default): every step starts from the batch the
trainer's DataLoader workers hand over (`objective.collate(records)`, pinned: token ids, byte spans,
alignments); --inputs texts: from the texts, tokenization (and the alignment) inside every timed step, as
before the collate.
    ce_step        student(ids, mask).logits, CE, backward, clip, AdamW step                     (a)
                   (the objective's own student: same weights, dtype and attention implementation)
    teachers_fwd   per teacher: model.base_model(ids, mask) under no_grad                        (b)
    teachers_kv    per teacher: OnlineTeacher.kv (projection hooks, no cache), what the objective runs
    kd_step        objective(batch), backward, clip, AdamW step                                  (c)
    collate        objective.collate(records) on the CPU: what a worker spends per batch (off the critical
                   path with train.num_workers >= 1; not part of a, b or c)
    ce_forward, kd_forward   the forward halves of a and c alone (--halves)
    kd_step_on_policy        (--on-policy N) an on-policy step of train.on_policy
                   {lambda: 1, max_new_tokens: N}: the student samples N tokens after each record's question
                   (batched, no grad), the batch is collated again, the teachers run on the sampled text, the
                   KD terms on it and CE on the data text (a second student forward), backward, clip, AdamW
                   step
    generate       (--on-policy N) the sampling alone (`OnPolicy.sample`)
AdamW is the fused one on a GPU (as the trainer builds it), clipping torch's foreach clip_grad_norm_.
Reported: with --on-policy, on_policy.ratio = kd_step_on_policy / kd_step (the on-policy step's cost over the
off-policy one) and the share of it spent generating; overhead (with b), overhead_vs_kv = (c - a -
teachers_kv) / a (the student-side cost of the KD terms), tokens/s of a and c (real student tokens), the
student's model-FLOPs utilisation in a and c (6·N + 12·L·d·T FLOPs per padded token, N the student's
parameters, against --peak-tflops), and the memory check of issue 13: peak of c <= peak of a + the teachers'
weights + 10% (peaks as allocated by one call, plus the student's weights and AdamW state, which both steps
hold).

Needs pydantic (kvdistill.config builds the RunConfig that the objective takes).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path

import torch
from common import (
    CONFIGS,
    STUDENT_TOKENIZER,
    TOKENIZER_OF,
    build_model,
    default_device,
    environment,
    load_tok,
    make_records,
    param_count,
    print_table,
    sync,
    time_interleaved,
    write_result,
)

from kvdistill.models.capture import tokenize

PRESETS = {
    "real": {"teachers": ["llama-1b", "qwen2-1.5b"], "student": "qwen2-0.5b", "batch": 4, "seq": 1024},
    "large": {"teachers": ["qwen2-1.5b", "llama-3b"], "student": "llama-1b", "batch": 8, "seq": 2048},
    "tiny": {
        "teachers": ["llama-tiny", "qwen2-tiny"],
        "student": "qwen2-tiny-student",
        "batch": 2,
        "seq": 128,
    },
}
TARGET = 0.15


def save_random_model(name: str, tok, out_dir: Path, args) -> dict:
    """Build `name` with the tokenizer's vocabulary and special ids, save it with the tokenizer into
    out_dir."""
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    model = build_model(name, dtype=dtype, device=args.device, attn="eager", vocab_size=len(tok))
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.config, attr, getattr(tok, attr))
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    info = {
        "params": param_count(model),
        "vocab_size": len(tok),
        "tokenizer": tok.name_or_path.split("/")[-1],
    }
    del model
    return info


def profile(step, device: str, top: int = 30) -> list[str]:
    """The `top` ops of one call of `step` by self time (CUDA time on GPU), as table lines."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        step()
        sync(device)
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=60)
    print(table)
    return table.splitlines()


def count_ops(step, top: int = 15) -> dict:
    """Calls of aten ops in one call of `step` (CPU profiler, no timing): the total and the `top` most called.

    On a GPU every call is (at least) one kernel launch, so this count is what a launch-bound step pays for.
    """
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    counts = {e.key: e.count for e in prof.key_averages() if e.key.startswith("aten::")}
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])
    return {"aten_calls": sum(counts.values()), "top": dict(ranked[:top])}


def overlapped(main, side, device: str):
    """`main` in this thread while `side` runs in a second thread (on its own CUDA stream on a GPU); returns
    when both are done. Timed against main and side alone it shows how far the two threads' host work
    overlaps."""
    import concurrent.futures

    pool = concurrent.futures.ThreadPoolExecutor(1)
    stream = torch.cuda.Stream() if torch.device(device).type == "cuda" else None

    def on_side():
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            side()

    def run():
        future = pool.submit(on_side)
        main()
        future.result()
        if stream is not None:
            torch.cuda.current_stream().wait_stream(stream)

    return run


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def speed_and_memory(
    student, objective, collated, real_tokens: int, timings: dict, peak_tflops: float
) -> dict:
    """tokens/s and the student's MFU of a and c; on a GPU the memory check of issue 13.

    Model FLOPs of one step: (6·N + 12·L·d·T) per padded token (fwd + bwd of the matmuls, and of attention's
    scores and weighted sum), N the student's parameters, L layers, d its attention width, T the padded
    length. Memory: each step's footprint is what its call allocates at its peak (peak_extra_mib) plus the
    student's weights and AdamW state (m, v), which exist before the call; c adds the maps' weights and state;
    the teachers' weights are the allowance: peak(c) <= (peak(a) + teachers' weights) · 1.10.
    """
    cfg = student.config
    B, T = collated.ids.shape
    N = sum(p.numel() for p in student.parameters())
    d_attn = cfg.num_attention_heads * (
        getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    )
    flops = (6 * N + 12 * cfg.num_hidden_layers * d_attn * T) * B * T
    ms = {k: timings[k]["median_ms"] for k in ("ce_step", "kd_step")}
    out = {
        "student_params": N,
        "step_tflop": round(flops / 1e12, 3),
        "tokens_per_s": {k: round(real_tokens / (v / 1e3), 1) for k, v in ms.items()},
        "mfu": {k: round(flops / (v / 1e3) / (peak_tflops * 1e12), 4) for k, v in ms.items()},
        "peak_tflops": peak_tflops,
    }
    if "peak_extra_mib" in timings["ce_step"]:
        mib = 2**20
        student_state = 3 * _bytes(student.parameters()) / mib  # weights + AdamW m, v (the parameters' dtype)
        maps_state = (
            3 * _bytes(p for n, p in objective.named_parameters() if not n.startswith("student.")) / mib
        )
        teachers = sum(_bytes(t.model.parameters()) for t in objective.teachers) / mib
        peak_a = student_state + timings["ce_step"]["peak_extra_mib"]
        peak_c = student_state + maps_state + timings["kd_step"]["peak_extra_mib"]
        out["memory_mib"] = {
            "peak_ce_step": round(peak_a, 1),
            "peak_kd_step": round(peak_c, 1),
            "teachers_weights": round(teachers, 1),
            "ratio": round(peak_c / (peak_a + teachers), 4),
            "target_ratio": 1.10,
            "meets_target": peak_c <= 1.10 * (peak_a + teachers),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default=default_device())
    ap.add_argument(
        "--out", type=Path, default=None, help="default: benchmarks/results/train_step_<device>.json"
    )
    ap.add_argument(
        "--preset", choices=list(PRESETS), default=None, help="default: real on cuda, tiny on cpu"
    )
    ap.add_argument("--teachers", default=None, help=f"comma-separated, of {', '.join(CONFIGS)}")
    ap.add_argument("--student", default=None)
    ap.add_argument(
        "--tokenizers",
        default=None,
        help="directory written by `python benchmarks/common.py export-tokenizers` (default: the zoo)",
    )
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None, help="max tokens per sample, every tokenizer")
    ap.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="student and teacher weights (default bfloat16 on cuda, float32 on cpu)",
    )
    ap.add_argument(
        "--mixed-precision",
        action="store_true",
        help="float32 student under bf16 autocast (train.mixed_precision: bf16) instead of bf16 weights",
    )
    ap.add_argument(
        "--compression",
        choices=["full", "right_crop", "rkv"],
        default="full",
        help="online teachers' compression (right_crop / rkv keep --budget tokens per head)",
    )
    ap.add_argument("--budget", type=int, default=128)
    ap.add_argument(
        "--tmp-dir", default=None, help="where the random models are saved (default: system temp)"
    )
    ap.add_argument("--warmup", type=int, default=None, help="default 1 on cpu, 3 on cuda")
    ap.add_argument("--repeats", type=int, default=None, help="default 3 on cpu, 10 on cuda")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="after timing, profile one kd_step and store the top ops by self time in the JSON",
    )
    ap.add_argument(
        "--inputs",
        choices=["collated", "texts"],
        default="collated",
        help="start each timed step from the collated batch (the trainer's DataLoader) or the texts",
    )
    ap.add_argument("--halves", action="store_true", help="also time the forward halves of a and c")
    ap.add_argument(
        "--compile",
        action="store_true",
        help="train.compile: the loss space's K/V errors under torch.compile (the warmup compiles)",
    )
    ap.add_argument(
        "--peak-tflops",
        type=float,
        default=989.4,
        help="the device's dense bf16 peak for the MFU (default: H100/H200 SXM, 989.4)",
    )
    ap.add_argument(
        "--overlap",
        action="store_true",
        help="also time a and the teachers' K/V run together: the teachers on a side CUDA stream in a "
        "second thread (how much of b a second thread hides while the student steps)",
    )
    ap.add_argument(
        "--ahead",
        type=int,
        default=0,
        metavar="N",  # N >= 2
        help="also time N steps in a row with train.teachers_ahead (the teachers one batch ahead on a "
        "worker thread, as the trainer runs them), and 1 such step, against N CE steps and 1: the "
        "per-step overhead with the pipeline's fill (T_N / N) and the marginal step's "
        "((T_N - T_1) / (N - 1), the steady state of a long run)",
    )
    ap.add_argument(
        "--on-policy",
        type=int,
        default=0,
        metavar="N",
        help="also time an on-policy step (train.on_policy, lambda 1) sampling N new tokens per record, "
        "and the sampling alone, against the off-policy kd_step",
    )
    ap.add_argument(
        "--count-ops",
        action="store_true",
        help="count the aten op calls of one call of every timed function (stored under op_counts)",
    )
    args = ap.parse_args()
    try:
        from kvdistill.config import load_config
        from kvdistill.losses import ce_loss as ce_per_sample
        from kvdistill.objectives import build_objective
    except ImportError as err:
        raise SystemExit(
            f"bench_train_step needs kvdistill.config, which failed to import ({err}): "
            "install pydantic (and pyyaml)"
        ) from None
    if args.ahead == 1 or args.ahead < 0:
        raise SystemExit("--ahead N needs N >= 2 (the marginal step is (T_N - T_1) / (N - 1))")
    on_gpu = args.device == "cuda"
    if on_gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    preset = PRESETS[args.preset or ("real" if on_gpu else "tiny")]
    teachers = args.teachers.split(",") if args.teachers else preset["teachers"]
    student = args.student or preset["student"]
    batch, seq = args.batch or preset["batch"], args.seq or preset["seq"]
    args.dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    if args.mixed_precision:
        args.dtype = "float32"
    warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 1)
    repeats = args.repeats or (10 if on_gpu else 3)
    out = args.out or Path(__file__).parent / "results" / f"train_step_{args.device}.json"
    for name in [*teachers, student]:
        if name not in CONFIGS:
            raise SystemExit(f"unknown model config '{name}'; known: {', '.join(CONFIGS)}")

    teacher_toks = [load_tok(TOKENIZER_OF[CONFIGS[t]["model_type"]], args.tokenizers) for t in teachers]
    student_tok = load_tok(STUDENT_TOKENIZER, args.tokenizers)
    records = make_records(batch, [student_tok, *teacher_toks], seq)
    texts = [r["text"] for r in records]

    with tempfile.TemporaryDirectory(dir=args.tmp_dir, prefix="bench-train-step-") as tmp_name:
        tmp = Path(tmp_name)
        models = {"student": save_random_model(student, student_tok, tmp / "student", args)}
        for t, tok in zip(teachers, teacher_toks, strict=True):
            models[t] = save_random_model(t, tok, tmp / t, args)
        if on_gpu:
            torch.cuda.empty_cache()
        compression = {"kind": args.compression}
        if args.compression != "full":
            compression["budget"] = args.budget
        raw = {
            "name": "bench-train-step",
            "student": {"model": str(tmp / "student"), "dtype": args.dtype},
            "teachers": [
                {
                    "name": t.replace(".", "_"),  # a teacher name becomes a module name: no dots
                    "model": str(tmp / t),
                    "dtype": "bfloat16" if on_gpu else args.dtype,
                    "compression": compression,
                }
                for t in teachers
            ],
            "data": {"max_length": seq},
            "train": {"batch_size": batch, "seed": 0, "compile": args.compile},
        }
        cfg = load_config(raw=raw)
        objective = build_objective(cfg, device=args.device)  # loads every model from tmp before it goes
    objective.train()
    model = objective.student
    autocast = (
        torch.autocast(args.device, dtype=torch.bfloat16)
        if args.mixed_precision
        else contextlib.nullcontext()
    )
    fused = True if on_gpu else None  # as the trainer builds it
    opt_ce = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=fused)
    opt_kd = torch.optim.AdamW(objective.parameters(), lr=3e-4, fused=fused)
    max_norm = cfg.train.max_grad_norm
    collated = objective.collate(records)
    if on_gpu:
        collated = collated.pin_memory()
    from_texts = args.inputs == "texts"

    def ce_loss():
        if from_texts:
            enc = tokenize(student_tok, texts, max_length=seq, padding_side="right")
            ids, mask = enc["input_ids"], enc["attention_mask"]
        else:
            ids, mask = collated.ids, collated.mask
        ids, mask = (
            ids.to(args.device, non_blocking=True),
            mask.to(args.device, non_blocking=True),
        )  # (B, T_s)
        with autocast:
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (B, T_s, V)
            return ce_per_sample(logits, ids, mask).mean()

    def ce_step():
        ce_loss().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        opt_ce.step()
        opt_ce.zero_grad(set_to_none=True)

    def kd_loss():
        with autocast:
            return objective(records if from_texts else collated)[0]

    def kd_step(batch=None):
        with autocast:
            loss = objective(records if from_texts else collated if batch is None else batch)[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(objective.parameters(), max_norm)
        opt_kd.step()
        opt_kd.zero_grad(set_to_none=True)

    @torch.no_grad()
    def teachers_fwd():
        for t, ti in zip(objective.teachers, collated.teachers, strict=True):
            if from_texts:
                enc = tokenize(t.tokenizer, texts, max_length=seq, padding_side="right")
                ids, mask = enc["input_ids"], enc["attention_mask"]
            else:
                ids, mask = ti.input_ids, ti.attention_mask
            t.model.base_model(
                input_ids=ids.to(args.device, non_blocking=True),
                attention_mask=mask.to(args.device, non_blocking=True),
                use_cache=False,
            )

    def teachers_kv():
        for t, ti in zip(objective.teachers, collated.teachers, strict=True):
            t.kv(records, max_length=seq, **({} if from_texts else {"inputs": ti}))

    def collate():
        objective.collate(records)

    def forward_only(fn):
        def run():
            fn()  # the graph is dropped at once

        return run

    fns = {
        "ce_step": ce_step,
        "teachers_fwd": teachers_fwd,
        "teachers_kv": teachers_kv,
        "kd_step": kd_step,
        "collate": collate,
    }
    if args.halves:
        fns.update(ce_forward=forward_only(ce_loss), kd_forward=forward_only(kd_loss))
    if args.overlap:
        fns["ce_step_with_teachers_thread"] = overlapped(ce_step, teachers_kv, args.device)
    if args.on_policy:
        from kvdistill.config.schema import OnPolicyConfig
        from kvdistill.objectives.on_policy import OnPolicy

        sampler = OnPolicy(
            OnPolicyConfig(lam=1.0, max_new_tokens=args.on_policy),
            seed=0,
            template=cfg.data.template,
            tokenizer=objective.tokenizer,
        )
        sampled_tokens = []

        def kd_step_on_policy():
            objective.on_policy = sampler  # the objective's own on-policy path, every step sampled
            try:
                kd_step()
            finally:
                objective.on_policy = None

        def generate():
            sampled_tokens.append(sampler.sample(model, records, 0)[1]["on_policy/new_tokens"])

        fns.update(kd_step_on_policy=kd_step_on_policy, generate=generate)
    if args.ahead:
        from kvdistill.objectives.ahead import TeachersAhead

        def pipeline(n):
            def run():
                ahead = TeachersAhead(
                    objective,
                    iter([collated] * n),
                    device=args.device,
                    mixed_precision="bf16" if args.mixed_precision else "no",
                )
                for batch in ahead:
                    kd_step(batch)
                ahead.close()

            return run

        def ce_steps():
            for _ in range(args.ahead):
                ce_step()

        fns.update(ce_steps=ce_steps, kd_steps_ahead=pipeline(args.ahead), kd_ahead_one=pipeline(1))

        def loss_and_grads(batch):  # no optimizer step: the same weights for both
            objective.zero_grad(set_to_none=True)
            with autocast:
                loss = objective(batch)[0]
            loss.backward()
            out = [loss.detach().clone()] + [
                p.grad.clone() for p in objective.parameters() if p.grad is not None
            ]
            objective.zero_grad(set_to_none=True)
            return out

        inline_lg, again_lg = loss_and_grads(collated), loss_and_grads(collated)
        ahead_lg = loss_and_grads(next(TeachersAhead(objective, iter([collated]), device=args.device)))

        def max_rel(xs, ys):  # the largest |x - y| / max |x| over the loss and every gradient
            return max(
                float((x.float() - y.float()).abs().max() / x.float().abs().max().clamp(min=1e-30))
                for x, y in zip(xs, ys, strict=True)
            )

        ahead_check = {
            "gradients": len(inline_lg) - 1,
            "bit_for_bit": all(torch.equal(x, y) for x, y in zip(inline_lg, ahead_lg, strict=True)),
            "max_rel_diff_ahead_vs_inline": max_rel(inline_lg, ahead_lg),
            "max_rel_diff_inline_vs_inline": max_rel(inline_lg, again_lg),
        }  # the step's own run-to-run spread
        print(f"teachers ahead vs inline: {ahead_check}")
    with torch.no_grad():
        _, metrics0 = objective(records)
    timings = time_interleaved(fns, args.device, warmup=warmup, repeats=repeats, memory=on_gpu)
    ms = {k: v["median_ms"] for k, v in timings.items()}
    a, b, c = ms["ce_step"], ms["teachers_fwd"], ms["kd_step"]
    overhead = (c - a - b) / a
    tokens = {
        name: int(tokenize(tok, texts, max_length=seq)["attention_mask"].sum())
        for name, tok in [("student", student_tok), *zip(teachers, teacher_toks, strict=True)]
    }
    throughput = speed_and_memory(model, objective, collated, tokens["student"], timings, args.peak_tflops)
    result = {
        "benchmark": "train_step",
        **environment(args.device),
        "dtype": args.dtype,
        "settings": {
            "preset": args.preset or ("real" if on_gpu else "tiny"),
            "teachers": teachers,
            "student": student,
            "batch": batch,
            "seq": seq,
            "mixed_precision": args.mixed_precision,
            "compression": compression,
            "attn": {
                "student": model.config._attn_implementation,
                **{t.name: t.model.config._attn_implementation for t in objective.teachers},
            },
            "inputs": args.inputs,
            "compile": args.compile,
            # False when compilation failed and the eager fallback ran (the log says why)
            "compiled": args.compile and getattr(objective.space.group_errors, "compiled", None) is not None,
            "optimizer": f"AdamW lr 3e-4{' fused' if fused else ''}",
            "max_grad_norm": max_norm,
            "warmup": warmup,
            "repeats": repeats,
        },
        "models": models,
        "real_tokens": tokens,
        "first_loss": {k: round(v, 4) for k, v in metrics0.items() if k.startswith("loss")},
        "timings": timings,
        "overhead": round(overhead, 4),
        "overhead_vs_kv": round((c - a - ms["teachers_kv"]) / a, 4),
        "target": TARGET,
        "meets_target": overhead <= TARGET,
        "kd_extra_ms": round(c - a - ms["teachers_kv"], 3),
        **throughput,
    }
    if args.ahead:
        a_n, c_n = (
            ms["ce_steps"] / args.ahead,
            ms["kd_steps_ahead"] / args.ahead,
        )  # per step, the fill included
        # the marginal step: N steps minus 1 step (each run holds as many teachers' passes as student steps,
        # the first pass, with nothing to overlap, in both), over N - 1
        a_s = (ms["ce_steps"] - a) / (args.ahead - 1)
        c_s = (ms["kd_steps_ahead"] - ms["kd_ahead_one"]) / (args.ahead - 1)
        result["ahead"] = {
            "steps": args.ahead,
            "check": ahead_check,
            "ce_step_ms": round(a_n, 3),
            "kd_step_ms": round(c_n, 3),
            "overhead": round((c_n - a_n - b) / a_n, 4),
            "marginal_ce_step_ms": round(a_s, 3),
            "marginal_kd_step_ms": round(c_s, 3),
            "marginal_overhead": round((c_s - a_s - b) / a_s, 4),
            "meets_target": (c_s - a_s - b) / a_s <= TARGET,
        }
        if "memory_mib" in throughput:  # the pass ahead holds a second batch's teacher K/V
            mem = throughput["memory_mib"]
            peak = (
                mem["peak_kd_step"]
                - timings["kd_step"]["peak_extra_mib"]
                + timings["kd_steps_ahead"]["peak_extra_mib"]
            )
            result["ahead"]["memory_ratio"] = round(peak / (mem["peak_ce_step"] + mem["teachers_weights"]), 4)
        print(
            f"ahead x{args.ahead}: per step a {a_n:.1f}, c {c_n:.1f} ms (overhead "
            f"{result['ahead']['overhead']:.3f}); "
            f"marginal a {a_s:.1f}, c {c_s:.1f} ms (overhead {result['ahead']['marginal_overhead']:.3f}); "
            f"memory ratio {result['ahead'].get('memory_ratio')}"
        )
    if args.on_policy:
        result["on_policy"] = {
            "max_new_tokens": args.on_policy,
            "new_tokens": sampled_tokens[-1],
            "kd_step_ms": c,
            "kd_step_on_policy_ms": ms["kd_step_on_policy"],
            "generate_ms": ms["generate"],
            "ratio": round(ms["kd_step_on_policy"] / c, 4),
            "generate_share": round(ms["generate"] / ms["kd_step_on_policy"], 4),
            "new_tokens_per_s": round(sampled_tokens[-1] / (ms["generate"] / 1e3), 1),
        }
        print(
            f"on-policy step {ms['kd_step_on_policy']:.1f} ms vs off-policy {c:.1f} ms: ratio "
            f"{result['on_policy']['ratio']:.2f} (generating {ms['generate']:.1f} ms, "
            f"{sampled_tokens[-1]:.0f} new "
            "tokens)"
        )
    if args.count_ops:
        result["op_counts"] = {name: count_ops(fn) for name, fn in fns.items()}
        print("aten calls: " + ", ".join(f"{k} {v['aten_calls']}" for k, v in result["op_counts"].items()))
    if args.profile:
        result["profile_kd_step"] = profile(kd_step, args.device)
    print_table(
        [
            {
                "a ce_step": a,
                "b teachers_fwd": b,
                "teachers_kv": ms["teachers_kv"],
                "c kd_step": c,
                "collate": ms["collate"],
                "overhead": round(overhead, 4),
                "tok/s c": throughput["tokens_per_s"]["kd_step"],
                "MFU a": throughput["mfu"]["ce_step"],
                "MFU c": throughput["mfu"]["kd_step"],
            }
        ],
        [
            "a ce_step",
            "b teachers_fwd",
            "teachers_kv",
            "c kd_step",
            "collate",
            "overhead",
            "tok/s c",
            "MFU a",
            "MFU c",
        ],
    )
    print(f"overhead (c - a - b) / a = {overhead:.3f} (target <= {TARGET})")
    write_result(out, result)


if __name__ == "__main__":
    main()
