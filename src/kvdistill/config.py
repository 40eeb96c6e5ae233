"""Typed run configuration: YAML file + dotted command-line overrides, validated when loaded.

Every problem is collected and reported together (`ConfigError.problems`), each naming the key, the value
that is wrong and, for a typo, the nearest valid key. `kvdistill validate CONFIG` prints them all.

Layout of a config (every section optional except `student` and `data`)::

    student:   {model | from_config, tokenizer, lora, dtype, gradient_checkpointing}
    teachers:  - {name, model, source: online|cache, cache_dir, weight, layer_map, projector, dtype}
    data:      {source, path, fields, template, size, seed, max_length, eval_size}
    losses:    {ce, kv: {weight, kind, normalize, keys, values}, cosine, attention_kl, relation, logit_kd, hidden}
    fusion:    {kind: fixed|similarity|router, space: loss|target|latent, weights, similarity, router, entropy, latent}
    train:     {steps, batch_size, grad_accum, lr, ..., mixed_precision, seed, save_every, log_every}
"""

from __future__ import annotations

import difflib
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kvdistill.errors import ConfigError, KvdistillError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------------------------------------- student
class LoraConfig(Section):
    r: int = Field(8, gt=0)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | str = "all-linear"


class StudentConfig(Section):
    model: str | None = None
    """Offline name, local directory or hub id of a pretrained causal LM."""
    from_config: dict[str, Any] | None = None
    """Build a randomly initialised student: {base: <model whose config to start from>, <config overrides>}."""
    tokenizer: str | None = None
    """Tokenizer to use (default: the model's, or the base model's for from_config)."""
    lora: LoraConfig | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    gradient_checkpointing: bool = False

    @model_validator(mode="after")
    def _one_source(self):
        if (self.model is None) == (self.from_config is None):
            raise ValueError("give exactly one of student.model or student.from_config")
        if self.from_config is not None and "base" not in self.from_config:
            raise ValueError("student.from_config needs a 'base' model whose config it starts from")
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
    lam: float = Field(0.1, ge=0.0, le=1.0)
    """R-KV score λ·importance + (1-λ)·redundancy."""
    layers: list[int] | None = None
    """Teacher layers kept (None: all)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """Storage dtype in a cache."""

    @model_validator(mode="after")
    def _budget(self):
        if self.kind == "full" and self.budget is not None:
            raise ValueError("compression.budget is only for kind right_crop / rkv; kind 'full' keeps every token")
        if self.kind != "full" and self.budget is None:
            raise ValueError(f"compression.kind '{self.kind}' needs compression.budget (tokens kept, e.g. 128)")
        return self

    def build(self):
        from kvdistill.compress import Compression

        return Compression(kind=self.kind, budget=self.budget, lam=self.lam, layers=self.layers, dtype=self.dtype)


class TeacherConfig(Section):
    name: str | None = None
    """Short label used in logs and reports (default: the model name, '.' replaced by '_'); no '.' allowed."""
    model: str
    source: Literal["online", "cache"] = "online"
    cache_dir: str | None = None
    weight: float = Field(1.0, ge=0.0)
    layer_map: LayerMapConfig = LayerMapConfig()
    projector: Literal["auto", "identity", "per_head", "linear"] = "auto"
    compression: CompressionConfig = CompressionConfig()
    """Online teachers: compress K/V on the fly. Cached teachers: must equal what the cache was built with."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """auto: float32 on CPU, bfloat16 on GPU."""

    @model_validator(mode="after")
    def _cache_dir(self):
        if self.source == "cache" and not self.cache_dir:
            raise ValueError("source 'cache' needs cache_dir (a directory written by `kvdistill extract`)")
        if self.name is None:
            # Names key modules and buffers, where torch forbids '.': Qwen/Qwen2.5-1.5B -> Qwen2_5-1_5B.
            self.name = self.model.rstrip("/").split("/")[-1].replace(".", "_")
        elif "." in self.name or not self.name:
            raise ValueError(f"name {self.name!r} must be non-empty without '.'; e.g. {self.name.replace('.', '_')!r}")
        return self


# ---------------------------------------------------------------------------------------------- data
class DataConfig(Section):
    source: Literal["jsonl", "csv", "parquet", "text", "gsm_symbolic"] = "gsm_symbolic"
    path: str | None = None
    text_field: str = "text"
    question_field: str = "question"
    cot_field: str | None = "cot"
    answer_field: str = "answer"
    template: str = "Question: {question}\nReasoning: {cot}\nAnswer: {answer}"
    """How (question, cot, answer) records become one training text; plain `text_field` records ignore it."""
    size: int = Field(256, gt=0)
    """Number of generated samples (gsm_symbolic) or the cap on records read from a file."""
    eval_size: int = Field(32, ge=0)
    seed: int = 0
    max_length: int = Field(256, gt=1)

    @model_validator(mode="after")
    def _path(self):
        if self.source != "gsm_symbolic" and not self.path:
            raise ValueError(f"data.source '{self.source}' needs data.path")
        return self


# ---------------------------------------------------------------------------------------------- losses
class KVLossConfig(Section):
    weight: float = Field(1.0, ge=0.0)
    kind: Literal["mse", "smooth_l1"] = "mse"
    normalize: bool = True
    """Divide by the per-layer std of the teacher target so layers and teachers weigh alike."""
    keys: float = Field(1.0, ge=0.0)
    values: float = Field(1.0, ge=0.0)


class LogitKDConfig(Section):
    weight: float = Field(0.0, ge=0.0)
    temperature: float = Field(2.0, gt=0.0)
    """τ: both distributions are softened by τ and the divergence is multiplied by τ² (kvdistill.losses.logit_kd)."""
    divergence: Literal["forward", "reverse", "jsd"] = "forward"
    """forward KL(teacher || student), reverse KL(student || teacher), or the generalised JSD with `beta`."""
    beta: float = Field(0.5, gt=0.0, lt=1.0)
    """jsd only: m = β·p_teacher + (1-β)·p_student; 0.5 is the Jensen-Shannon divergence."""

    @model_validator(mode="after")
    def _used(self):
        if self.beta != 0.5 and self.divergence != "jsd":
            raise ValueError(f"losses.logit_kd.beta is set but divergence is '{self.divergence}', which has no beta; "
                             "drop beta or set divergence: jsd")
        return self


class LossesConfig(Section):
    ce: float = Field(1.0, ge=0.0)
    kv: KVLossConfig = KVLossConfig()
    cosine: float = Field(0.0, ge=0.0)
    attention_kl: float = Field(0.0, ge=0.0)
    relation: float = Field(0.0, ge=0.0)
    logit_kd: LogitKDConfig = LogitKDConfig()
    hidden: float = Field(0.0, ge=0.0)


# ---------------------------------------------------------------------------------------------- fusion
class SimilarityConfig(Section):
    prototype: Literal["mean", "first", "max", "kmeans"] = "mean"
    metric: Literal["cosine", "dot", "l2"] = "cosine"
    temperature: float = Field(1.0, gt=0.0)
    kmeans_k: int = Field(4, gt=0)


class RouterConfig(Section):
    kind: Literal["mlp", "gate", "attention"] = "mlp"
    per_token: bool = False


class EntropyConfig(Section):
    target: Literal["diverse", "specialized"] = "diverse"
    weight: float = Field(0.01, ge=0.0)


class LatentConfig(Section):
    dim: int = Field(64, gt=0)
    """d_z: width of the shared latent space Z."""
    fit_samples: int = Field(32, gt=1)
    """Training records (the first ones, the same on every process) that the frozen maps into Z are fitted on."""


class FusionConfig(Section):
    kind: Literal["fixed", "similarity", "router"] = "fixed"
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
            ("latent", "space: latent", self.space == "latent"))
            if getattr(self, key) != getattr(defaults, key) and not used]
        problems = [f"fusion.{key} is changed from its default but only fusion.{need} reads it (kind {self.kind}, space {self.space}); "
                    f"drop fusion.{key} or set fusion.{need}" for key, need in unused]
        if self.kind == "router" and self.router.kind == "attention" and self.router.per_token:
            problems.append("fusion.router.per_token needs router kind 'mlp' or 'gate': the attention router pools "
                            "over tokens")
        if problems:
            raise ValueError("; ".join(problems))
        return self


# ---------------------------------------------------------------------------------------------- training
class TrainConfig(Section):
    steps: int = Field(100, gt=0)
    batch_size: int = Field(4, gt=0)
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(3e-4, gt=0.0)
    projector_lr: float | None = None
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    seed: int = 0
    log_every: int = Field(1, gt=0)
    save_every: int = Field(0, ge=0)
    """Checkpoint every N optimizer steps (0: only at the end)."""
    eval_every: int = Field(0, ge=0)
    tensorboard: bool = True


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
        names = [t.name for t in self.teachers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            problems.append(f"teachers: duplicate names {dupes}; give each teacher a distinct `name`")
        if self.fusion.weights is not None and len(self.fusion.weights) != len(self.teachers):
            problems.append(
                f"fusion.weights has {len(self.fusion.weights)} entries but there are {len(self.teachers)} teachers"
            )
        kd_terms = self.losses.kv.weight + self.losses.cosine + self.losses.attention_kl + self.losses.relation
        kd_terms += self.losses.logit_kd.weight + self.losses.hidden
        if self.teachers and kd_terms == 0:
            problems.append("teachers are given but every distillation loss weight is 0 (losses.kv.weight, ...)")
        if self.losses.ce == 0 and not self.teachers:
            problems.append("no teachers and losses.ce is 0: nothing to train on")
        problems += self._teacher_capabilities()
        if self.fusion.kind != "fixed" or self.fusion.weights is not None:
            problems += [f"teachers.{n}.weight ({t.weight}) is set but fusion.kind {self.fusion.kind} with "
                         f"{'fusion.weights' if self.fusion.weights is not None else 'its own weights'} never reads "
                         "it; drop it (or use fusion.kind: fixed without fusion.weights)"
                         for n, t in enumerate(self.teachers) if t.weight != 1.0]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _teacher_capabilities(self) -> list[str]:
        """Terms and fusion spaces that need what only an online, uncompressed teacher gives."""
        c = self.losses
        terms = [name for name, w in (("losses.relation", c.relation), ("losses.attention_kl", c.attention_kl),
                                      ("losses.hidden", c.hidden), ("losses.logit_kd.weight", c.logit_kd.weight))
                 if w > 0]
        problems = []
        for n, t in enumerate(self.teachers):
            if terms and (t.source == "cache" or t.compression.kind != "full"):
                problems.append(f"{', '.join(terms)} need teacher '{t.name}' (teachers.{n}) online and uncompressed "
                                f"(it is source {t.source}, compression {t.compression.kind}); set those weights to 0 "
                                f"or teachers.{n}.source: online with compression.kind: full")
            if self.fusion.space != "loss" and t.compression.kind != "full":
                problems.append(f"fusion.space '{self.fusion.space}' needs uncompressed teachers, but teachers.{n} "
                                f"('{t.name}') has compression.kind {t.compression.kind}; use fusion.space: loss "
                                "or compression.kind: full")
        return problems


# ---------------------------------------------------------------------------------------------- loading
def _all_keys(model_cls: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model_cls.model_fields.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        ann = field.annotation
        for candidate in getattr(ann, "__args__", ()) or (ann,):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                keys.extend(_all_keys(candidate, dotted + "."))
    return keys


def _section_for(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that holds the field at `loc` (list indices skipped)."""
    cls: type[BaseModel] = RunConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        nested = None
        for candidate in (*getattr(ann, "__args__", ()), ann):
            inner = getattr(candidate, "__args__", None)
            for c in (*(inner or ()), candidate):
                if isinstance(c, type) and issubclass(c, BaseModel):
                    nested = c
        if nested is None:
            return None
        cls = nested
    return cls


