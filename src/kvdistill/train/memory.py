"""Memory of a training run per process: the estimate made before it starts (`run_parts`, `run_bytes`:
validate, the experiments runner's `concurrent: auto`) and the report measured at its first step
(`memory_report`).

The estimate, in bytes per process, with B the batch, T = data.max_length, W processes; for the student N_s
parameters (N_tr trainable, N_fr = N_s - N_tr frozen, e.g. LoRA's base), b_s bytes per weight (4 in fp32), L_s
layers, width F_s, vocabulary V_s; for each online teacher N_t, F_t, L_t, V_t:

    weights     b_s · N_s                   ddp: every process holds the student
                b_s · N_s / W + 2 · b_s · N_s / L_s   fsdp: its shard, and the gathered parameters of the
                                                 two blocks in flight (the one running, the one prefetched)
                2 · b_s · N_s / L_s         fsdp with cpu_offload: the shards live in host memory
    grads       4 · N_tr  (fsdp: / W; with cpu_offload: 0)
    optimizer   8 · N_tr  (fsdp: / W; with cpu_offload: 0)   AdamW's two fp32 moments
    acts        B · T · (34 · F_s · L_s + 12 · V_s)   training activations (mixed precision) and the fp32
                                                 logits, their softmax and gradient
    teachers    Σ_t [2 · N_t + 2 · B · T · (2 · F_t · L_t + 8 · F_t + V_t·[logit KD])]   bf16 weights, held by
                                                 every process; per batch the K/V of every layer (at most 2 ·
                                                 F_t each), the forward's transient activations, and the
                                                 logits only where logit KD reads them; twice that batch when
                                                 the teachers run ahead
    scoring     (4 · min(B, 4) + 8) · T · max_t V_t   the confidence weights (fusion.confidence): one
                                                 teacher's bf16 logits of 4 samples at a time and a copy, one
                                                 sample's fp32 log-softmax
    latent      B · [(T + M) · (34 · F_s · L_s + 12 · V_s) + (T + I · M) · 34 · F_s · L_s
                     + I · (T + M) · 4 · F_s · L_s]
                                                 a latent-reasoning student (student.latent, M tokens > 0,
                                                 I iterations; below)
    per process 1.3 · (weights + grads + optimizer + acts + teachers + scoring + latent) + 0.75 GiB
                                                 allocator slack, CUDA context

The latent term is derived from the passes one training step of a latent student (`objectives.kava`,
`student.latent.LatentStudent`) runs and holds for its backward. `acts` is then its teacher-forced CoT-mode
pass (question, CoT and answer text, at most T tokens: the vocabulary logits of CoT CE, the hidden states CODI
reads, the self teacher's K/V), and `latent` adds the others, at 34 · F_s bytes a column per layer as `acts`:
the student-mode pass over question, M latent slots and answer (at most T + M columns) with its logits for
the answer CE (12 · V_s a column; its hidden states for CODI and latent K/V for L_KV are among its
activations); the passes that make the latents, without logits (the decoder under the LM head): the question
once (at most T columns) and I Jacobi passes over the M slots (none where I = 0); besides, the K and V over
question and slots that each Jacobi pass's attention keeps, bf16 and repeated to every query head (2 · 2 ·
F_s bytes a column per layer). The compressed K/V targets (M entries per head) are small beside these and not
counted. Checked on an H100 (2026-12-07) with the kava spec's E4 (llama 6 × 384, vocabulary 49,152, B 64, T
96, M 12, I 3): nvidia-smi showed its latent runs' processes at 8.4-17.4 GiB (reserved memory included); the
estimate without the latent term was 6.3 GiB (one run died of out-of-memory beside 10 others), with it 12.9
GiB (latent 5.1 GiB before slack).

The estimate is deliberately generous: a run that does not fit dies of out-of-memory.
"""

from __future__ import annotations

import torch

from kvdistill.objectives.fusion import SCORE_CHUNK

__all__ = [
    "CONTEXT",
    "GIB",
    "SLACK",
    "device_memory",
    "estimate_note",
    "latent_geometry",
    "memory_report",
    "run_bytes",
    "run_parts",
]

GIB = 1024**3
CONTEXT = 0.75 * GIB
SLACK = 1.3


