"""An experiment spec: a base run config, teachers to prepare, conditions × seeds under one shared budget.

    name: tiny
    base: {student: ..., data: ..., train: ...}     # a run config (inline, a path, or a packaged name)
    teachers:                                       # trained (or fine-tuned) on the task once, reused
                                                    # everywhere
      - {name: t1, from_config: {base: smollm2-135m, num_hidden_layers: 2, ...}, tokenizer: ..., steps: 300,
         min_exact_match: 0.3}
    conditions:                                     # each an ordinary training run per seed
      ce_only: {}
      kd: {teachers: [t1], overrides: [losses.kv.weight=1.0]}
      ce_flops: {match_flops_of: kd}                # CE only, given the FLOPs of `kd` (teachers' forward
                                                    # included)
      ce_wall: {match_wall_of: kd}                  # CE only, given the measured training wall time of `kd`
      ce_small: {overrides: [data.train_size=500]}  # another student data size (held-out splits unchanged)
    baseline: ce_only
    seeds: [0, 1, 2]
    budget: {steps: 200, batch_size: 8}             # the same for every condition unless it says otherwise

A seed sets `train.seed` (initial weights, projector init, data order); the held-out (test) split, the
validation split and the teachers are the same for every condition and seed, so comparisons are paired. A
teacher may train on its own data (`teachers[i].data`, e.g. a larger pool) and a condition may change the
student's training data (`data.*` overrides, e.g. data.train_size); the runner checks that every run, teachers
included, keeps the base's test and validation splits and that no training set shares an id or a question with
them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from kvdistill.config.load import config_path
from kvdistill.config.problems import validation_problems
from kvdistill.config.schema import Section
from kvdistill.errors import ConfigError
from kvdistill.paths import segment_problem


class TeacherPrep(Section):
    name: str
    model: str | None = None
    """A checkpoint to fine-tune on the task (hub id, local directory, offline name) ..."""
    from_config: dict[str, Any] | None = None
    """... or a model built from a family's config: {base: <model whose config to start from>,
    <overrides>}."""
    tokenizer: str | None = None
    steps: int = Field(500, ge=0)
    """Steps of its CE training on the task; 0: the model is used as given (a pretrained teacher, e.g. the
    quickstart's), scored only where `min_exact_match` asks."""
    batch_size: int = Field(16, gt=0)
    lr: float = Field(1e-3, gt=0.0)
    warmup_steps: int = Field(0, ge=0)
    min_exact_match: float = Field(0.0, ge=0.0, le=1.0)
    """Held-out exact match the teacher must reach (a specialist: on its own `skill`); below it the experiment
    stops (no comparison means anything)."""
    overrides: list[str] = []
    """Dotted overrides of the teacher's own CE training run (e.g. train.schedule=linear; a specialist:
    data.train_skills=[sorting])."""
    skill: str | None = None
    """The skill it specialises in (one of the base data.skills): every condition labels it so
    (teachers[].skill), and router / similarity conditions report their routing accuracy on it."""
    data: dict[str, Any] | None = None
    """This teacher's own training data: keys of the base data section it changes, e.g. {train_size: null}
    (the whole pool where the students get data.train_size of it) or {size: 40000}. It is scored on the base's
    test split like every run, so that split (and the validation split) must stay the same."""

    @model_validator(mode="after")
    def _one_source(self):
        if (self.model is None) == (self.from_config is None):
            raise ValueError(f"teacher '{self.name}': give exactly one of model or from_config")
        if "." in self.name or "/" in self.name:
            raise ValueError(f"teacher name '{self.name}' may not contain '.' or '/'")
        if self.steps == 0:
            unread = sorted(
                k
                for k in ("from_config", "tokenizer", "batch_size", "lr", "warmup_steps", "overrides", "data")
                if getattr(self, k) != type(self).model_fields[k].default
            )
            if self.model is None or unread:
                raise ValueError(
                    f"teacher '{self.name}': steps 0 uses a model as given (no training), so it needs "
                    f"`model`{' and reads no ' + ', '.join(unread) if unread else ''}"
                )
        return self


class ConditionSpec(Section):
    teachers: list[str] = []
    """Prepared teachers (by name) distilled from; empty: CE only."""
    overrides: list[str] = []
    """Dotted overrides of the base config (after the budget)."""
    cache: bool = False
    """Read the teachers from caches the runner extracts once per teacher (`kvdistill extract`, full K/V in
    bfloat16): their forward is paid once for every condition and seed, its cost reported separately."""
    match_flops_of: str | None = None
    """Give this condition the training FLOPs of another: steps · (6·N_s + 2·Σ N_t) / (6·N_s + 2·Σ N_t of this
    one), N the parameter counts (forward 2N, forward + backward 6N per token; a cached teacher costs nothing
    per step)."""
    match_wall_of: str | None = None
    """Give this condition the measured training wall time of another: steps = median over OTHER's runs of its
    training seconds (evaluations excluded; a cached condition's amortised extraction seconds added) / the
    median seconds per step of `wall_rate_of`'s runs. Trained after every other condition (it needs their
    times)."""
    wall_rate_of: str | None = None
    """The condition whose measured seconds per step convert the wall time into steps (default: the baseline);
    it must train the same student the same way (same teachers, cache and batch), i.e. this condition at other
    steps."""


class EvalSpec(Section):
    exact_match: bool = True
    max_new_tokens: int = Field(24, gt=0)
    batch_size: int = Field(32, gt=0)
    cot: bool = False
    """Text models (teachers, text conditions) answer by CoT decoding from the question alone, up to
    `max_cot_tokens` (kvdistill.eval.decode.cot_exact_match), instead of being given the record's reasoning;
    latent students always answer in latent mode."""
    max_cot_tokens: int = Field(96, gt=0)
    routing_teacher: str | None = None
    """A prepared MoE teacher (by name): every run's held-out routing agreement with it, metrics routing_top1
    and routing_topk (kvdistill.eval.moe.routing_agreement_of); MoE students only."""
    probe: bool = False
    """Every run's KV probe 1 - R² per student layer against every teacher of the spec (`probe_kv_error` in
    its eval.json; kvdistill.eval.metrics.probe_kv_error), the ridge maps fitted on the first max(test
    records, 16) train records of the base data. Text students only."""
    init: bool = False
    """Also score the baseline's untrained student (its initial weights under each seed) the same way:
    DIR/init/seed-S/eval.json, a 'before' beside the trained runs."""


class ExperimentSpec(Section):
    name: str
    base: str | dict[str, Any]
    teachers: list[TeacherPrep] = []
    conditions: dict[str, ConditionSpec]
    baseline: str
    compare: list[tuple[str, str]] = []
    """Extra paired comparisons [condition, reference] beside every condition against the baseline (e.g. a
    latent student against answering directly); results.json `comparisons` lists them with `baseline` the
    reference."""
    seeds: list[int] = [0, 1, 2]
    budget: dict[str, Any] = {}
    """Overrides every condition shares, as a mapping of dotted keys: {steps: N} is short for train.steps."""
    metrics: list[str] = ["exact_match", "ppl"]
    eval: EvalSpec = EvalSpec()
    concurrent: int | Literal["auto"] = 1
    """Runs trained at once (separate processes; several small runs share one GPU); auto: as many as the GPU's
    free memory holds by the estimate of `kvdistill.experiments.memory` (at most the CPU cores and the
    runs). Either way, on a CUDA device a run starts only where the free memory then holds its estimate."""
    memory_ramp_s: float = Field(60.0, ge=0.0)
    """The memory gate's ramp (seconds): a child started less than this long ago is assumed to have allocated
    nothing of its estimate yet (`kvdistill.experiments.memory.admits`)."""
    student_from: str | None = None
    """A prepared teacher whose trained model every condition's student starts from (student.model; the base
    student's other keys, e.g. latent and lora, kept): e.g. a backbone fine-tuned on the task with CoT."""

    @model_validator(mode="after")
    def _cross_checks(self):
        problems = []
        names = [t.name for t in self.teachers]
        # every one of these becomes a folder: DIR/teachers/NAME, DIR/runs/CONDITION/seed-S
        for key, value in (
            [("name", self.name)]
            + [(f"teachers.{t}.name", t) for t in names]
            + [(f"conditions.{c}", c) for c in self.conditions]
        ):
            problem = segment_problem(value, key)
            if problem:
                problems.append(problem)
        if len(set(names)) != len(names):
            problems.append(f"teachers: duplicate names {sorted({n for n in names if names.count(n) > 1})}")
        if self.baseline not in self.conditions:
            problems.append(f"baseline '{self.baseline}' is not a condition ({', '.join(self.conditions)})")
        for cname, cond in self.conditions.items():
            unknown = [t for t in cond.teachers if t not in names]
            if unknown:
                problems.append(f"conditions.{cname}.teachers: {unknown} are not among the teachers {names}")
            if cond.cache and not cond.teachers:
                problems.append(f"conditions.{cname}.cache: true needs teachers to read from caches")
            if cond.match_flops_of is not None and cond.match_flops_of not in self.conditions:
                problems.append(
                    f"conditions.{cname}.match_flops_of: '{cond.match_flops_of}' is not a condition"
                )
            problems += self._wall_problems(cname, cond)
        for pair in self.compare:
            unknown = [c for c in pair if c not in self.conditions]
            if unknown or pair[0] == pair[1]:
                problems.append(
                    f"compare {list(pair)}: needs two different conditions of the spec"
                    + (f" ({unknown} are not)" if unknown else "")
                )
        if self.student_from is not None and self.student_from not in names:
            problems.append(f"student_from: '{self.student_from}' is not among the teachers {names}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            problems.append(f"seeds {self.seeds} must be distinct and at least one")
        if self.eval.routing_teacher is not None and self.eval.routing_teacher not in names:
            problems.append(
                f"eval.routing_teacher '{self.eval.routing_teacher}' is not among the teachers {names}"
            )
        routing = [m for m in self.metrics if m.startswith("routing_")]
        if routing and self.eval.routing_teacher is None:
            problems.append(f"metrics {routing} need eval.routing_teacher (the MoE teacher to agree with)")
        bad = [m for m in self.metrics if m not in METRICS]
        if bad:
            problems.append(f"metrics {bad} are unknown; use some of {list(METRICS)}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _wall_problems(self, cname: str, cond: ConditionSpec) -> list[str]:
        if cond.match_wall_of is None:
            return (
                [f"conditions.{cname}.wall_rate_of is read with match_wall_of only; drop it"]
                if cond.wall_rate_of
                else []
            )
        key, problems = f"conditions.{cname}", []
        other = self.conditions.get(cond.match_wall_of)
        rate_name = cond.wall_rate_of or self.baseline
        rate = self.conditions.get(rate_name)
        if cond.match_flops_of is not None:
            problems.append(f"{key}: give match_flops_of or match_wall_of, not both (each is its own row)")
        if cond.cache:
            problems.append(
                f"{key}: match_wall_of with cache: true is not supported (the cache is sized before the "
                "wall time is measured); drop cache"
            )
        if other is None:
            problems.append(f"{key}.match_wall_of: '{cond.match_wall_of}' is not a condition")
        elif other.match_wall_of is not None or cond.match_wall_of == cname:
            problems.append(
                f"{key}.match_wall_of: '{cond.match_wall_of}' must be a condition trained first (not "
                "itself matched by wall time)"
            )
        if rate is None:
            problems.append(f"{key}.wall_rate_of: '{rate_name}' is not a condition")
        elif rate.match_wall_of is not None or (rate.teachers, rate.cache) != (cond.teachers, cond.cache):
            problems.append(
                f"{key}.wall_rate_of: '{rate_name}' must train this condition's student the same way "
                f"(teachers {cond.teachers}, cache {cond.cache}) and not be matched by wall time itself; "
                "name such a condition in wall_rate_of"
            )
        return problems

    def budget_overrides(self) -> list[str]:
        short = {"steps": "train.steps", "batch_size": "train.batch_size", "lr": "train.lr"}
        return [
            f"{short.get(k, k)}="
            f"{yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
            for k, v in self.budget.items()
        ]


METRICS = {
    "exact_match": "held-out exact match (greedy)",
    "ppl": "held-out perplexity",
    "ce": "held-out CE",
    "elapsed_s": "training wall time (s)",
    "train_s": "training wall time without evaluations (s)",
    "flops": "training FLOPs (cached teachers: with the amortised extraction)",
    "gen_tokens": "generated tokens per answer",
    "latency_s": "decoding latency per answer (s)",
}
METRICS.update(
    routing_top1="held-out top-1 routing agreement with eval.routing_teacher",
    routing_topk="held-out top-k routing overlap with eval.routing_teacher",
)
HIGHER_IS_BETTER = {
    "exact_match": True,
    "ppl": False,
    "ce": False,
    "elapsed_s": False,
    "train_s": False,
    "flops": False,
    "gen_tokens": False,
    "latency_s": False,
}
HIGHER_IS_BETTER.update(routing_top1=True, routing_topk=True)


PER_SKILL = ("exact_match_", "routing_acc")
"""Prefixes of the metrics a held-out set mixing skills adds by itself (`kvdistill.experiments.results`)."""


def metric_label(metric: str) -> str:
    """What a metric holds, in words (the per-skill ones included)."""
    if metric in METRICS:
        return METRICS[metric]
    if metric.startswith("exact_match_"):
        return f"held-out exact match on {metric.removeprefix('exact_match_')} problems"
    if metric == "routing_acc":
        return "routing accuracy: mean fusion weight on the matching specialist"
    return f"routing accuracy on {metric.removeprefix('routing_acc_')} problems"


def higher_is_better(metric: str) -> bool:
    return HIGHER_IS_BETTER[metric] if metric in HIGHER_IS_BETTER else metric.startswith(PER_SKILL)


def spec_path(spec: str) -> Path:
    """A path, or the name of a packaged spec (configs/experiments/NAME.yaml)."""
    return config_path(spec, "experiments", "experiment spec")


def load_spec(spec: str | Path | dict) -> ExperimentSpec:
    """Read and validate a spec (every problem listed together)."""
    source = "spec"
    if not isinstance(spec, dict):
        path = spec_path(str(spec))
        source = str(path)
        try:
            spec = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError([f"not valid YAML: {err}"], source=source) from None
    try:
        return ExperimentSpec.model_validate(spec)
    except ValidationError as err:
        raise ConfigError(validation_problems(err, ExperimentSpec, name="spec"), source=source) from None