def _format_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _describe(err: dict) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-after", "function-"))))
    key = _format_loc(loc) or "config"
    if err["type"] == "extra_forbidden":
        section = _section_for(loc)
        valid = list(section.model_fields) if section else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f"; did you mean '{_format_loc(loc[:-1] + (close[0],))}'?" if close else ""
        return f"unknown key '{key}'{hint} (valid here: {', '.join(valid)})"
    if err["type"] == "missing":
        return f"'{key}' is required"
    if err["type"] == "value_error":
        msg = err["msg"].removeprefix("Value error, ")
        return msg if key == "config" else f"{key}: {msg}"
    given = err.get("input")
    shown = repr(given) if not isinstance(given, dict) else "a mapping"
    return f"'{key}' = {shown}: {err['msg']}"


def _parse_scalar(text: str) -> Any:
    return yaml.safe_load(text) if text.strip() else ""


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (YAML-parsed values; `teachers.0.weight=2` indexes lists)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError([f"override '{item}' is not of the form key.path=value"], source="overrides")
        path, value = item.split("=", 1)
        parts = path.strip().split(".")
        node: Any = raw
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError([f"override '{path}': index '{part}' out of range (list has {len(node)} items)"],
                                      source="overrides")
                if last:
                    node[int(part)] = _parse_scalar(value)
                else:
                    node = node[int(part)]
                continue
            if last:
                node[part] = _parse_scalar(value)
            else:
                node = node.setdefault(part, {})
                if node is None:
                    node = {}
    return raw