def run_parts(
    *,
    batch: int,
    length: int,
    student: dict,
    teachers: list[dict],
    ahead: bool,
    teacher_logits: bool = False,
    world: int = 1,
    distributed: str = "ddp",
    cpu_offload: bool = False,
    teacher_scoring: bool = False,
    latent: dict | None = None,
) -> dict[str, int]:
    """The estimate's parts before slack (bytes per process): weights, grads, optimizer, acts, teachers,
    scoring (with teacher_scoring), latent (with a latent student).

    `student`: {params, hidden, layers, vocab} and optionally trainable (default: params) and bytes (per
    weight, default 4); each teacher: {params, hidden, layers, vocab}; `latent`: a latent student's {tokens,
    iterations} (`latent_geometry`; None or 0 tokens: a text student, no latent part)."""
    s = student
    n, n_tr, b = s["params"], s.get("trainable", s["params"]), s.get("bytes", 4)
    if distributed == "fsdp" and (world > 1 or cpu_offload):  # sharded, as `distributed.sharded_run` decides
        in_flight = 2 * b * n // max(1, s["layers"])
        weights = in_flight if cpu_offload else b * n // world + in_flight
        share = 0 if cpu_offload else 1 / world
    else:
        weights, share = b * n, 1.0
    parts = {
        "weights": int(weights),
        "grads": int(4 * n_tr * share),
        "optimizer": int(8 * n_tr * share),
        "acts": batch * length * (34 * s["hidden"] * s["layers"] + 12 * s["vocab"]),
        "teachers": 0,
    }
    for t in teachers:
        logits = t["vocab"] if teacher_logits else 0
        per_batch = 2 * batch * length * (2 * t["hidden"] * t["layers"] + 8 * t["hidden"] + logits)
        parts["teachers"] += 2 * t["params"] + per_batch * (2 if ahead else 1)
    if (
        teacher_scoring and teachers
    ):  # one teacher's logits of SCORE_CHUNK samples (and a copy), one sample's fp32
        vocab = max(t["vocab"] for t in teachers)
        parts["scoring"] = (4 * min(batch, SCORE_CHUNK) + 8) * length * vocab
    if latent and latent["tokens"] > 0:  # the passes of a latent step beside `acts`' CoT pass (docstring)
        m, its = latent["tokens"], latent["iterations"]
        block = s["hidden"] * s["layers"]  # F_s · L_s
        answer = (length + m) * (34 * block + 12 * s["vocab"])  # question, latents, answer; logits
        jacobi = (length + its * m) * 34 * block if its > 0 else 0  # question once, I passes over M
        kv = its * (length + m) * 4 * block  # each Jacobi pass's repeated bf16 K and V
        parts["latent"] = batch * (answer + jacobi + kv)
    return parts


def latent_geometry(student_cfg) -> dict | None:
    """{tokens, iterations} of a config's latent student (`run_parts`' `latent`); None for a text student
    or one of 0 latent tokens (the no-CoT reference, estimated as a text student)."""
    lat = student_cfg.latent
    if lat is None or lat.tokens == 0:
        return None
    return {"tokens": lat.tokens, "iterations": lat.iterations}


def run_bytes(**kwargs) -> int:
    """The estimate of one run per process (`run_parts`' arguments), slack and context included."""
    return int(SLACK * sum(run_parts(**kwargs).values()) + CONTEXT)


