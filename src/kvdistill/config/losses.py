"""The `losses` section of a run configuration: the weight of each term and its settings (CE, the K/V error,
cosine, attention KL, relation, logit KD with its temperature schedule, hidden states, MoE routing and expert
outputs, and the latent student's CODI and latent K/V terms). Which terms a run has is its objective's
(`kvdistill.config.objective`).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from kvdistill.config.section import Section


class KVWeightSchedule(Section):
    """The K/V weight over training, a pure function of the optimizer step s (0-based) of a run of S steps
    (train.steps), so a resume continues it exactly; w = losses.kv.weight, e = `end`, x = s/(S-1):
    constant: w; linear: w + (e - w)·x; cosine: e + (w - e)·(1 + cos(π·x))/2. From step `start` on it moves
    (x = (s - start)/(S - 1 - start)); before it the weight is w."""

    kind: Literal["constant", "linear", "cosine"] = "constant"
    end: float | None = Field(None, ge=0.0)
    start: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _end(self):
        if self.kind == "constant" and (self.end is not None or self.start):
            raise ValueError(
                "losses.kv.schedule.end / start are read by kind linear / cosine only; drop them"
            )
        if self.kind != "constant" and self.end is None:
            raise ValueError(
                f"losses.kv.schedule kind {self.kind} needs end (the weight at the last step, e.g. 0)"
            )
        return self


class KVLossConfig(Section):
    weight: float = Field(1.0, ge=0.0)
    kind: Literal["mse", "smooth_l1"] = "mse"
    normalize: bool = True
    """Divide by the per-layer std of the teacher target so layers and teachers weigh alike."""
    keys: float = Field(1.0, ge=0.0)
    values: float = Field(1.0, ge=0.0)
    schedule: KVWeightSchedule = KVWeightSchedule()
    """The weight over training (`KVWeightSchedule`); each step's is logged as `kv/weight`."""

    def weight_at(self, step: int, total: int) -> float:
        """The K/V weight of optimizer step `step` (0-based) of a run of `total` steps."""
        s = self.schedule
        if s.kind == "constant" or step < s.start:
            return self.weight
        x = min(step - s.start, total - 1 - s.start) / max(total - 1 - s.start, 1)
        if s.kind == "linear":
            return self.weight + (s.end - self.weight) * x
        return s.end + (self.weight - s.end) * (1.0 + math.cos(math.pi * x)) / 2.0