def parse_config(raw: dict, source: str = "config") -> RunConfig:
    """Validate a raw mapping; raises ConfigError listing every problem."""
    if not isinstance(raw, dict):
        raise ConfigError([f"top level must be a mapping, got {type(raw).__name__}"], source=source)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError([_describe(e) for e in err.errors()], source=source) from None


def read_raw(path: str | Path, overrides: list[str] | None = None) -> dict:
    """The mapping in a YAML config file with dotted overrides applied (not validated)."""
    p = Path(path)
    if not p.is_file():
        raise KvdistillError(f"config file '{path}' does not exist", "check the path (ready configs: configs/*.yaml)")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError([f"not valid YAML: {err}"], source=str(path)) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"top level must be a mapping, got {type(raw).__name__}"], source=str(path))
    return apply_overrides(raw, overrides or [])


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, raw: dict | None = None) -> RunConfig:
    """Load a YAML config (or a raw mapping), apply dotted overrides, validate."""
    if raw is None:
        if path is None:
            raise KvdistillError("no config given", "pass a YAML file, e.g. configs/phase1.yaml")
        return parse_config(read_raw(path, overrides), source=str(path))
    raw = apply_overrides(dict(raw), overrides or [])
    return parse_config(raw, source=str(path) if path else "config")


def dump_config(config: RunConfig) -> str:
    """YAML of the keys that were given (defaults left out), so reloading it means exactly the same run:
    choices that depend on which keys were set (e.g. text vs template mode of a data file) survive."""
    return yaml.safe_dump(config.model_dump(mode="json", exclude_unset=True), sort_keys=False)