def _local_bytes(t: torch.Tensor) -> int:
    """Bytes this process holds of `t` (its shard, for a DTensor)."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.to_local()
    return t.numel() * t.element_size()


def memory_report(objective, optimizer, device: torch.device) -> dict:
    """What this process holds now (bytes): the student's parameters and gradients (its shard under fsdp), the
    maps', the online teachers', the gradients (as large as the trainable weights), the optimizer state, and
    on a GPU the peak allocated since the run started (None on a CPU, where torch does not count
    allocations)."""
    student = sum(_local_bytes(p) for p in objective.student.parameters())
    maps = sum(_local_bytes(p) for n, p in objective.named_parameters() if not n.startswith("student."))
    grads = sum(
        _local_bytes(p) for p in objective.parameters() if p.requires_grad
    )  # as the trainable weights
    teachers = sum(
        _local_bytes(p)
        for t in getattr(objective, "teachers", [])
        if hasattr(t, "model")
        for p in t.model.parameters()
    )
    optimizer = getattr(optimizer, "optimizer", optimizer)  # under Accelerate's wrapper
    state = sum(_local_bytes(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {
        "student_params_bytes": student,
        "maps_params_bytes": maps,
        "teacher_params_bytes": teachers,
        "grad_bytes": grads,
        "optimizer_state_bytes": state,
        "peak_allocated_bytes": peak,
    }


def _shape(
    model: str | None, from_config: dict | None, key: str, lora=None, tokenizer: str | None = None
) -> dict:
    """{params, trainable, hidden, layers, vocab} of a model built on the meta device (no weights read); a
    from_config model's vocabulary is its tokenizer's, as `build_student` sizes it."""
    from transformers import AutoModelForCausalLM

    if from_config is not None:
        from kvdistill.models.from_config import hf_config_from_spec
        from kvdistill.models.load import load_tokenizer

        config, _ = hf_config_from_spec(from_config, key=key)
        name = tokenizer or from_config.get("base")
        if name:
            config.vocab_size = len(load_tokenizer(name))
    else:
        from kvdistill.models.load import load_config

        config = load_config(model)
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in net.parameters())
    trainable = params
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        net = get_peft_model(
            net,
            LoraConfig(
                r=lora.r, lora_alpha=lora.alpha, target_modules=lora.target_modules, task_type="CAUSAL_LM"
            ),
        )
        trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
        params = sum(p.numel() for p in net.parameters())
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {
        "params": params,
        "trainable": trainable,
        "hidden": int(text.hidden_size),
        "layers": int(text.num_hidden_layers),
        "vocab": int(text.vocab_size),
    }


def device_memory() -> tuple[int, str]:
    """(bytes, name) of the device a run here would use: GPU 0's total memory, else the host's physical
    memory."""
    import os

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory, f"GPU ({torch.cuda.get_device_name(0)})"
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "host (no GPU)"


def estimate_note(cfg, world: int, device_bytes: int | None, device: str) -> tuple[str, bool]:
    """(a line on the estimated peak memory per process of the run `cfg` on `world` processes, whether it does
    not fit `device_bytes`, the memory of the device it will run on). Builds the models on the meta device
    only."""
    dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}[cfg.student.dtype]
    student = {
        **_shape(
            cfg.student.model,
            cfg.student.from_config,
            "student.from_config",
            cfg.student.lora,
            cfg.student.tokenizer,
        ),
        "bytes": dtype_bytes,
    }
    online = [t for t in cfg.teachers if t.source == "online"]
    teachers = [
        _shape(t.model, t.from_config, f"teachers[{i}].from_config", tokenizer=t.tokenizer)
        for i, t in enumerate(online)
    ]
    ahead = bool(online) and (
        cfg.train.teachers_ahead or (cfg.train.teachers_ahead is None and device == "cuda")
    )
    kwargs = dict(
        batch=cfg.train.batch_size,
        length=cfg.data.max_length,
        student=student,
        teachers=teachers,
        ahead=ahead,
        teacher_logits=cfg.losses.teacher_logits,
        teacher_scoring=cfg.fusion.scores_teachers,
        world=world,
        distributed=cfg.train.distributed,
        cpu_offload=cfg.train.fsdp.cpu_offload,
        latent=latent_geometry(cfg.student),
    )
    parts, total = run_parts(**kwargs), run_bytes(**kwargs)
    shown = ", ".join(f"{k} {v / GIB:.2f}" for k, v in parts.items())
    mode = cfg.train.distributed + (" with cpu_offload" if cfg.train.fsdp.cpu_offload else "")
    line = (
        f"estimated peak memory per process: {total / GIB:.2f} GiB on {world} process(es), {mode} (GiB: "
        f"{shown}; "
        f"student {student['params'] / 1e6:.1f}M parameters, {student['trainable'] / 1e6:.1f}M trained)"
    )
    over = device_bytes is not None and total > device_bytes
    if device_bytes is not None:
        line += f"; the {device} has {device_bytes / GIB:.1f} GiB"
    if over:
        line += (
            " - it will not fit: lower train.batch_size or data.max_length, use LoRA, or run more processes "
            "with train.distributed=fsdp (train.fsdp.cpu_offload=true on one GPU)"
        )
    return line, over
