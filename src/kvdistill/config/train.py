"""The `train` section of a run configuration: steps, optimizer, evaluation, early stopping, data loading,
devices."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from kvdistill.config.section import Section


class EarlyStoppingConfig(Section):
    """Best-of-curve selection on the validation split (data.val_size > 0, never the test split): at every
    evaluation (train.eval_every) the student is saved to DIR/best/student when `metric` improved by more than
    `min_delta` (DIR/best.json: its step and value); after `patience` evaluations without improvement training
    stops (0: it runs every step and only keeps the best). The learning-rate schedule stays that of
    train.steps."""

    metric: Literal["exact_match", "ce"] = "ce"
    """Validation exact match (needs train.eval_exact_match) or CE."""
    patience: int = Field(0, ge=0)
    min_delta: float = Field(0.0, ge=0.0)


class OnPolicyConfig(Section):
    """On-policy distillation as GKD defines it (kvdistill.objectives.on_policy): with probability λ an
    optimizer step's batches are the student's own samples, continuing each record's prompt (its text up to
    the end of the {question} line), and the K/V and logit terms score the teachers on that text; CE stays on
    the data text."""

    model_config = ConfigDict(populate_by_name=True)

    lam: float = Field(0.5, ge=0.0, le=1.0, alias="lambda")
    """λ: the probability that a step is on-policy (drawn per optimizer step, GKD's per batch); 0: never, 1:
    always."""
    temperature: float = Field(1.0, gt=0.0)
    """Sampling temperature of the student's continuations."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling (1: the whole distribution)."""
    max_new_tokens: int = Field(64, gt=0)
    """Tokens the student may add to each prompt (it stops earlier at the end of its answer line, or at its
    end-of-sequence token)."""


class FsdpConfig(Section):
    """train.distributed fsdp: how the student is sharded (`kvdistill.train.distributed`)."""

    cpu_offload: bool = False
    """Keep the sharded parameters, gradients and optimizer state in host memory; each layer's parameters come
    to the device for its forward and backward only (torch's CPUOffloadPolicy)."""
    reshard_after_forward: bool = True
    """Free each layer's gathered parameters after its forward (gathered again for the backward): less memory,
    one more all-gather per layer."""


class TrainConfig(Section):
    steps: int = Field(100, gt=0)
    batch_size: int = Field(4, gt=0)
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(3e-4, gt=0.0, le=10.0)
    """AdamW moves every weight by about lr per step: above 10 no value is a learning rate (and from about
    3e37 the update overflows float32)."""
    projector_lr: float | None = Field(None, gt=0.0, le=10.0)
    """The maps' (projectors, routers) lr; None: train.lr."""
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    seed: int = Field(0, ge=0, le=2**32 - 1)
    """Seeds torch, numpy and Python's random (numpy takes 0 .. 2**32 - 1)."""
    log_every: int = Field(1, gt=0)
    save_every: int = Field(0, ge=0)
    """Checkpoint every N optimizer steps (0: only at the end)."""
    save_total_limit: int | None = Field(None, gt=0)
    """Keep the newest N checkpoints and the best one by held-out CE (recorded where an evaluation, every
    train.eval_every steps, falls on a save step); older ones are deleted once a newer one is complete.
    None: keep every checkpoint."""
    eval_every: int = Field(0, ge=0)
    """Evaluate on the held-out records every N optimizer steps (0: only at the end); printed and logged."""
    eval_exact_match: bool = False
    """Every evaluation also scores greedy exact match on the held-out records (`eval/exact_match`); a latent
    student (student.latent) answers in latent mode (kvdistill.student.answer.latent_exact_match, also
    `eval/gen_tokens`)."""
    eval_cot: bool = False
    """That exact match of a text student by CoT decoding from the question alone
    (kvdistill.student.answer.cot_exact_match), instead of giving the model the record's reasoning."""
    eval_max_new_tokens: int = Field(16, gt=0)
    """Generated tokens per answer of that exact match (with eval_cot: reasoning and answer; a latent student:
    after the answer prompt)."""
    early_stopping: EarlyStoppingConfig | None = None
    grad_norms_every: int = Field(0, ge=0)
    """Every N optimizer steps, the gradient norm of each weighted loss term w.r.t. the student's parameters,
    before clipping: a text student's CE and distillation terms (`grad_norm/ce`, `grad_norm/kd`), a latent
    student's answer CE, CoT CE, CODI and L_KV (`grad_norm/ce`, `grad_norm/cot_ce`, `grad_norm/codi`,
    `grad_norm/latent_kv`); one extra backward pass a term of the first micro-batch; one process."""
    tensorboard: bool = True
    """Log to TensorBoard (DIR/tb) when train.report_to is not given; false: no tracker."""
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] | None = None
    """Trackers, through Accelerate (None: [tensorboard], or [] with train.tensorboard false). tensorboard:
    DIR/tb; wandb: offline under DIR/wandb unless WANDB_MODE is set (`wandb sync` uploads it); mlflow:
    DIR/mlruns unless MLFLOW_TRACKING_URI is set; trackio: its local store. Per-teacher terms go under
    teacher/<name>/."""
    num_workers: int = Field(0, ge=0)
    """DataLoader worker processes that collate batches (tokenization, token alignment) ahead of the step; 0:
    in the training process, just before each step."""
    prefetch: int | None = Field(None, gt=0)
    """Batches each worker collates ahead (the DataLoader's prefetch_factor); None: its default (2). Needs
    num_workers > 0."""
    teachers_ahead: bool | None = None
    """Run the teachers' K/V of the next micro-batch on a worker thread (its own CUDA stream) while the
    student steps on this one (`kvdistill.objectives.ahead`): the same numbers, the teachers off the critical
    path. None: on where the run has a GPU and teachers; true on a CPU works too (the two threads share the
    cores)."""
    distributed: Literal["ddp", "fsdp"] = "ddp"
    """Several processes: ddp replicates the student, its gradients and optimizer state on every process; fsdp
    shards the student's parameters, gradients and optimizer state over them (FSDP2,
    `kvdistill.train.distributed`). Teachers and maps are replicated either way."""
    fsdp: FsdpConfig = FsdpConfig()
    compile: bool = False
    """torch.compile the loss space's per-group K/V error (the loss part, not the models); where compilation
    fails the eager function runs instead (logged once)."""
    on_policy: OnPolicyConfig | None = None
    """On-policy distillation (GKD): {lambda, temperature, top_p, max_new_tokens}; None: the data text
    only."""

    presence_fields = frozenset({"tensorboard"})  # set or not: whether it contradicts train.report_to

    @property
    def trackers(self) -> list[str]:
        """The trackers a run logs to (train.report_to, else tensorboard if train.tensorboard)."""
        if self.report_to is not None:
            return list(dict.fromkeys(self.report_to))
        return ["tensorboard"] if self.tensorboard else []

    @model_validator(mode="after")
    def _trackers_agree(self):
        if (
            self.report_to is not None
            and "tensorboard" in self.model_fields_set
            and self.tensorboard != ("tensorboard" in self.report_to)
        ):
            raise ValueError(
                f"train.tensorboard is {str(self.tensorboard).lower()} but train.report_to is "
                f"{self.report_to}; drop train.tensorboard (train.report_to lists every tracker)"
            )
        return self

    @model_validator(mode="after")
    def _prefetch_needs_workers(self):
        if self.prefetch is not None and self.num_workers == 0:
            raise ValueError(
                f"train.prefetch ({self.prefetch}) collates ahead on worker processes, but "
                "train.num_workers is 0; set train.num_workers >= 1 or drop train.prefetch"
            )
        return self
