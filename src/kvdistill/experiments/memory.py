"""How many runs share the device, from an estimate of each run's memory: `concurrent: auto` when they start,
and the gate before each further child starts.

Per run: the estimate of one process, `kvdistill.train.memory.run_bytes` (its formula there): a single-process
run holds fp32 student weights, gradients and AdamW's moments (16 · N_s), activations at the batch and length,
and the online teachers in bf16, plus allocator slack and the CUDA context.

concurrent = max(1, min(runs, CPU cores, k)), k the most runs whose k largest estimates sum to at most
0.9 · the free device memory: any k of them fit at once, and runs of unequal size (a spec's three teachers at
4.5, 17.9 and 35.6 GiB) are not counted as k copies of the largest.
The estimate is deliberately generous: a run that does not fit dies of out-of-memory, one run too few only
waits. On a machine without a GPU the device memory is the host's available memory.

The gate (`admits`): that count is made once, when the runs start; another experiment or process taking
memory later would over-commit the card. So `run_pool` asks before it starts each further child on a CUDA
device whether

    need <= free - unallocated,   unallocated = Σ need_c over the running children c started < ramp_s ago

with `free` the device's free memory now (`cuda_free_bytes`, a reading at most `POLL_S` old, less than the
ramp) and `need` the next job's estimate: a child is assumed to allocate nothing of its estimate in its first
`ramp_s` seconds (the default `RAMP_S` 60 s, a spec's `memory_ramp_s`; model load and the first steps) and
all of it after; a child whose estimate is not known counts 0. A job without an estimate (`need` None) is
admitted while free - unallocated > 0. A job is always admitted where no child runs (the pool never
deadlocks; a warning says where its estimate exceeds the free memory), and always without CUDA (free None).
Other experiments on the same machine (`kvdistill experiment` twice, say, sharing the one GPU) are seen
through a ledger of starts (`Ledger`): each pool on a CUDA device appends every child it starts (pid of
the pool, estimate, wall-clock time) to one file per user in the temp directory (`KVDISTILL_GPU_LEDGER`
overrides the path), under a file lock, and counts the other pools' starts of the last `ramp_s` seconds as
unallocated too (and as running, for the at-least-one rule). A pool removes its own entries when it ends,
and the file when it is left empty: nothing stays behind. Without CUDA no ledger is read or written.
What each pool gates on: training (teachers and the (condition, seed) runs) the `run_bytes` estimate of each
run (`run_estimator`); scoring no estimate (the at-least-one rule and free memory > 0 only).

The length T of that estimate is the longest training text of the run under any of its tokenizers (the
student's and its online teachers'), at most data.max_length: a training batch is padded to its longest row,
not to max_length. On 2026-12-08 (H100) the specialists spec's sorting teacher, whose texts are at most 135
Gemma tokens, was estimated at max_length 320 (81.5 GiB, so the teachers trained one at a time) and peaked at
33.3 GB; at 135 the same formula gives 34 GiB. An on-policy run keeps max_length (its samples replace the
data's continuations).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# the estimate itself (per process, by distributed mode)
from kvdistill.data import load_records
from kvdistill.train.memory import CONTEXT, GIB, SLACK, run_bytes

log = logging.getLogger(__name__)

__all__ = [
    "CONTEXT",
    "GIB",
    "Ledger",
    "POLL_S",
    "RAMP_S",
    "SLACK",
    "Started",
    "admits",
    "auto_concurrent",
    "cuda_free_bytes",
    "cuda_memory",
    "others_hold_memory",
    "OTHERS_MIN",
    "free_device_bytes",
    "geometry",
    "run_bytes",
    "longest_text",
    "run_estimator",
    "unallocated",
    "wait_note",
]

RAMP_S = 60.0  # seconds a started child is assumed to allocate nothing of its estimate (spec.memory_ramp_s)
POLL_S = 5.0  # seconds between two free-memory readings while a job waits (less than the ramp)


def cuda_memory() -> tuple[int, int] | None:
    """(free, total) memory of GPU 0 in bytes (torch.cuda.mem_get_info), None without CUDA. Read in this
    process where it holds a CUDA context already, else asked of a child process so that this one never
    creates one."""
    import torch

    if not torch.cuda.is_available():
        return None
    if torch.cuda.is_initialized():
        free, total = torch.cuda.mem_get_info()
        return int(free), int(total)
    code = "import json, torch\nprint(json.dumps(list(torch.cuda.mem_get_info())))"
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
        )
        free, total = json.loads(out.stdout.strip().splitlines()[-1])
        return int(free), int(total)
    except (subprocess.SubprocessError, ValueError, IndexError, TypeError):
        return None


def cuda_free_bytes() -> int | None:
    """Free memory of GPU 0 in bytes (`cuda_memory`), None without CUDA."""
    got = cuda_memory()
    return None if got is None else got[0]


OTHERS_MIN = 2 * GIB  # memory in use on the card beyond this process's own that says another process holds it


def others_hold_memory() -> bool:
    """Whether processes other than this one (and its ended children) hold memory on GPU 0: more than
    OTHERS_MIN in use beyond what this process has reserved and its CUDA context. Read by `run_pool` when a
    child died of out of memory with none of its own pool running: another experiment's runs past their ramp
    (which the ledger no longer counts) are seen here. False without CUDA."""
    import torch

    got = cuda_memory()
    if got is None:
        return False
    free, total = got
    own = torch.cuda.memory_reserved() + CONTEXT if torch.cuda.is_initialized() else 0
    return total - free - own > OTHERS_MIN


def free_device_bytes() -> int:
    """Free memory of GPU 0 (`cuda_free_bytes`); without a GPU the host's available memory."""
    free = cuda_free_bytes()
    if free is not None:
        return free
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def auto_concurrent(estimates: list[int], free: int, cores: int | None = None) -> int:
    """Runs at once for runs of these estimated sizes (bytes) on a device with `free` bytes free."""
    if not estimates:
        return 1
    cores = cores or os.cpu_count() or 1
    fit, total = 0, 0
    for need in sorted(estimates, reverse=True):  # the k largest: the worst k runs to hold at once
        total += need
        if total > 0.9 * free:
            break
        fit += 1
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