def semantic_problems(config: RunConfig) -> list[str]:
    """Checks that need the models' configs (not weights): teacher found, layer map possible, cache present.

    Loads only `config.json` of each model, so it is fast; returns the problems (empty list when all is well).
    """
    problems: list[str] = []
    student_layers = _student_layers(config.student, problems)
    for i, t in enumerate(config.teachers):
        problems += _teacher_problems(i, t, student_layers)
    problems += _data_problems(config.data)
    return problems


def check_config(raw: dict, source: str = "config") -> tuple[RunConfig | None, list[str]]:
    """(config or None, every problem): schema problems and the semantic checks together, in one list.

    When the schema check fails, each section is validated again without its failing fields, so a typo in one
    place does not hide a missing teacher or an impossible layer map in another.
    """
    try:
        cfg = parse_config(raw, source)
    except ConfigError as err:
        problems = list(err.problems)
    else:
        return cfg, semantic_problems(cfg)
    if not isinstance(raw, dict):
        return None, problems
    student = _salvage(StudentConfig, raw.get("student"))
    student_layers = _student_layers(student, problems) if student is not None else None
    teachers = raw.get("teachers")
    for i, t_raw in enumerate(teachers if isinstance(teachers, list) else []):
        teacher = _salvage(TeacherConfig, t_raw)
        if teacher is not None:
            problems += _teacher_problems(i, teacher, student_layers)
    data = _salvage(DataConfig, raw.get("data", {}))
    if data is not None:
        problems += _data_problems(data)
    return None, list(dict.fromkeys(problems))


