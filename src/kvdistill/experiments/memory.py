"""`concurrent: auto`: how many training runs share the device, from an estimate of each run's memory.

Per run: the estimate of one process, `kvdistill.train.memory.run_bytes` (its formula there): a single-process
run holds fp32 student weights, gradients and AdamW's moments (16 · N_s), activations at the batch and length,
and the online teachers in bf16, plus allocator slack and the CUDA context.

concurrent = max(1, min(runs, CPU cores, floor(0.9 · free device memory / the largest run's estimate))).
The estimate is deliberately generous: a run that does not fit dies of out-of-memory, one run too few only
waits. On a machine without a GPU the device memory is the host's available memory.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

# the estimate itself (per process, by distributed mode)
from kvdistill.train.memory import CONTEXT, GIB, SLACK, run_bytes

log = logging.getLogger(__name__)

__all__ = ["CONTEXT", "GIB", "SLACK", "auto_concurrent", "free_device_bytes", "geometry", "run_bytes"]


def free_device_bytes() -> int:
    """Free memory of GPU 0, asked of a child process so that this one never holds a CUDA context; without a
    GPU the host's available memory."""
    code = (
        "import json, torch\n"
        "print(json.dumps(torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else None))"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
        )
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
    log.info(
        "concurrent auto: %d runs at once (largest run %.1f GiB, %.1f GiB free, %d cores, %d runs)",
        n,
        max(estimates) / GIB,
        free / GIB,
        cores,
        len(estimates),
    )
    return n


def geometry(model_dir_or_config) -> dict:
    """{hidden, layers, vocab} of a saved model directory (its config.json) or a transformers config."""
    from transformers import AutoConfig, PretrainedConfig

    cfg = model_dir_or_config
    if not isinstance(cfg, PretrainedConfig):
        cfg = AutoConfig.from_pretrained(str(cfg))
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return {
        "hidden": int(text.hidden_size),
        "layers": int(text.num_hidden_layers),
        "vocab": int(text.vocab_size),
    }