class TemperatureSchedule(Section):
    """τ as a pure function of the optimizer step s (0-based) of a run of S steps, so a resume continues it
    exactly: constant: `losses.logit_kd.temperature`; linear: start + (end - start)·s/(S - 1); step: values[i]
    from step milestones[i - 1] on (default milestones: S split into len(values) equal segments, e.g. 8 → 4 →
    2)."""

    kind: Literal["constant", "linear", "step"] = "constant"
    start: float | None = Field(None, gt=0.0)
    end: float | None = Field(None, gt=0.0)
    values: list[float] | None = None
    milestones: list[int] | None = None

    @model_validator(mode="after")
    def _fields_of_kind(self):
        wanted = {"constant": set(), "linear": {"start", "end"}, "step": {"values"}}[self.kind]
        allowed = wanted | ({"milestones"} if self.kind == "step" else set())
        given = {k for k in ("start", "end", "values", "milestones") if getattr(self, k) is not None}
        problems = [f"schedule.{k} is not read by kind {self.kind}; drop it" for k in sorted(given - allowed)]
        problems += [f"schedule kind {self.kind} needs schedule.{k}" for k in sorted(wanted - given)]
        if self.values is not None and (len(self.values) < 2 or any(v <= 0 for v in self.values)):
            problems.append(f"schedule.values {self.values} must be at least 2 temperatures > 0")
        if (
            self.milestones is not None
            and self.values is not None
            and (
                len(self.milestones) != len(self.values) - 1
                or any(m <= 0 for m in self.milestones)
                or sorted(set(self.milestones)) != self.milestones
            )
        ):
            problems.append(
                f"schedule.milestones {self.milestones} must be {len(self.values) - 1} increasing steps "
                f"> 0, one per change of value in {self.values}"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self


class LogitKDConfig(Section):
    presence_fields = frozenset(
        {"temperature", "cross_tokenizer"}
    )  # set or not: refused where nothing reads it

    weight: float = Field(0.0, ge=0.0)
    temperature: float = Field(2.0, gt=0.0)
    """τ: both distributions are softened by τ and the divergence is multiplied by τ²
    (kvdistill.losses.logit_kd)."""
    schedule: TemperatureSchedule = TemperatureSchedule()
    """τ over training (constant: `temperature`); the τ of each step is logged as `logit_kd/temperature`."""
    divergence: Literal["forward", "reverse", "jsd"] = "forward"
    """forward KL(teacher || student), reverse KL(student || teacher), or the generalised JSD with `beta`."""
    beta: float = Field(0.5, gt=0.0, lt=1.0)
    """jsd only: m = β·p_teacher + (1-β)·p_student; 0.5 is the Jensen-Shannon divergence."""
    cross_tokenizer: Literal["project", "span"] = "project"
    """A teacher with another tokenizer (one tokenizer: the exact same-vocabulary term, whatever this says):
    project: at each student position that has read the same text as a teacher position, both next-token
    distributions summed onto the token strings the two vocabularies share plus one "other" bucket
    (kvdistill.losses.cross_logit_kd); span: the probability each model gives to every chunk of text that both
    tokenizations spell exactly, by the chain rule, as a two-outcome distribution
    (kvdistill.losses.span_logit_kd)."""
    top_k: int | None = Field(None, gt=0)
    """Compare with the teacher's k most probable entries plus one tail bucket holding the rest of its mass
    (what an offline cache of logits holds) instead of its whole distribution
    (kvdistill.losses.topk_logit_kd); None: whole."""
    chunk: int = Field(1024, ge=0)
    """Positions whose softmaxes are computed at once (0: all): the float32 (positions, vocabulary) copies
    exist one chunk at a time and are recomputed in backward; value and gradient do not depend on it."""

    @model_validator(mode="after")
    def _used(self):
        problems = []
        if self.beta != 0.5 and self.divergence != "jsd":
            problems.append(
                f"losses.logit_kd.beta is set but divergence is '{self.divergence}', which has no beta; "
                "drop beta or set divergence: jsd"
            )
        if self.schedule.kind != "constant" and "temperature" in self.model_fields_set:
            problems.append(
                f"losses.logit_kd.temperature is set but schedule.kind {self.schedule.kind} gives τ; "
                "drop temperature or use schedule.kind: constant"
            )
        if self.top_k is not None and self.cross_tokenizer == "span":
            problems.append(
                "losses.logit_kd.top_k is set with cross_tokenizer: span, which needs the probability of "
                "each realised token, not a top-k; drop top_k or use cross_tokenizer: project"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def temperatures_used(self) -> list[float] | None:
        """Every τ the schedule takes (sorted), None for a linear schedule (a continuum)."""
        s = self.schedule
        if s.kind == "constant":
            return [self.temperature]
        return sorted(set(s.values)) if s.kind == "step" else None

    def temperature_at(self, step: int, total: int) -> float:
        """τ of optimizer step `step` (0-based) of a run of `total` steps (`TemperatureSchedule`)."""
        s = self.schedule
        if s.kind == "constant":
            return self.temperature
        if s.kind == "linear":
            return s.start + (s.end - s.start) * min(step, total - 1) / max(total - 1, 1)
        n = len(s.values)
        milestones = s.milestones if s.milestones is not None else [round(total * i / n) for i in range(1, n)]
        return s.values[sum(step >= m for m in milestones)]


class RoutingLossConfig(Section):
    """MoE routing distillation (kvdistill.losses.routing_kl) from the student's own router logits."""

    weight: float = Field(0.0, ge=0.0)
    kind: Literal["full", "topk"] = "full"
    """full: KL over every expert; topk: over the teacher's top-k experts, both renormalised there."""
    correspondence: Literal["auto", "identity", "fitted"] = "auto"
    """Which student experts a teacher expert's probability goes to (also the expert term's pairs): identity
    (equal expert counts, e.g. an upcycled student), fitted (from the teacher's routing on training records:
    experts grouped by co-activation, or split by load), auto: identity when the counts are equal, else
    fitted."""


class ExpertLossConfig(Section):
    """MoE expert-output distillation (kvdistill.losses.expert_output_error), per corresponding expert."""

    weight: float = Field(0.0, ge=0.0)
    normalize: bool = True
    """Divide by the mean squared teacher expert output (a relative error)."""


class CodiConfig(Section):
    """CODI (kvdistill.losses.codi_loss): the latent student's hidden states at the token before the answer
    pulled to the backbone's own in CoT mode, every layer."""

    weight: float = Field(0.0, ge=0.0)
    """α1 (KaVa: about 10-20; CODI's and PCCoT's GPT-2 recipes: 1). On the `kava` spec (a 28 M backbone
    trained from its config, 1,500 steps, one H100, 3 seeds) 10 gave 0.198 exact match against 0.293 for 1;
    on a CPU twin the weighted CODI gradient at 10 was about 3x the answer CE's (docs/experiments.md)."""
    kind: Literal["smooth_l1", "mse"] = "smooth_l1"
    normalize: bool = True
    """Divide each layer's error by the std of the teacher's vector."""


class LatentTargetConfig(Section):
    """How a teacher's chain-of-thought K/V becomes the M latent targets (kvdistill.compress.latent)."""

    kind: Literal["full", "right_crop", "rkv"] = "rkv"
    """full: every CoT token resampled to M; right_crop: the first M; rkv: the M best R-KV scores per head."""
    lam: float | None = Field(None, ge=0.0, le=1.0)
    """rkv: weight of importance (1: importance only, 0: redundancy only); None: the scoring's default (kava
    and minmax 0.1, rkv 0.07: `kvdistill.compress.select.DEFAULT_LAM`)."""
    scoring: Literal["kava", "rkv", "minmax"] = "kava"
    """rkv: kava λ·I + (1-λ)·softmax(-r) (default); rkv R-KV's reference scoring λ·maxpool_7(A) -
    (1-λ)·softmax(S) with A from the last `window` CoT tokens, which are always kept; minmax (the offline
    cache's) λ·minmax(I) + (1-λ)·(1 - minmax(r)) (kvdistill.compress.latent)."""
    window: int = Field(8, gt=0)
    """scoring rkv: R-KV's observation window (the last CoT tokens), kept and read for importance."""

    @model_validator(mode="after")
    def _used(self):
        from kvdistill.compress.select import DEFAULT_LAM

        problems = []
        if self.kind != "rkv" and (
            self.lam not in (None, DEFAULT_LAM[self.scoring]) or self.scoring != "kava"
        ):
            problems.append(
                f"losses.latent_kv.target.lam / scoring are read by kind rkv only (kind is {self.kind}); "
                "drop them"
            )
        if self.window != 8 and self.scoring != "rkv":
            problems.append(
                f"losses.latent_kv.target.window is read by scoring rkv only (scoring is {self.scoring}); "
                "drop it"
            )
        if problems:
            raise ValueError("; ".join(problems))
        if self.lam is None:
            self.lam = DEFAULT_LAM[self.scoring]
        return self


class LatentKVConfig(Section):
    """L_KV of the latent student: its K/V at the M latent slots matched, per layer pair and KV head, to each
    teacher's CoT K/V compressed to M entries; the teacher side under stop-gradient."""

    weight: float = Field(0.0, ge=0.0)
    """α2 (KaVa: about 1-2), on the mean of the K and V errors (KaVa's L_KV averages them)."""
    kind: Literal["mse", "smooth_l1"] = "smooth_l1"
    normalize: bool = True
    """Divide by the variance (mse) or std (smooth_l1) of the sample's target (kvdistill.losses.kv_error)."""
    keys: float = Field(1.0, ge=0.0)
    values: float = Field(1.0, ge=0.0)
    target: LatentTargetConfig = LatentTargetConfig()
    self_teacher: bool = True
    """The backbone in CoT mode is a teacher (self-distillation, as KaVa); `teachers:` add others."""