def _salvage(cls: type[BaseModel], raw: Any) -> BaseModel | None:
    """`raw` validated as `cls` after dropping the fields that fail; None when that does not make it valid."""
    if not isinstance(raw, dict):
        return None
    data = dict(raw)
    for _ in range(len(cls.model_fields) + 1):
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            failing = {e["loc"][0] for e in err.errors() if e["loc"] and e["loc"][0] in data}
            if not failing:
                return None
            for key in failing:
                del data[key]
    return None


def _student_layers(student: StudentConfig, problems: list[str]) -> int | None:
    from kvdistill.models.load import load_config as load_hf_config

    try:
        if student.model:
            return _num_layers(load_hf_config(student.model))
        base = load_hf_config(student.from_config["base"])
        return student.from_config.get("num_hidden_layers", _num_layers(base))
    except KvdistillError as err:
        problems.append(f"student: {err.problem}")
        return None


def _num_layers(hf_config) -> int | None:
    """Layer count from a transformers config, whatever the family calls it."""
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(hf_config, attr, None), int):
            return getattr(hf_config, attr)
    return None


def _teacher_problems(i: int, t: TeacherConfig, student_layers: int | None) -> list[str]:
    """Teacher i found (online: its config.json; cache: a manifest) and its layer map buildable."""
    from kvdistill.align.layers import layer_map
    from kvdistill.models.load import load_config as load_hf_config

    key = f"teachers[{i}] ({t.name})"
    if t.source == "cache":
        if not (Path(t.cache_dir) / "manifest.json").is_file():
            return [f"{key}.cache_dir: '{t.cache_dir}' holds no manifest.json; run `kvdistill extract` first"]
        return []
    try:
        teacher_layers = _num_layers(load_hf_config(t.model))
    except KvdistillError as err:
        return [f"{key}.model: {err.problem}"]
    lm = t.layer_map
    if teacher_layers is None:
        return []
    if student_layers is None:  # student unknown: only the teacher side of an explicit map can be checked
        flat = [x for e in lm.explicit or [] for x in (e if isinstance(e, list) else [e])]
        bad = [x for x in flat if not -1 <= x < teacher_layers]
        return [f"{key}.layer_map.explicit: teacher layers {bad} outside 0..{teacher_layers - 1}"] if bad else []
    try:
        layer_map(student_layers, teacher_layers, strategy=lm.strategy, explicit=lm.explicit,
                  interpolate=lm.interpolate)
    except KvdistillError as err:
        return [f"{key}.layer_map ({lm.strategy}, student {student_layers} layers, teacher {teacher_layers}): "
                f"{err.problem}"]
    return []


def _data_problems(data: DataConfig) -> list[str]:
    if data.source != "gsm_symbolic" and data.path and not Path(data.path).exists():
        return [f"data.path: '{data.path}' does not exist"]
    return []


def config_path(config: str):
    """A path, or the name of a packaged config (quickstart, phase1 … phase5)."""
    if Path(config).exists():
        return Path(config)
    packaged = files("kvdistill") / "configs" / f"{config.removesuffix('.yaml')}.yaml"
    if packaged.is_file():
        return packaged
    names = sorted(p.name.removesuffix(".yaml") for p in (files("kvdistill") / "configs").iterdir())
    raise KvdistillError(f"config '{config}' is neither a file nor a packaged config",
                         f"give a YAML path or one of: {', '.join(names)}")
