"""`concurrent: auto`: how many training runs share the device, from an estimate of each run's memory.

Per run (bytes), with B the batch, T = data.max_length, and for the student N_s parameters, L_s layers, width F_s,
vocabulary V_s; for each online teacher N_t, F_t, L_t, V_t:

    student   16 · N_s                          fp32 weights, gradients and AdamW's two moments
    acts      B · T · (34 · F_s · L_s + 12 · V_s)   training activations (mixed precision) and the fp32 logits,
                                                 their softmax and gradient
    teachers  Σ_t [2 · N_t + 2 · B · T · (2 · F_t · L_t + 8 · F_t + V_t·[logit KD])]   bf16 weights; per batch
                                                 the K/V of every layer (at most 2 · F_t each), the forward's
                                                 transient activations, and the logits only where logit KD reads
                                                 them (otherwise the LM head is skipped); twice that batch when
                                                 the teachers run ahead
    per run   1.3 · (student + acts + teachers) + 0.75 GiB       allocator slack and the CUDA context

concurrent = max(1, min(runs, CPU cores, floor(0.9 · free device memory / the largest run's estimate))).
The estimate is deliberately generous: a run that does not fit dies of out-of-memory, one run too few only waits.
On a machine without a GPU the device memory is the host's available memory.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

log = logging.getLogger(__name__)

GIB = 1024**3
CONTEXT = 0.75 * GIB
SLACK = 1.3


def run_bytes(*, batch: int, length: int, student: dict, teachers: list[dict], ahead: bool,
              teacher_logits: bool = False) -> int:
    """The estimate of one run; `student` / each teacher: {params, hidden, layers, vocab}."""
    s = student
    acts = batch * length * (34 * s["hidden"] * s["layers"] + 12 * s["vocab"])
    total = 16 * s["params"] + acts
    for t in teachers:
        logits = t["vocab"] if teacher_logits else 0
        per_batch = 2 * batch * length * (2 * t["hidden"] * t["layers"] + 8 * t["hidden"] + logits)
        total += 2 * t["params"] + per_batch * (2 if ahead else 1)
    return int(SLACK * total + CONTEXT)


def free_device_bytes() -> int:
    """Free memory of GPU 0, asked of a child process so that this one never holds a CUDA context; without a GPU
    the host's available memory."""
    code = ("import json, torch\n"
            "print(json.dumps(torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else None))")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
        free = json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError):
        free = None
    if free is not None:
        return int(free)
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def auto_concurrent(estimates: list[int], free: int, cores: int | None = None) -> int:
    """Runs at once for runs of these estimated sizes (bytes) on a device with `free` bytes free."""
    if not estimates:
        return 1
    cores = cores or os.cpu_count() or 1
    fit = int(0.9 * free // max(estimates))
    n = max(1, min(len(estimates), cores, fit))
    log.info("concurrent auto: %d runs at once (largest run %.1f GiB, %.1f GiB free, %d cores, %d runs)", n,
             max(estimates) / GIB, free / GIB, cores, len(estimates))
    return n


def geometry(model_dir_or_config) -> dict:
    """{hidden, layers, vocab} of a saved model directory (its config.json) or a transformers config."""
    from transformers import AutoConfig, PretrainedConfig

    cfg = model_dir_or_config
    if not isinstance(cfg, PretrainedConfig):
        cfg = AutoConfig.from_pretrained(str(cfg))
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return {"hidden": int(text.hidden_size), "layers": int(text.num_hidden_layers), "vocab": int(text.vocab_size)}
