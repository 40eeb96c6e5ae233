"""The `teachers` section of a run configuration: each teacher's model or cache, layer map, projector,
compression and cached logits."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from kvdistill.config.losses import LogitKDConfig
from kvdistill.config.section import Section
from kvdistill.paths import segment_problem


class LayerMapConfig(Section):
    strategy: Literal["ratio", "uniform", "skip", "explicit"] = "ratio"
    explicit: list[int | list[int]] | None = None
    """One entry per student layer: a teacher layer, a list of them (averaged), or -1 (unsupervised)."""
    interpolate: bool = True


class CompressionConfig(Section):
    """KaVa-style compression of a teacher's K/V (online, or what `kvdistill extract` stores)."""

    kind: Literal["full", "right_crop", "rkv"] = "full"
    budget: int | None = Field(None, gt=0)
    """M: tokens kept per layer and head (right_crop, rkv)."""
    lam: float | None = Field(None, ge=0.0, le=1.0)
    """R-KV score's weight of importance; None: the scoring's default (0.1; scoring rkv 0.07)."""
    layers: list[int] | None = None
    """Teacher layers kept (None: all)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """Storage dtype in a cache."""
    span: Literal["all", "cot"] = "all"
    """Candidate tokens: every real token, or only the record's chain of thought (a latent student's cached
    K/V target: right_crop / rkv of the CoT, kvdistill.compress.latent)."""
    scoring: Literal["minmax", "kava", "rkv"] = "minmax"
    """rkv's score: minmax λ·minmax(I) + (1-λ)·(1 - minmax(r)); kava λ·I + (1-λ)·softmax(-r); rkv R-KV's
    reference scoring, the last `window` candidates kept and their attention the importance
    (kvdistill.compress.latent)."""
    window: int = Field(8, gt=0)

    @model_validator(mode="after")
    def _budget(self):
        if self.kind == "full" and self.budget is not None:
            raise ValueError(
                "compression.budget is only for kind right_crop / rkv; kind 'full' keeps every token"
            )
        if self.kind != "full" and self.budget is None:
            raise ValueError(
                f"compression.kind '{self.kind}' needs compression.budget (tokens kept, e.g. 128)"
            )
        if self.span == "cot" and self.kind == "full":
            raise ValueError("compression.span 'cot' keeps `budget` CoT tokens: use kind right_crop or rkv")
        if self.scoring != "minmax" and self.kind != "rkv":
            raise ValueError(f"compression.scoring is read by kind rkv only (kind is {self.kind}); drop it")
        if self.window != 8 and self.scoring != "rkv":
            raise ValueError(
                f"compression.window is read by scoring rkv only (scoring is {self.scoring}); drop it"
            )
        if self.scoring == "rkv" and self.budget is not None and self.budget <= self.window:
            raise ValueError(
                f"compression.budget ({self.budget}) must exceed compression.window ({self.window}): R-KV "
                "keeps its window and scores the rest"
            )
        if self.lam is None:
            from kvdistill.compress.select import default_lam

            self.lam = default_lam(self.scoring, None)
        return self

    def build(self):
        from kvdistill.compress import Compression

        return Compression(
            kind=self.kind,
            budget=self.budget,
            lam=self.lam,
            layers=self.layers,
            dtype=self.dtype,
            span=self.span,
            scoring=self.scoring,
            window=self.window,
        )


class CachedLogitsConfig(Section):
    """What a teacher's cache holds of its next-token distributions (kvdistill.teachers.logits): written by
    `kvdistill extract` beside the K/V, read by logit KD from a cached teacher."""

    top_k: int | None = Field(None, gt=0)
    """k: log-probabilities kept per token, the most probable first (at most the vocabulary); None:
    losses.logit_kd's top_k. A cache of k serves a loss of any top_k up to k (the first entries are the top of
    a smaller k)."""
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    """Storage dtype of the log-probabilities (token ids: uint16 for vocabularies up to 65,536, else
    int32)."""
    temperatures: list[float] | None = None
    """The τ at which the log-probabilities are normalised (logit KD can read the cache at exactly these).
    None: those of losses.logit_kd (its temperature, or a step schedule's values)."""

    @model_validator(mode="after")
    def _positive(self):
        if self.temperatures is not None and (
            not self.temperatures or any(not t > 0 for t in self.temperatures)
        ):
            raise ValueError(f"logits.temperatures {self.temperatures} must be one or more temperatures > 0")
        return self

    def resolved(self, logit_kd: LogitKDConfig | None = None) -> list[float] | None:
        """The stored temperatures: `temperatures`, else those losses.logit_kd uses (None for a linear
        schedule, whose τ is continuous)."""
        if self.temperatures is not None:
            return sorted(set(self.temperatures))
        return (logit_kd or LogitKDConfig()).temperatures_used()


class TeacherConfig(Section):
    name: str | None = None
    """Short label used in logs and reports (default: the model name, '.' replaced by '_'); no '.' allowed."""
    model: str | None = None
    from_config: dict[str, Any] | None = None
    """Instead of `model`: a randomly initialised teacher (seed 0) built as `student.from_config` is ({family:
    ..., <fields>} needs `tokenizer`); for CPU demonstrations of the machinery, not for evidence."""
    tokenizer: str | None = None
    """from_config teachers: their tokenizer (default: the base model's)."""
    source: Literal["online", "cache"] = "online"
    cache_dir: str | None = None
    weight: float = Field(1.0, ge=0.0)
    layer_map: LayerMapConfig = LayerMapConfig()
    projector: Literal["auto", "identity", "per_head", "linear"] = "auto"
    compression: CompressionConfig = CompressionConfig()
    """Online teachers: compress K/V on the fly. Cached teachers: must equal what the cache was built with."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """auto: float32 on CPU, bfloat16 on GPU."""
    skill: str | None = None
    """The skill of `data.skills` this teacher specialises in: with fusion.kind router, similarity or
    confidence, the held-out evaluation reports the fusion weight on it for records of that skill
    (eval/routing_acc, eval/routing_acc_<skill>; `kvdistill.fuse.routing_accuracy`)."""
    logits: CachedLogitsConfig | None = None
    """Cached teachers: the top-k log-probabilities the cache holds (what `kvdistill extract` stores and logit
    KD from the cache reads); None: K/V only."""

    @model_validator(mode="after")
    def _cache_dir(self):
        if self.source == "cache" and not self.cache_dir:
            raise ValueError("source 'cache' needs cache_dir (a directory written by `kvdistill extract`)")
        if (self.model is None) == (self.from_config is None):
            raise ValueError("give exactly one of the teacher's model or from_config")
        if self.from_config is not None:
            if self.source != "online":
                raise ValueError("a from_config teacher has no cache; use source: online")
            if ("base" in self.from_config) == ("family" in self.from_config):
                raise ValueError("teacher from_config needs exactly one of 'base' or 'family'")
            if "family" in self.from_config and not self.tokenizer:
                raise ValueError("teacher from_config with 'family' needs tokenizer")
            if self.name is None:
                raise ValueError("a from_config teacher needs a name")
        elif self.tokenizer is not None:
            raise ValueError(
                "teacher tokenizer is only read for from_config teachers (a model brings its own); drop it"
            )
        if self.name is None:
            # Names key modules and buffers, where torch forbids '.': Qwen/Qwen2.5-1.5B -> Qwen2_5-1_5B.
            self.name = self.model.rstrip("/").split("/")[-1].replace(".", "_")
        elif "." in self.name or not self.name:
            raise ValueError(
                f"name {self.name!r} must be non-empty without '.'; e.g. {self.name.replace('.', '_')!r}"
            )
        problem = segment_problem(self.name, "teacher name")  # it names report figures and experiment folders
        if problem:
            raise ValueError(problem + ("" if self.model is None else "; set the teacher's `name`"))
        return self


def budget_problems(compression: CompressionConfig, max_length: int, key: str) -> list[str]:
    """A compression budget above data.max_length keeps every token and pads every kept K/V to the budget:
    memory grows with the budget, not with the text (budget 100000 on 48-token texts took 20 GB)."""
    if compression.budget is None or compression.budget <= max_length:
        return []
    return [
        f"{key}.budget ({compression.budget}) is more than data.max_length ({max_length}): no text has that "
        f"many tokens, and the kept K/V would be padded to the budget; set a budget of at most {max_length} "
        "(or kind: full to keep every token)"
    ]
