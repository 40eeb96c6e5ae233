"""The typed sections of a run configuration, each validated when built (pydantic, unknown keys refused).

Every problem is collected and reported together (`ConfigError.problems`), each naming the key, the value
that is wrong and, for a typo, the nearest valid key. `kvdistill validate CONFIG` prints them all.

Layout of a config (every section optional except `student` and `data`)::

    student:   {model | from_config, tokenizer, lora, dtype, gradient_checkpointing}
    teachers:  - {name, model, source: online|cache, cache_dir, weight, layer_map, projector, dtype, skill}
    data:      {source, path, split, subset, fields, template, size | limit, seed, max_length, eval_size, val_size,
                train_size, skills, mix,
                train_skills}
    losses:    {ce, kv: {weight, kind, normalize, keys, values}, cosine, attention_kl, relation, logit_kd, hidden}
    fusion:    {kind: fixed|similarity|router|confidence, space: loss|target|latent, weights, similarity, router,
                entropy, latent, confidence}
    train:     {steps, batch_size, grad_accum, lr, ..., mixed_precision, seed, save_every, log_every}
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from kvdistill.config.losses import (  # noqa: F401 (re-exported: the losses section is part of the schema)
    CodiConfig,
    ExpertLossConfig,
    KVLossConfig,
    LatentKVConfig,
    LatentTargetConfig,
    LogitKDConfig,
    LossesConfig,
    RoutingLossConfig,
    TemperatureSchedule,
)
from kvdistill.config.section import Section
from kvdistill.paths import segment_problem


# ---------------------------------------------------------------------------------------------- student
class LoraConfig(Section):
    r: int = Field(8, gt=0)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | str = "all-linear"


class UpcycleConfig(Section):
    """Sparse upcycling: the dense student (student.model or from_config) becomes an MoE of its family's MoE
    counterpart (llama / mistral -> mixtral, qwen3 -> qwen3_moe), every expert a copy of the dense MLP, the router
    newly initialised (kvdistill.student.upcycle)."""

    num_experts: int = Field(4, gt=1)
    top_k: int = Field(2, gt=0)

    @model_validator(mode="after")
    def _k(self):
        if self.top_k > self.num_experts:
            raise ValueError(f"student.upcycle.top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
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
    """After the projection: embed_norm RMS-normalises it with a learned gain that starts at the token embeddings'
    RMS (latents at a token embedding's scale from the start, as CODI's projection ends in a LayerNorm); identity
    feeds the projected hidden state as it is (18-50x a token embedding's norm)."""


class StudentConfig(Section):
    model: str | None = None
    """Offline name, local directory or hub id of a pretrained causal LM."""
    from_config: dict[str, Any] | None = None
    """Build a randomly initialised student: {base: <model whose config to start from>, <config overrides>}, or
    {family: <a transformers model_type, e.g. qwen2>, <config fields>} (then `tokenizer` is required)."""
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
            raise ValueError("student.from_config needs exactly one of 'base' (a model whose config it starts from) "
                             "or 'family' (a transformers model_type)")
        if self.from_config is not None and "family" in self.from_config and not self.tokenizer:
            raise ValueError("student.from_config with 'family' needs student.tokenizer")
        return self


# ---------------------------------------------------------------------------------------------- teachers
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
    """Candidate tokens: every real token, or only the record's chain of thought (a latent student's cached K/V
    target: right_crop / rkv of the CoT, kvdistill.compress.latent)."""
    scoring: Literal["minmax", "kava", "rkv"] = "minmax"
    """rkv's score: minmax λ·minmax(I) + (1-λ)·(1 - minmax(r)); kava λ·I + (1-λ)·softmax(-r); rkv R-KV's reference
    scoring, the last `window` candidates kept and their attention the importance (kvdistill.compress.latent)."""
    window: int = Field(8, gt=0)

    @model_validator(mode="after")
    def _budget(self):
        if self.kind == "full" and self.budget is not None:
            raise ValueError("compression.budget is only for kind right_crop / rkv; kind 'full' keeps every token")
        if self.kind != "full" and self.budget is None:
            raise ValueError(f"compression.kind '{self.kind}' needs compression.budget (tokens kept, e.g. 128)")
        if self.span == "cot" and self.kind == "full":
            raise ValueError("compression.span 'cot' keeps `budget` CoT tokens: use kind right_crop or rkv")
        if self.scoring != "minmax" and self.kind != "rkv":
            raise ValueError(f"compression.scoring is read by kind rkv only (kind is {self.kind}); drop it")
        if self.window != 8 and self.scoring != "rkv":
            raise ValueError(f"compression.window is read by scoring rkv only (scoring is {self.scoring}); drop it")
        if self.scoring == "rkv" and self.budget is not None and self.budget <= self.window:
            raise ValueError(f"compression.budget ({self.budget}) must exceed compression.window ({self.window}): R-KV "
                             "keeps its window and scores the rest")
        if self.lam is None:
            from kvdistill.compress.select import default_lam

            self.lam = default_lam(self.scoring, None)
        return self

    def build(self):
        from kvdistill.compress import Compression

        return Compression(kind=self.kind, budget=self.budget, lam=self.lam, layers=self.layers, dtype=self.dtype,
                           span=self.span, scoring=self.scoring, window=self.window)


class CachedLogitsConfig(Section):
    """What a teacher's cache holds of its next-token distributions (kvdistill.teachers.logits): written by
    `kvdistill extract` beside the K/V, read by logit KD from a cached teacher."""

    top_k: int | None = Field(None, gt=0)
    """k: log-probabilities kept per token, the most probable first (at most the vocabulary); None: losses.logit_kd's
    top_k. A cache of k serves a loss of any top_k up to k (the first entries are the top of a smaller k)."""
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    """Storage dtype of the log-probabilities (token ids: uint16 for vocabularies up to 65,536, else int32)."""
    temperatures: list[float] | None = None
    """The τ at which the log-probabilities are normalised (logit KD can read the cache at exactly these). None: those
    of losses.logit_kd (its temperature, or a step schedule's values)."""

    @model_validator(mode="after")
    def _positive(self):
        if self.temperatures is not None and (not self.temperatures or any(not t > 0 for t in self.temperatures)):
            raise ValueError(f"logits.temperatures {self.temperatures} must be one or more temperatures > 0")
        return self

    def resolved(self, logit_kd: LogitKDConfig | None = None) -> list[float] | None:
        """The stored temperatures: `temperatures`, else those losses.logit_kd uses (None for a linear schedule,
        whose τ is continuous)."""
        if self.temperatures is not None:
            return sorted(set(self.temperatures))
        return (logit_kd or LogitKDConfig()).temperatures_used()


class TeacherConfig(Section):
    name: str | None = None
    """Short label used in logs and reports (default: the model name, '.' replaced by '_'); no '.' allowed."""
    model: str | None = None
    from_config: dict[str, Any] | None = None
    """Instead of `model`: a randomly initialised teacher (seed 0) built as `student.from_config` is ({family: ...,
    <fields>} needs `tokenizer`); for CPU demonstrations of the machinery, not for evidence."""
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
    """The skill of `data.skills` this teacher specialises in: with fusion.kind router, similarity or confidence, the
    held-out evaluation reports the fusion weight on it for records of that skill (eval/routing_acc,
    eval/routing_acc_<skill>; `kvdistill.fuse.routing_accuracy`)."""
    logits: CachedLogitsConfig | None = None
    """Cached teachers: the top-k log-probabilities the cache holds (what `kvdistill extract` stores and logit KD
    from the cache reads); None: K/V only."""

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
            raise ValueError("teacher tokenizer is only read for from_config teachers (a model brings its own); "
                             "drop it")
        if self.name is None:
            # Names key modules and buffers, where torch forbids '.': Qwen/Qwen2.5-1.5B -> Qwen2_5-1_5B.
            self.name = self.model.rstrip("/").split("/")[-1].replace(".", "_")
        elif "." in self.name or not self.name:
            raise ValueError(f"name {self.name!r} must be non-empty without '.'; e.g. {self.name.replace('.', '_')!r}")
        problem = segment_problem(self.name, "teacher name")  # it names report figures and experiment folders
        if problem:
            raise ValueError(problem + ("" if self.model is None else "; set the teacher's `name`"))
        return self


# ---------------------------------------------------------------------------------------------- data
GENERATED = ("gsm_symbolic", "arithmetic", "sorting", "skills")  # data sources generated from data.size and seed


class DataConfig(Section):
    """Where the records come from and how they split (kvdistill.data.records).

    `source`: a file format read from `path` (jsonl, csv, parquet, text); `hf`, a Hugging Face dataset read through
    the `datasets` library (`path`: a hub id, a directory written by `save_to_disk`, or a folder of data files; in
    the Python API also an in-memory `datasets.Dataset` passed to `train(..., dataset=)`); or a generator needing no
    path: `gsm_symbolic` (GSM-Symbolic word problems, reasoning_gym), `arithmetic` (2-4 step integer arithmetic
    with a worked solution, from `seed` alone), `sorting` (digit sorting), or `skills` (a mixture of those, each
    record labelled with its skill). Every record of a file or dataset is used unless `limit` caps them; `size` is
    the number of generated problems. The first `eval_size` records are held out (the test split), the next `val_size`
    are the validation split (training's held-out curves, early stopping); train records whose question also occurs
    in either are dropped (logged with the count); `train_size` caps the train split (the first ones, after
    `train_skills`).
    """

    # set or not: text / template / chat mode of a file, a split asked of a one-split dataset, a source next to an
    # in-memory dataset (kvdistill.data.records)
    presence_fields = frozenset({"text_field", "question_field", "cot_field", "messages_field", "split", "source"})

    source: Literal["jsonl", "csv", "parquet", "text", "hf", "gsm_symbolic", "arithmetic", "sorting", "skills"] = (
        "gsm_symbolic")
    path: str | None = None
    split: str = "train"
    """source hf: the dataset's split to read (a hub dataset or a saved DatasetDict)."""
    subset: str | None = None
    """source hf: the hub dataset's configuration name (load_dataset's `name`)."""
    text_field: str = "text"
    question_field: str = "question"
    cot_field: str | None = "cot"
    answer_field: str = "answer"
    messages_field: str = "messages"
    """Chat records: a list of {role, content} rendered with each model's own chat template (kvdistill.models.chat);
    the last assistant message is the answer."""
    template: str = "Question: {question}\nReasoning: {cot}\nAnswer: {answer}\n"
    """How (question, cot, answer) records become one training text; plain `text_field` records ignore it. The final
    line break ends the answer, so greedy decoding learns where an answer stops (exact match reads its first line)."""
    size: int | None = Field(None, gt=0)
    """Number of generated problems (gsm_symbolic, arithmetic; None: 256). Files and datasets: not read (limit)."""
    limit: int | None = Field(None, gt=0)
    """Files and datasets: use only this many records (drawn after shuffling with `seed`); None: all of them."""
    eval_size: int = Field(32, ge=0)
    val_size: int = Field(0, ge=0)
    """Validation records after the eval (test) split: with val_size > 0, training's held-out figures (eval_every,
    train.early_stopping, summary.json) come from them and the test split is left to the final scoring."""
    train_size: int | None = Field(None, gt=0)
    """Cap on the train split (its first records): a small labelled set drawn from a large pool whose held-out
    splits stay the same whatever the cap (generated sources are prefix-stable)."""
    seed: int = 0
    max_length: int = Field(256, gt=1)
    skills: list[Literal["arithmetic", "gsm_symbolic", "sorting"]] = []
    """`source: skills`: the generated skills mixed (each record labelled with its `skill`)."""
    mix: list[float] | None = None
    """`source: skills`: one positive proportion per skill (default equal)."""
    train_skills: list[str] | None = None
    """`source: skills`: keep only the train records of these skills (a specialist teacher); eval is the whole mix."""

    @model_validator(mode="after")
    def _path(self):
        generated = self.source in GENERATED
        problems = []
        if not generated and self.source != "hf" and not self.path:
            problems.append(f"data.source '{self.source}' needs data.path")
        if generated and self.size is None:
            self.size = 256
        if not generated and self.size is not None:
            problems.append(f"data.size ({self.size}) is the number of generated problems, but data.source "
                            f"'{self.source}' reads records: every record is used; drop data.size, or cap them with "
                            f"data.limit: {self.size}")
        if generated and self.limit is not None:
            problems.append(f"data.limit caps the records of a file or dataset; data.source '{self.source}' "
                            f"generates data.size problems: set data.size: {self.limit} instead")
        unread = [k for k in ("split", "subset") if k in self.model_fields_set and self.source != "hf"
                  and getattr(self, k) != type(self).model_fields[k].default]
        problems += [f"data.{k} is read by data.source hf only (source is '{self.source}'); drop it" for k in unread]
        if generated and self.path:
            problems.append(f"data.path is not read by the generator '{self.source}'; drop it")
        if self.source == "skills":
            if not self.skills or len(set(self.skills)) != len(self.skills):
                problems.append(f"data.skills {self.skills}: source 'skills' needs distinct skills "
                                "(some of arithmetic, gsm_symbolic, sorting)")
            if self.mix is not None and (len(self.mix) != len(self.skills) or any(not w > 0 for w in self.mix)):
                problems.append(f"data.mix {self.mix} must give one positive proportion per skill {self.skills}")
            unknown = [s for s in self.train_skills or [] if s not in self.skills]
            if unknown or self.train_skills == []:
                problems.append(f"data.train_skills {self.train_skills} must be some of data.skills {self.skills}")
        else:
            given = [k for k in ("skills", "mix", "train_skills") if getattr(self, k)]
            if given:
                problems.append(f"data.{', data.'.join(given)} apply only to data.source 'skills' "
                                f"(source is '{self.source}'): set data.source: skills or remove them")
        if problems:
            raise ValueError("; ".join(problems))
        return self


# ---------------------------------------------------------------------------------------------- fusion
class SimilarityConfig(Section):
    prototype: Literal["mean", "first", "max", "kmeans"] = "mean"
    metric: Literal["cosine", "dot", "l2"] = "cosine"
    temperature: float = Field(1.0, gt=0.0)
    kmeans_k: int = Field(4, gt=0)


class RouterConfig(Section):
    kind: Literal["mlp", "gate", "attention"] = "mlp"
    per_token: bool = False
    target: Literal["kv_loss", "confidence"] = "kv_loss"
    """What trains the router. kv_loss: the weighted loss Σ_n w_n·KV_loss_n itself (its minimum puts all weight on
    the teacher easiest to match, whatever the sample); confidence: KL(confidence weights || router weights), the
    confidence weights of `fusion.confidence` from the teachers' own logits, while the K/V loss uses the router's
    weights without passing gradient into it (a router that routes where teacher logits are absent)."""
    target_weight: float = Field(1.0, gt=0.0)
    """target confidence: the weight of the router's KL term in the loss."""


class ConfidenceConfig(Section):
    temperature: float = Field(0.1, gt=0.0)
    """τ of w_n = softmax_n(-NLL_n / τ), NLL_n teacher n's own NLL of the sample's scored text in nats per UTF-8
    byte (`kvdistill.fuse.confidence`): a gap of τ nats per byte between two teachers is a factor e in weight."""
    span: Literal["continuation", "text"] = "continuation"
    """The text scored: continuation, what follows the question line of a template-mode record (the labelled
    reasoning and answer); text, the whole text (records without a question: chat, plain text)."""


class EntropyConfig(Section):
    target: Literal["diverse", "specialized"] = "diverse"
    weight: float = Field(0.01, ge=0.0)


class LatentConfig(Section):
    dim: int = Field(64, gt=0)
    """d_z: width of the shared latent space Z."""
    fit_samples: int = Field(32, gt=1)
    """Training records (the first ones, the same on every process) that the frozen maps into Z are fitted on."""


class FusionConfig(Section):
    kind: Literal["fixed", "similarity", "router", "confidence"] = "fixed"
    """fixed weights; similarity of the student's side to teacher prototypes; a learned router on the student's
    hidden states; confidence: each teacher's own NLL per byte of the sample (`fusion.confidence`), no learning."""
    space: Literal["loss", "target", "latent"] = "loss"
    """loss: Σ_i w_i·KV_loss_i with maps from the student into each teacher's geometry (default, collapse-safe);
    target: one fused target Σ_i w_i·A_i(KV_i) with frozen teacher→student maps A_i;
    latent: every teacher's K/V in one shared space Z (frozen whitened PCA + Procrustes rotation onto a reference
    teacher), one learnable student head into Z; works for encoder teachers too."""
    latent: LatentConfig = LatentConfig()
    weights: list[float] | None = None
    """Fixed weights, one per teacher (default: each teacher's `weight`, normalised)."""
    similarity: SimilarityConfig = SimilarityConfig()
    router: RouterConfig = RouterConfig()
    entropy: EntropyConfig = EntropyConfig()
    confidence: ConfidenceConfig = ConfidenceConfig()

    @property
    def scores_teachers(self) -> bool:
        """Whether the teachers' pass scores each sample with the teachers' own logits (the confidence weights)."""
        return self.kind == "confidence" or (self.kind == "router" and self.router.target == "confidence")

    @model_validator(mode="after")
    def _used_sections(self):
        """A section changed from its defaults that the chosen kind / space never reads is refused, not ignored
        (compared by value, so a config dumped with every default reloads)."""
        defaults = FusionConfig.model_construct()
        unused = [(key, need) for key, need, used in (
            ("similarity", "kind: similarity", self.kind == "similarity"),
            ("router", "kind: router", self.kind == "router"),
            ("entropy", "kind: router", self.kind == "router"),
            ("weights", "kind: fixed", self.kind == "fixed"),
            ("latent", "space: latent", self.space == "latent"),
            ("confidence", "kind: confidence (or kind: router with router.target: confidence)", self.scores_teachers))
            if getattr(self, key) != getattr(defaults, key) and not used]
        problems = [f"fusion.{key} is changed from its default but only fusion.{need} reads it (kind {self.kind}, space {self.space}); "
                    f"drop fusion.{key} or set fusion.{need}" for key, need in unused]
        if self.kind == "router" and self.router.kind == "attention" and self.router.per_token:
            problems.append("fusion.router.per_token needs router kind 'mlp' or 'gate': the attention router pools "
                            "over tokens")
        if self.router.target == "kv_loss" and self.router.target_weight != defaults.router.target_weight:
            problems.append(f"fusion.router.target_weight ({self.router.target_weight}) weighs the router's KL toward "
                            "the confidence weights, but fusion.router.target is kv_loss: drop it or set "
                            "fusion.router.target: confidence")
        if problems:
            raise ValueError("; ".join(problems))
        return self


# ---------------------------------------------------------------------------------------------- training
class EarlyStoppingConfig(Section):
    """Best-of-curve selection on the validation split (data.val_size > 0, never the test split): at every evaluation
    (train.eval_every) the student is saved to DIR/best/student when `metric` improved by more than `min_delta`
    (DIR/best.json: its step and value); after `patience` evaluations without improvement training stops (0: it
    runs every step and only keeps the best). The learning-rate schedule stays that of train.steps."""

    metric: Literal["exact_match", "ce"] = "ce"
    """Validation exact match (needs train.eval_exact_match) or CE."""
    patience: int = Field(0, ge=0)
    min_delta: float = Field(0.0, ge=0.0)


class OnPolicyConfig(Section):
    """On-policy distillation as GKD defines it (kvdistill.objectives.on_policy): with probability λ an optimizer
    step's batches are the student's own samples, continuing each record's prompt (its text up to the end of the
    {question} line), and the K/V and logit terms score the teachers on that text; CE stays on the data text."""

    model_config = ConfigDict(populate_by_name=True)

    lam: float = Field(0.5, ge=0.0, le=1.0, alias="lambda")
    """λ: the probability that a step is on-policy (drawn per optimizer step, GKD's per batch); 0: never, 1: always."""
    temperature: float = Field(1.0, gt=0.0)
    """Sampling temperature of the student's continuations."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling (1: the whole distribution)."""
    max_new_tokens: int = Field(64, gt=0)
    """Tokens the student may add to each prompt (it may stop earlier at its end-of-sequence token)."""


class FsdpConfig(Section):
    """train.distributed fsdp: how the student is sharded (`kvdistill.train.distributed`)."""

    cpu_offload: bool = False
    """Keep the sharded parameters, gradients and optimizer state in host memory; each layer's parameters come to
    the device for its forward and backward only (torch's CPUOffloadPolicy)."""
    reshard_after_forward: bool = True
    """Free each layer's gathered parameters after its forward (gathered again for the backward): less memory, one
    more all-gather per layer."""


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
    """Every evaluation also scores greedy exact match on the held-out records (`eval/exact_match`); a latent student
    (student.latent) answers in latent mode (kvdistill.student.answer.latent_exact_match, also `eval/gen_tokens`)."""
    eval_cot: bool = False
    """That exact match of a text student by CoT decoding from the question alone
    (kvdistill.student.answer.cot_exact_match), instead of giving the model the record's reasoning."""
    eval_max_new_tokens: int = Field(16, gt=0)
    """Generated tokens per answer of that exact match (with eval_cot: reasoning and answer; a latent student: after
    the answer prompt)."""
    early_stopping: EarlyStoppingConfig | None = None
    grad_norms_every: int = Field(0, ge=0)
    """Every N optimizer steps, the gradient norm of the CE term and of the distillation terms w.r.t. the student's
    parameters (`grad_norm/ce`, `grad_norm/kd`; two extra backward passes of the first micro-batch; one process)."""
    tensorboard: bool = True
    """Log to TensorBoard (DIR/tb) when train.report_to is not given; false: no tracker."""
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] | None = None
    """Trackers, through Accelerate (None: [tensorboard], or [] with train.tensorboard false). tensorboard: DIR/tb;
    wandb: offline under DIR/wandb unless WANDB_MODE is set (`wandb sync` uploads it); mlflow: DIR/mlruns unless
    MLFLOW_TRACKING_URI is set; trackio: its local store. Per-teacher terms go under teacher/<name>/."""
    num_workers: int = Field(0, ge=0)
    """DataLoader worker processes that collate batches (tokenization, token alignment) ahead of the step; 0: in
    the training process, just before each step."""
    prefetch: int | None = Field(None, gt=0)
    """Batches each worker collates ahead (the DataLoader's prefetch_factor); None: its default (2). Needs
    num_workers > 0."""
    teachers_ahead: bool | None = None
    """Run the teachers' K/V of the next micro-batch on a worker thread (its own CUDA stream) while the student
    steps on this one (`kvdistill.objectives.ahead`): the same numbers, the teachers off the critical path.
    None: on where the run has a GPU and teachers; true on a CPU works too (the two threads share the cores)."""
    distributed: Literal["ddp", "fsdp"] = "ddp"
    """Several processes: ddp replicates the student, its gradients and optimizer state on every process; fsdp
    shards the student's parameters, gradients and optimizer state over them (FSDP2, `kvdistill.train.distributed`).
    Teachers and maps are replicated either way."""
    fsdp: FsdpConfig = FsdpConfig()
    compile: bool = False
    """torch.compile the loss space's per-group K/V error (the loss part, not the models); where compilation
    fails the eager function runs instead (logged once)."""
    on_policy: OnPolicyConfig | None = None
    """On-policy distillation (GKD): {lambda, temperature, top_p, max_new_tokens}; None: the data text only."""

    presence_fields = frozenset({"tensorboard"})  # set or not: whether it contradicts train.report_to

    @property
    def trackers(self) -> list[str]:
        """The trackers a run logs to (train.report_to, else tensorboard if train.tensorboard)."""
        if self.report_to is not None:
            return list(dict.fromkeys(self.report_to))
        return ["tensorboard"] if self.tensorboard else []

    @model_validator(mode="after")
    def _trackers_agree(self):
        if (self.report_to is not None and "tensorboard" in self.model_fields_set
                and self.tensorboard != ("tensorboard" in self.report_to)):
            raise ValueError(f"train.tensorboard is {str(self.tensorboard).lower()} but train.report_to is "
                             f"{self.report_to}; drop train.tensorboard (train.report_to lists every tracker)")
        return self

    @model_validator(mode="after")
    def _prefetch_needs_workers(self):
        if self.prefetch is not None and self.num_workers == 0:
            raise ValueError(f"train.prefetch ({self.prefetch}) collates ahead on worker processes, but "
                             "train.num_workers is 0; set train.num_workers >= 1 or drop train.prefetch")
        return self