def run_estimator(teachers: dict[str, dict]) -> Callable[..., int]:
    """estimate(cfg: RunConfig) -> bytes: `run_bytes` of one training process of that run, its online teachers
    read from `teachers` ({name: {model, params}}, the runner's prepared teachers), a latent student's passes
    from cfg.student.latent (`latent_geometry`), at the length `longest_text` gives. Each distinct student is
    built once (on the CPU) for its parameter count, geometry and tokenizer; each (data, tokenizer) pair is
    measured once."""
    from kvdistill.models.load import load_tokenizer
    from kvdistill.student import build_student
    from kvdistill.train.memory import latent_geometry

    shapes: dict[str, dict] = {}
    tokenizers: dict[str, object] = {}  # by student key or teacher model
    records: dict[str, list[dict]] = {}  # by data config
    lengths: dict[tuple[str, str], int] = {}  # by (data config, tokenizer)

    def estimate(cfg) -> int:
        key = cfg.student.model_dump_json()
        if key not in shapes:
            model, tokenizers[key] = build_student(cfg.student, seed=0)
            shapes[key] = {"params": sum(p.numel() for p in model.parameters()), **geometry(model.config)}
            del model
        online = [t for t in cfg.teachers if t.source == "online"]
        tshapes = [
            {"params": teachers[t.name]["params"], **geometry(teachers[t.name]["model"])} for t in online
        ]
        length = cfg.data.max_length
        if cfg.train.on_policy is None:  # the longest text under each tokenizer, each measured once per data
            data = cfg.data.model_dump_json()
            names = [key, *(str(teachers[t.name]["model"]) for t in online)]
            for name in names:
                if (data, name) not in lengths:
                    if name not in tokenizers:
                        tokenizers[name] = load_tokenizer(name)
                    if data not in records:
                        records[data] = load_records(cfg.data, split="train")
                    lengths[data, name] = longest_text(records[data], [tokenizers[name]], cfg.data.max_length)
            length = max(lengths[data, n] for n in names)
        return run_bytes(
            batch=cfg.train.batch_size,
            length=length,
            student=shapes[key],
            teachers=tshapes,
            ahead=cfg.train.teachers_ahead is not False and bool(online),
            teacher_logits=cfg.losses.teacher_logits,
            teacher_scoring=cfg.fusion.scores_teachers,
            latent=latent_geometry(cfg.student),
        )

    return estimate


