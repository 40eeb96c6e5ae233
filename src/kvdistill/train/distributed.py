"""train.distributed fsdp: the student sharded over the processes with FSDP2
(`torch.distributed.fsdp.fully_shard`).

What each process holds, with W processes and N_s student parameters (N_tr of them trainable):

    student     every decoder block and the rest of the model (embeddings, final norm, LM head) are each one
                FSDP2 unit: a process keeps 1/W of every parameter (fp32, or student.dtype), of its gradient
                and of its AdamW moments; a unit's full parameters exist only while it runs (its forward, its
                backward; train.fsdp.reshard_after_forward frees them in between). train.fsdp.cpu_offload
                keeps the shards, gradients and optimizer state in host memory (torch's CPUOffloadPolicy).
    maps        projectors, routers, latent maps (objective parameters outside the student): replicated, as
                under DDP (they are small: a few MB); their gradients are averaged over the processes before
                clipping.
    teachers    frozen, forward-only, replicated: every process holds every online teacher in its own dtype
                (the choice and its cost: docs/architecture.md "Several processes"). The teachers' pass ahead
                (`objectives.ahead`) runs as with one process: the teachers are plain modules on this process.

Why not Accelerate's FSDP plugin: it wraps the whole prepared model (the objective: student, maps and teachers
alike) and keeps its own checkpoint layout; here only the student is sharded and a checkpoint keeps the layout
every run writes (`state/model.safetensors`, `state/optimizer.bin`: the full, unsharded state on process 0),
so a checkpoint written by W processes resumes in any number, and under ddp or fsdp alike.

Mixed precision stays as under DDP: fp32 weights, the objective's forward under autocast (bf16); fp16 (a loss
scaler over shards) is refused, like the student kinds not wired here (`fsdp_problems`).
"""

from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from pathlib import Path
from types import MethodType

import torch
import torch.distributed as dist

from kvdistill.config import RunConfig

__all__ = ["Sharded", "fsdp_problems", "sharded_run", "student_blocks", "unsharded"]

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"  # the names Accelerate's save_state gives the first model and optimizer
OPTIMIZER_FILE = "optimizer.bin"


def fsdp_problems(cfg: RunConfig) -> list[str]:
    """What train.distributed fsdp cannot run in `cfg`, each naming the keys and the fix (validate and
    train)."""
    if cfg.train.distributed != "fsdp":
        return []
    out = []
    fix = "set train.distributed=ddp"
    if cfg.train.mixed_precision == "fp16":
        out.append(
            "train.distributed fsdp with train.mixed_precision fp16: a loss scaler over sharded gradients "
            "is "
            f"not wired; use train.mixed_precision=bf16 (or no), or {fix}"
        )
    if cfg.student.latent is not None:
        out.append(
            f"train.distributed fsdp with student.latent: the latent student (its backbone and head) is not "
            f"sharded; {fix}"
        )
    if cfg.student.upcycle is not None:
        out.append(
            "train.distributed fsdp with student.upcycle (an MoE student): its expert blocks are not "
            "sharded "
            f"here; {fix}"
        )
    if cfg.train.early_stopping is not None:
        out.append(
            "train.distributed fsdp with train.early_stopping: the best student is saved by process 0 "
            "alone, "
            f"which a sharded student cannot; drop train.early_stopping or {fix}"
        )
    if getattr(cfg.train, "on_policy", None) is not None:
        out.append(
            f"train.distributed fsdp with train.on_policy: each process samples continuations of its own "
            f"length, and a sharded student's every forward is a collective of all processes; {fix}"
        )
    return out


def sharded_run(cfg: RunConfig, world: int) -> bool:
    """Whether a run of `cfg` on `world` processes shards its student: fsdp on several processes, or on one
    with cpu_offload (with nothing to offload, one process runs as without fsdp, writing the same
    checkpoints)."""
    return cfg.train.distributed == "fsdp" and (world > 1 or cfg.train.fsdp.cpu_offload)


def student_blocks(student: torch.nn.Module) -> list[torch.nn.Module]:
    """The student's repeated blocks (its transformers class's `_no_split_modules`, e.g. Qwen2DecoderLayer),
    each an FSDP2 unit of its own; found under a peft wrapper too."""
    base = student.get_base_model() if hasattr(student, "get_base_model") else student
    names = set(getattr(base, "_no_split_modules", None) or [])
    blocks = [m for m in student.modules() if type(m).__name__ in names]
    if not blocks:  # a model that does not name its blocks: the children of its longest ModuleList
        lists = [m for m in student.modules() if isinstance(m, torch.nn.ModuleList)]
        blocks = list(max(lists, key=len)) if lists else []
    return blocks