def budget_problems(compression: CompressionConfig, max_length: int, key: str) -> list[str]:
    """A compression budget above data.max_length keeps every token and pads every kept K/V to the budget:
    memory grows with the budget, not with the text (budget 100000 on 48-token texts took 20 GB)."""
    if compression.budget is None or compression.budget <= max_length:
        return []
    return [f"{key}.budget ({compression.budget}) is more than data.max_length ({max_length}): no text has that "
            f"many tokens, and the kept K/V would be padded to the budget; set a budget of at most {max_length} "
            "(or kind: full to keep every token)"]


class RunConfig(Section):
    name: str = "run"
    student: StudentConfig
    teachers: list[TeacherConfig] = []
    data: DataConfig = DataConfig()
    losses: LossesConfig = LossesConfig()
    fusion: FusionConfig = FusionConfig()
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _cross_checks(self):
        problems = []
        problems += [p for p in [segment_problem(self.name, "name")] if p]  # the run's folder in a curriculum
        names = [t.name for t in self.teachers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            problems.append(f"teachers: duplicate names {dupes}; give each teacher a distinct `name`")
        problems += [p for i, t in enumerate(self.teachers)
                     for p in budget_problems(t.compression, self.data.max_length, f"teachers.{i}.compression")]
        if self.fusion.weights is not None and len(self.fusion.weights) != len(self.teachers):
            problems.append(
                f"fusion.weights has {len(self.fusion.weights)} entries but there are {len(self.teachers)} teachers"
            )
        kd_terms = self.losses.kv.weight + self.losses.cosine + self.losses.attention_kl + self.losses.relation
        kd_terms += self.losses.logit_kd.weight + self.losses.hidden
        kd_terms += self.losses.routing.weight + self.losses.expert.weight
        if self.student.latent is not None:
            problems += self._latent_problems()
        elif self.teachers and kd_terms == 0:
            problems.append("teachers are given but every distillation loss weight is 0 (losses.kv.weight, ...)")
        moe_terms = [k for k in ("routing", "expert") if getattr(self.losses, k).weight > 0]
        if moe_terms and not self.teachers:
            problems.append(f"losses.{'/'.join(moe_terms)} weight is set but there are no teachers to distil from; "
                            "add an MoE teacher or set the weight to 0")
        if self.losses.ce == 0 and not self.teachers and self.student.latent is None:
            problems.append("no teachers and losses.ce is 0: nothing to train on")
        if self.train.compile and (self.fusion.space != "loss" or self.student.latent is not None or not self.teachers):
            problems.append(f"train.compile compiles the K/V errors of fusion.space loss with teachers and a text "
                            f"student; this run (space {self.fusion.space}, {len(self.teachers)} teacher(s), "
                            f"{'latent' if self.student.latent is not None else 'text'} student) has none to "
                            "compile: drop train.compile")
        problems += self._selection_problems()
        if self.train.on_policy is not None:
            problems += self._on_policy_problems()
        if self.student.latent is None:
            problems += self._teacher_capabilities()
            unread = [k for k in ("cot_ce", "codi", "latent_kv") if getattr(self.losses, k) != getattr(LossesConfig(), k)]
            problems += [f"losses.{k} is read by a latent student only; drop it or add a student.latent section"
                         for k in unread]
        if self.fusion.kind in ("router", "similarity", "confidence") and len(self.teachers) == 1:
            problems.append(f"fusion.kind {self.fusion.kind} weighs teachers against each other, but there is one "
                            "teacher: its weight is always 1 and nothing is learned; use fusion.kind: fixed")
        problems += self._skill_problems()
        if self.fusion.kind != "fixed" or self.fusion.weights is not None:
            problems += [f"teachers.{n}.weight ({t.weight}) is set but fusion.kind {self.fusion.kind} with "
                         f"{'fusion.weights' if self.fusion.weights is not None else 'its own weights'} never reads "
                         "it; drop it (or use fusion.kind: fixed without fusion.weights)"
                         for n, t in enumerate(self.teachers) if t.weight != 1.0]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _skill_problems(self) -> list[str]:
        labelled = [(n, t.skill) for n, t in enumerate(self.teachers) if t.skill is not None]
        problems = [f"teachers.{n}.skill '{skill}' is not among data.skills {self.data.skills}; name one of them "
                    "(routing accuracy reads each held-out record's skill), or drop it"
                    for n, skill in labelled if skill not in self.data.skills]
        skills = [skill for _, skill in labelled]
        problems += [f"teachers: skill '{s}' is given to several teachers; one specialist per skill"
                     for s in sorted({s for s in skills if skills.count(s) > 1})]
        return problems

    def _selection_problems(self) -> list[str]:
        """train.early_stopping / eval_exact_match / grad_norms_every need what they read."""
        t, problems = self.train, []
        if t.early_stopping is not None:
            if not t.eval_every:
                problems.append("train.early_stopping selects at evaluations, but train.eval_every is 0; set it "
                                "(e.g. train.eval_every=50)")
            if not self.data.val_size:
                problems.append("train.early_stopping selects on the validation split, but data.val_size is 0 (the "
                                "test split is never used for selection); set data.val_size (e.g. 256)")
            if t.early_stopping.metric == "exact_match" and not t.eval_exact_match:
                problems.append("train.early_stopping.metric exact_match needs train.eval_exact_match: true")
        if t.eval_cot and not t.eval_exact_match:
            problems.append("train.eval_cot is how train.eval_exact_match decodes, but eval_exact_match is false; "
                            "set it or drop eval_cot")
        if (t.eval_cot or t.grad_norms_every) and self.student.latent is not None:
            problems.append("train.eval_cot / grad_norms_every are for text students; a latent student "
                            "(student.latent) answers in latent mode (train.eval_exact_match alone): drop them")
        if t.grad_norms_every and self.losses.ce == 0:
            problems.append("train.grad_norms_every compares the CE and distillation gradients, but losses.ce is 0")
        return problems

    def _latent_problems(self) -> list[str]:
        """A latent student reads losses.ce (the answer after the latents), cot_ce, codi, latent_kv and fixed
        teacher weights; the text objective's terms, other fusions and cached / compressed teachers are refused."""
        c, lat = self.losses, self.student.latent
        defaults = LossesConfig()
        text_terms = [k for k in ("kv", "cosine", "attention_kl", "relation", "logit_kd", "hidden", "routing", "expert",
                                  "balance") if getattr(c, k) != getattr(defaults, k)]
        problems = [f"losses.{k} is read by the text objective, not by a latent student (student.latent); drop it "
                    "(the latent student's terms: losses.ce, cot_ce, codi, latent_kv)" for k in text_terms]
        if self.fusion != FusionConfig():
            problems.append("a latent student combines teachers with fixed weights (teachers.N.weight): drop the "
                            "fusion section")
        tgt = c.latent_kv.target
        for n, t in enumerate(self.teachers):
            if t.logits is not None:
                problems.append(f"teachers.{n}.logits (cached top-k log-probabilities) is read by losses.logit_kd of "
                                "a text student; a latent student reads teachers through L_KV only: drop it")
            if t.source == "online" and t.compression != CompressionConfig():
                problems.append(f"teachers.{n} ('{t.name}'): a latent student compresses an online teacher's CoT K/V "
                                "itself (losses.latent_kv.target); drop its compression")
            if t.source == "cache":
                comp = t.compression
                want = dict(kind=tgt.kind, budget=lat.tokens, span="cot",
                            **(dict(lam=tgt.lam, scoring=tgt.scoring, window=tgt.window) if tgt.kind == "rkv" else {}))
                wrong = {k: v for k, v in want.items() if getattr(comp, k) != v}
                if tgt.kind == "full" or wrong:
                    problems.append(
                        f"teachers.{n} ('{t.name}') is read from a cache, which must hold the latent target: "
                        f"compression {', '.join(f'{k}: {v}' for k, v in wrong.items()) or 'right_crop or rkv'} "
                        "(extract it with `kvdistill extract ... teacher.compression.span=cot`); the full "
                        "resampled target is computed online only")
        if self.teachers and c.latent_kv.weight == 0:
            problems.append("teachers are given but losses.latent_kv.weight is 0: the latent student reads teachers "
                            "only through L_KV")
        if c.latent_kv.weight > 0 and not self.teachers and not c.latent_kv.self_teacher:
            problems.append("losses.latent_kv.weight > 0 with self_teacher false and no teachers: no K/V target")
        if c.latent_kv.weight > 0 and lat.tokens == 0:
            problems.append("losses.latent_kv needs latent slots: student.latent.tokens is 0")
        elif c.latent_kv.weight > 0 and tgt.kind == "rkv" and tgt.scoring == "rkv" and lat.tokens <= tgt.window:
            problems.append(f"losses.latent_kv.target.scoring rkv keeps R-KV's window of {tgt.window} CoT tokens and "
                            f"scores the rest: student.latent.tokens ({lat.tokens}) must exceed it (or lower "
                            "losses.latent_kv.target.window)")
        if c.ce == 0 and c.cot_ce == 0 and c.codi.weight == 0 and c.latent_kv.weight == 0:
            problems.append("every latent-student loss weight is 0 (losses.ce, cot_ce, codi.weight, latent_kv.weight)")
        return problems

    def _teacher_capabilities(self) -> list[str]:
        """Terms and fusion spaces that need what only an online, uncompressed teacher gives."""
        c = self.losses
        terms = [name for name, w in (("losses.relation", c.relation), ("losses.attention_kl", c.attention_kl),
                                      ("losses.hidden", c.hidden), ("losses.logit_kd.weight", c.logit_kd.weight),
                                      ("losses.routing.weight", c.routing.weight),
                                      ("losses.expert.weight", c.expert.weight))
                 if w > 0]
        problems = []
        for n, t in enumerate(self.teachers):
            # logit KD reads a cached teacher's stored top-k log-probabilities (teachers.N.logits)
            online_only = [x for x in terms if not (t.source == "cache" and x == "losses.logit_kd.weight")]
            if online_only and (t.source == "cache" or t.compression.kind != "full"):
                problems.append(f"{', '.join(online_only)} need teacher '{t.name}' (teachers.{n}) online and "
                                f"uncompressed (it is source {t.source}, compression {t.compression.kind}); set those "
                                f"weights to 0 or teachers.{n}.source: online with compression.kind: full")
            problems += self._cached_logit_problems(n, t)
            reads = "fusion.kind confidence" if self.fusion.kind == "confidence" else "fusion.router.target confidence"
            if self.fusion.scores_teachers and (t.source == "cache" or t.compression.kind != "full"):
                problems.append(f"{reads} scores each sample with teacher '{t.name}''s own logits (teachers.{n}), "
                                f"which needs it online and uncompressed (it is source {t.source}, compression "
                                f"{t.compression.kind}); set teachers.{n}.source: online with compression.kind: full, "
                                "or use another fusion.kind")
            if self.fusion.space != "loss" and t.compression.kind != "full":
                problems.append(f"fusion.space '{self.fusion.space}' needs uncompressed teachers, but teachers.{n} "
                                f"('{t.name}') has compression.kind {t.compression.kind}; use fusion.space: loss "
                                "or compression.kind: full")
        return problems

    def _on_policy_problems(self) -> list[str]:
        """What on-policy distillation cannot work with: a student whose text it cannot sample, teachers that cannot
        see the sampled text, data without a prompt to continue."""
        op, problems = self.train.on_policy, []
        if self.student.latent is not None:
            problems.append("train.on_policy samples a text student's continuations; a latent student (student.latent) "
                            "answers through latent tokens: drop train.on_policy")
        if not self.teachers:
            problems.append("train.on_policy has no teachers to score the student's samples: add teachers or drop it")
        for n, t in enumerate(self.teachers):
            if t.compression.span == "cot":
                problems.append(f"train.on_policy: teachers.{n}.compression.span cot keeps the record's chain-of-"
                                "thought tokens, and the student's samples have no chain of thought marked in them: use "
                                "span all, or drop train.on_policy")
            if t.source == "cache":
                problems.append(f"train.on_policy: teacher '{t.name}' (teachers.{n}) is read from a cache, which holds "
                                "K/V (and logits) of the data texts extracted before training; it cannot hold those of "
                                "text the student generates during training: use source: online for it, or drop "
                                "train.on_policy")
        if self.data.source == "text":
            problems.append("train.on_policy continues each record's question (its text up to the end of the "
                            "{question} line); data.source text has no question: use template-mode data (question, "
                            "cot, answer fields) or a generator")
        if op.lam == 1.0 and self.train.teachers_ahead:
            problems.append("train.teachers_ahead runs the teachers on the data text ahead of the step, but with "
                            "train.on_policy.lambda 1 every step scores the student's own text: drop "
                            "train.teachers_ahead (or lower lambda)")
        return problems

    def _cached_logit_problems(self, n: int, t: TeacherConfig) -> list[str]:
        """teachers.N.logits: read (and checked against the cache) by logit KD from a cached teacher only; the
        cache must be normalised at every τ the loss takes."""
        kd = self.losses.logit_kd
        problems = []
        if t.source == "cache" and kd.weight > 0 and kd.top_k is None:
            problems.append(f"losses.logit_kd reads teacher '{t.name}' (teachers.{n}) from a cache, which holds its top-k "
                            "log-probabilities, not its whole distribution: set losses.logit_kd.top_k (e.g. 64; the "
                            "rest of the mass is one tail bucket)")
        if t.logits is None:
            if t.source == "cache" and kd.weight > 0:
                problems.append(f"losses.logit_kd reads teacher '{t.name}' (teachers.{n}) from its cache, which then "
                                f"must hold its top-k log-probabilities: add teachers.{n}.logits (e.g. {{dtype: "
                                f"float16}}) and extract the cache with it (`kvdistill extract CONFIG --teacher "
                                f"{t.name}`), or set losses.logit_kd.weight: 0")
            return problems
        if t.source != "cache":
            return [f"teachers.{n}.logits describes what a cache holds and is read for source: cache teachers only "
                    f"('{t.name}' is online, its logits come from its forward); drop it"]
        if kd.weight == 0:
            return [f"teachers.{n}.logits is read by losses.logit_kd, whose weight is 0; drop it or set the weight"]
        if t.logits.top_k is not None and kd.top_k is not None and t.logits.top_k < kd.top_k:
            problems.append(f"teachers.{n}.logits.top_k ({t.logits.top_k}) is below losses.logit_kd.top_k "
                            f"({kd.top_k}): the cache would hold fewer entries than the loss reads; raise it or drop it")
        needed = kd.temperatures_used()
        if needed is None:
            return problems + [f"losses.logit_kd.schedule kind linear takes every τ between start and end, but a cache stores the "
                    f"log-probabilities normalised at given temperatures only (teacher '{t.name}', teachers.{n}); use schedule kind step or "
                    "constant with a cached teacher"]
        missing = sorted(set(needed) - set(t.logits.temperatures or needed))
        if missing:
            return problems + [f"teachers.{n}.logits.temperatures {t.logits.temperatures} lacks τ {missing} that losses.logit_kd "
                    f"takes; add them (and re-extract), or drop temperatures to store exactly those of the loss"]
        return problems
