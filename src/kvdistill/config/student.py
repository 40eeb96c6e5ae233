"""The `student` section of a run configuration: the model trained, LoRA, sparse upcycling, the
latent-reasoning student's slots."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from kvdistill.config.section import Section


class LoraConfig(Section):
    r: int = Field(8, gt=0)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | str = "all-linear"


class UpcycleConfig(Section):
    """Sparse upcycling: the dense student (student.model or from_config) becomes an MoE of its family's MoE
    counterpart (llama / mistral -> mixtral, qwen3 -> qwen3_moe), every expert a copy of the dense MLP, the
    router newly initialised (kvdistill.student.upcycle)."""

    num_experts: int = Field(4, gt=1)
    top_k: int = Field(2, gt=0)

    @model_validator(mode="after")
    def _k(self):
        if self.top_k > self.num_experts:
            raise ValueError(
                f"student.upcycle.top_k ({self.top_k}) must be <= num_experts ({self.num_experts})"
            )
        return self


class LatentStudentConfig(Section):
    """The student reasons in M continuous latent tokens between question and answer (KaVa / PCCoT;
    kvdistill.student.latent): read by the latent objective (kvdistill.objectives.kava)."""

    tokens: int = Field(24, ge=0)
    """M latent slots; 0 answers right after the question (the no-CoT reference)."""
    iterations: int = Field(3, ge=0)
    """T Jacobi passes that refine the latents in parallel."""
    projection: Literal["mlp", "linear", "none"] = "mlp"
    """hidden state -> next latent input: mlp (residual, starts as the identity), linear, none (Coconut)."""
    head: Literal["embed_norm", "identity"] = "embed_norm"
    """After the projection: embed_norm RMS-normalises it with a learned gain that starts at the token
    embeddings' RMS (latents at a token embedding's scale from the start, as CODI's projection ends in a
    LayerNorm); identity feeds the projected hidden state as it is (18-50x a token embedding's norm)."""


class StudentConfig(Section):
    model: str | None = None
    """Offline name, local directory or hub id of a pretrained causal LM."""
    from_config: dict[str, Any] | None = None
    """Build a randomly initialised student: {base: <model whose config to start from>, <config overrides>},
    or {family: <a transformers model_type, e.g. qwen2>, <config fields>} (then `tokenizer` is required)."""
    tokenizer: str | None = None
    """Tokenizer to use (default: the model's, or the base model's for from_config)."""
    lora: LoraConfig | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    gradient_checkpointing: bool = False
    latent: LatentStudentConfig | None = None
    """A latent-reasoning student (kvdistill.objectives.kava) instead of a text student."""
    upcycle: UpcycleConfig | None = None
    """Turn the dense model above into an MoE whose experts start from its MLP."""

    @model_validator(mode="after")
    def _one_source(self):
        if (self.model is None) == (self.from_config is None):
            raise ValueError("give exactly one of student.model or student.from_config")
        if self.from_config is not None and ("base" in self.from_config) == ("family" in self.from_config):
            raise ValueError(
                "student.from_config needs exactly one of 'base' (a model whose config it starts from) "
                "or 'family' (a transformers model_type)"
            )
        if self.from_config is not None and "family" in self.from_config and not self.tokenizer:
            raise ValueError("student.from_config with 'family' needs student.tokenizer")
        return self