class Sharded:
    """The student of `objective` sharded over the process group (every process builds one, in the same
    order).

    Built where train.distributed is fsdp and there are several processes, or one with train.fsdp.cpu_offload
    (a student larger than one GPU holds: its shards, gradients and AdamW state in host memory;
    `sharded_run`). Use: `Sharded(objective, cfg, accelerator)` before the optimizer is built (it must see the
    sharded parameters), then `optimizer = sharded.prepare(optimizer)`; `clip` in place of clip_grad_norm_;
    `gathered()` around every save of the student; checkpoints through `accelerator.save_state/load_state`
    (the hooks registered here)."""

    def __init__(self, objective: torch.nn.Module, cfg: RunConfig, accelerator):
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

        self.objective, self.cfg, self.accelerator = objective, cfg, accelerator
        self.world = accelerator.num_processes
        if not dist.is_initialized():  # one process (cpu_offload on one GPU): a process group of one
            backend = "nccl" if accelerator.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        student = objective.student
        # names of tied parameters after the first (an LM head tied to the embedding): a checkpoint stores
        # one, as an unsharded run's does (the gathered state holds them as separate copies)
        first: dict[int, str] = {}
        self._tied = {
            n
            for n, p in objective.named_parameters(remove_duplicate=False)
            if first.setdefault(id(p), n) != n
        }
        # a meta-device twin of the unsharded student (no memory): process 0 fills it from the gathered state
        # to save
        self._template = copy.deepcopy(student).to("meta") if accelerator.is_main_process else None
        fc = cfg.train.fsdp
        kwargs = dict(
            reshard_after_forward=fc.reshard_after_forward,
            offload_policy=CPUOffloadPolicy(pin_memory=accelerator.device.type == "cuda")  # pinned: GPU only
            if fc.cpu_offload
            else OffloadPolicy(),
        )
        blocks = student_blocks(student)
        for block in blocks:
            fully_shard(block, **kwargs)
        fully_shard(student, **kwargs)  # embeddings, final norm, LM head (+ the blocks' schedule)
        n = sum(p.numel() for p in student.parameters())
        log.info(
            "fsdp: student sharded over %d processes (%d blocks + the rest; %.1fM parameters)",
            self.world,
            len(blocks),
            n / 1e6,
        )
        self.replicated = [
            p for n_, p in objective.named_parameters() if p.requires_grad and not n_.startswith("student.")
        ]
        self.optimizer = None
        self._pending: tuple[dict, dict] | None = (
            None  # the state gathered by `gathered`, for a save within it
        )
        accelerator.register_save_state_pre_hook(self._save_hook)
        accelerator.register_load_state_pre_hook(self._load_hook)

    # ------------------------------------------------------------------------------------------ step
    def prepare(self, optimizer):
        """The optimizer, wrapped so that it steps only at the end of an accumulation (as Accelerate's own);
        not registered with the accelerator (its state is saved by the hooks here, unsharded). The objective's
        forward runs under the run's autocast, as `accelerator.prepare` would set it."""
        from accelerate.optimizer import AcceleratedOptimizer
        from accelerate.utils import convert_outputs_to_fp32, get_mixed_precision_context_manager

        self.optimizer = optimizer
        acc = self.accelerator
        if acc.native_amp:
            obj = self.objective
            forward = get_mixed_precision_context_manager(acc.native_amp, acc.autocast_handler)(
                obj.forward.__func__
            )
            obj.forward = MethodType(convert_outputs_to_fp32(forward), obj)
        return AcceleratedOptimizer(optimizer, device_placement=False, scaler=None)

    def clip(self, max_norm: float) -> float:
        """Average the replicated parameters' gradients over the processes (a parameter that got no gradient
        on a process counts as zero there, as under DDP), then clip every gradient to `max_norm` by the total
        L2 norm (the sharded gradients' squares summed over processes); the norm before clipping."""
        from torch.distributed.tensor import DTensor

        dev = self.accelerator.device
        if self.replicated:
            had = torch.tensor([float(p.grad is not None) for p in self.replicated], device=dev)
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.replicated]
            flat = torch.cat([g.reshape(-1).float() for g in grads])
            dist.all_reduce(flat)
            dist.all_reduce(had)
            flat /= self.world
            offset = 0
            for p, g, h in zip(self.replicated, grads, had.tolist(), strict=True):
                n = g.numel()
                p.grad = flat[offset : offset + n].view_as(p).to(p.dtype) if h > 0 else None
                offset += n
        sharded, replicated = torch.zeros((), device=dev), torch.zeros((), device=dev)
        grads = [p.grad for p in self.objective.parameters() if p.grad is not None]
        for g in grads:
            if isinstance(g, DTensor):
                sharded += g.to_local().float().pow(2).sum().to(dev)
            else:
                replicated += g.float().pow(2).sum()
        dist.all_reduce(sharded)
        norm = float((sharded + replicated).sqrt())
        coef = max_norm / (norm + 1e-6)
        if coef < 1:
            for g in grads:
                (g.to_local() if isinstance(g, DTensor) else g).mul_(coef)
        return norm

    # ------------------------------------------------------------------------------------------ saving
    def full_state(self) -> tuple[dict, dict]:
        """(the objective's full state dict, the optimizer's, keyed as `optimizer.state_dict()` keys them) on
        process 0, on the CPU; ({}, {}) on the others. Every process calls it (the shards are gathered)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd, optim_sd = get_state_dict(self.objective, self.optimizer, options=opts)
        if not self.accelerator.is_main_process:
            return {}, {}
        return model_sd, self._by_index(optim_sd)

    def _names(self) -> list[str]:
        """The optimizer's parameters by name, in its own order (param_groups, then within each)."""
        name_of = {id(p): n for n, p in self.objective.named_parameters()}
        return [name_of[id(p)] for g in self.optimizer.param_groups for p in g["params"]]

    def _by_index(self, optim_sd: dict) -> dict:
        """A state keyed by parameter name (torch.distributed.checkpoint) -> by index
        (`Optimizer.state_dict`)."""
        index = {n: i for i, n in enumerate(self._names())}
        groups = [{**g, "params": [index[n] for n in g["params"]]} for g in optim_sd["param_groups"]]
        return {"state": {index[n]: s for n, s in optim_sd["state"].items()}, "param_groups": groups}

    def _by_name(self, optim_sd: dict) -> dict:
        names = self._names()
        groups = [{**g, "params": [names[i] for i in g["params"]]} for g in optim_sd["param_groups"]]
        return {"state": {names[int(i)]: s for i, s in optim_sd["state"].items()}, "param_groups": groups}

    @contextmanager
    def gathered(self):
        """Within: process 0's `objective.student` is an unsharded CPU copy of the student (the full state
        gathered from every process), so `save_student` writes a `from_pretrained` model, and a checkpoint
        saved within writes that same gathered state; the others wait. Every process enters."""
        self._pending = self.full_state()
        try:
            if not self.accelerator.is_main_process:
                yield
                return
            prefix = "student."
            student_sd = {k[len(prefix) :]: v for k, v in self._pending[0].items() if k.startswith(prefix)}
            sharded = self.objective.student
            plain = copy.deepcopy(self._template).to_empty(device="cpu")
            base = plain.get_base_model() if hasattr(plain, "get_base_model") else plain
            if hasattr(base, "tie_weights"):  # moving to meta and back unties tied embeddings
                base.tie_weights()
            plain.load_state_dict(student_sd, strict=True)
            self.objective.student = plain
            try:
                yield
            finally:
                self.objective.student = sharded
        finally:
            self._pending = None

    def _save_hook(self, models: list, weights: list, output_dir: str) -> None:
        """Accelerate's save_state (every process): the full objective and optimizer state into output_dir on
        process 0, under the names a run without sharding writes (so any run resumes from it)."""
        from accelerate.utils import save

        model_sd, optim_sd = self._pending or self.full_state()
        model_sd = {k: v for k, v in model_sd.items() if k not in self._tied}
        if self.accelerator.is_main_process:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            save(model_sd, Path(output_dir) / MODEL_FILE, safe_serialization=True)
            torch.save(optim_sd, Path(output_dir) / OPTIMIZER_FILE)

    def _load_hook(self, models: list, input_dir: str) -> None:
        """Accelerate's load_state (every process): the full state of a checkpoint written by any run (ddp or
        fsdp, any number of processes), sharded onto this process."""
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        from kvdistill.train.checkpoint import student_weights

        model_sd = load_file(str(Path(input_dir) / MODEL_FILE))
        # a ddp checkpoint holds the student once, in student/
        # (kvdistill.train.checkpoint.split_student_state)
        model_sd = {**student_weights(self.objective, Path(input_dir).parent, set(model_sd)), **model_sd}
        optim_sd = torch.load(Path(input_dir) / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        opts = StateDictOptions(full_state_dict=True, strict=False)
        set_state_dict(
            self.objective,
            self.optimizer,
            model_state_dict=model_sd,
            optim_state_dict=self._by_name(optim_sd),
            options=opts,
        )


def unsharded(sharded: Sharded | None):
    """`sharded.gathered()`; nothing to do without sharding."""
    from contextlib import nullcontext

    return nullcontext() if sharded is None else sharded.gathered()