def longest_text(records: list[dict], tokenizers: list, max_length: int) -> int:
    """The most tokens any record's text takes under any of the tokenizers (`token_counts`: special tokens
    included, a conversation in the tokenizer's chat template, as training tokenizes it), at most max_length;
    max_length where there are no records or a record has no text."""
    from kvdistill.models.tokenization import token_counts

    if not records or any("text" not in r for r in records):
        return max_length
    texts = [r["text"] for r in records]
    longest = 0
    for tok in tokenizers:
        for lo in range(0, len(texts), 4096):  # stops at the first chunk that reaches max_length
            longest = max(longest, *token_counts(tok, texts[lo : lo + 4096]))
            if longest >= max_length:
                return max_length
    return longest


# ---------------------------------------------------------------------------------------------- the gate
@dataclass(frozen=True)
class Started:
    """A running child as the gate sees it: its estimate (bytes; None: not known) and when it started
    (time.monotonic() seconds)."""

    need: int | None
    at: float


def unallocated(running: list[Started], now: float, ramp_s: float) -> int:
    """Bytes the running children are assumed still to allocate: the whole estimate of each started less than
    `ramp_s` seconds before `now`, nothing of the others (nor of a child without an estimate)."""
    return sum(c.need or 0 for c in running if now - c.at < ramp_s)


def admits(need: int | None, free: int | None, running: list[Started], now: float, ramp_s: float) -> bool:
    """Whether the next job (estimate `need` bytes, None: not known) may start now, with `free` bytes free on
    the device (None: no CUDA) and `running` the children running: need <= free - unallocated (> 0 where
    need is None); always where nothing runs or without CUDA."""
    if free is None or not running:
        return True
    room = free - unallocated(running, now, ramp_s)
    return room > 0 if need is None else need <= room


def wait_note(need: int | None, free: int, running: list[Started], now: float, ramp_s: float) -> str:
    """Why the gate keeps a job waiting, in GiB."""
    recent = [c for c in running if now - c.at < ramp_s]
    wanted = f"{need / GIB:.1f} GiB of" if need is not None else "free"
    return (
        f"waiting for {wanted} GPU memory: {free / GIB:.1f} GiB free, "
        f"{unallocated(running, now, ramp_s) / GIB:.1f} GiB of it not yet allocated by the {len(recent)} "
        f"children started in the last {ramp_s:.0f} s ({len(running)} running)"
    )


class Ledger:
    """The starts of every pool on this machine (the module docstring): one JSON line per child started,
    {"pid": the pool's pid, "need": bytes or null, "at": time.time()}, read and rewritten under an
    exclusive `fcntl` lock."""

    def __init__(self, path: Path | None = None, pid: int | None = None):
        default = Path(tempfile.gettempdir()) / f"kvdistill-gpu-starts-{os.getuid()}.jsonl"
        self.path = Path(path or os.environ.get("KVDISTILL_GPU_LEDGER") or default)
        self.pid = os.getpid() if pid is None else pid

    def _update(self, change: Callable[[list[dict]], list[dict]]) -> list[dict]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            with open(self.path, "a+") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                if os.fstat(f.fileno()).st_nlink:
                    return self._change_locked(f, change)
            # another pool removed the file while this one waited for the lock: open the new one

    def _change_locked(self, f, change: Callable[[list[dict]], list[dict]]) -> list[dict]:
        f.seek(0)
        entries = []
        for line in f.read().splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue  # a line torn by a killed writer: dropped
        kept = change(entries)
        if kept is not entries:
            f.seek(0)
            f.truncate()
            f.write("".join(json.dumps(e) + "\n" for e in kept))
            f.flush()
            if not kept:
                self.path.unlink(missing_ok=True)  # under the lock; a waiting pool sees st_nlink 0
        return kept

    def record(self, need: int | None, ramp_s: float) -> None:
        """Append a start of this pool now; entries older than `ramp_s` seconds are dropped."""
        now = time.time()
        self._update(
            lambda es: (
                [e for e in es if now - e["at"] < ramp_s] + [{"pid": self.pid, "need": need, "at": now}]
            )
        )

    def others(self, now_monotonic: float, ramp_s: float) -> list[Started]:
        """The other pools' starts of the last `ramp_s` seconds, on this pool's time.monotonic() clock."""
        if not self.path.exists():
            return []
        now = time.time()
        entries = self._update(lambda es: es if es else [])  # [] rewrites: an empty file goes
        return [
            Started(e["need"], now_monotonic - (now - e["at"]))
            for e in entries
            if e["pid"] != self.pid and now - e["at"] < ramp_s
        ]

    def close(self) -> None:
        """Remove this pool's entries (its children have ended); the file goes where none is left."""
        if self.path.exists():
            self._update(lambda es: [e for e in es if e["pid"] != self.pid])
