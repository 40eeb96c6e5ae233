"""Which objective a run trains, and its losses: the `losses` section is a tagged union on `losses.objective`.

    text:    a text student distilled through K/V (+ cosine, attention KL, relation, logit KD, hidden, MoE
             terms) (kvdistill.objectives.text)
    latent:  a latent-reasoning student (student.latent) under answer CE, CoT CE, CODI and L_KV
             (kvdistill.objectives.kava)

Each objective's section holds only its own terms, so a term of the other is an unknown key, reported with the
key and the fix (`foreign_key_problem`). `losses.objective` may be left out: it is latent when the student has
a `student.latent` section, else text (`with_objective`). Configs written before the split hold every term of
both (a run's config.yaml spells out every default): the other objective's terms at their defaults are dropped
when read, any other value is refused.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationError

from kvdistill.config.losses import (
    CodiConfig,
    ExpertLossConfig,
    KVLossConfig,
    LatentKVConfig,
    LogitKDConfig,
    RoutingLossConfig,
)
from kvdistill.config.section import Section


class ObjectiveLosses(Section):
    """What every objective's losses section has: its tag and the student's CE weight."""

    objective: str
    ce: float = Field(1.0, ge=0.0)
    """The student's cross-entropy (text: the whole text; latent: the answer after the latents)."""

    @property
    def teacher_logits(self) -> bool:
        """Whether the teachers' next-token logits are read (what a cache then holds, and memory estimates
        count)."""
        return False

    @property
    def teacher_attentions(self) -> bool:
        """Whether the teachers' attention probabilities are read (online teachers then run eager
        attention)."""
        return False


class TextLosses(ObjectiveLosses):
    """The text objective's terms (kvdistill.objectives.text)."""

    objective: Literal["text"] = "text"
    """The objective: text (a text student; these terms) or latent (a student.latent section; its terms ce,
    cot_ce, codi, latent_kv). Left out: latent exactly when the student has a student.latent section."""
    routing: RoutingLossConfig = RoutingLossConfig()
    expert: ExpertLossConfig = ExpertLossConfig()
    balance: float | None = Field(None, ge=0.0)
    """MoE students: weight of the (sequence-wise) load-balancing loss; None: the student's own
    `router_aux_loss_coef` (its config's)."""
    kv: KVLossConfig = KVLossConfig()
    cosine: float = Field(0.0, ge=0.0)
    attention_kl: float = Field(0.0, ge=0.0)
    relation: float = Field(0.0, ge=0.0)
    logit_kd: LogitKDConfig = LogitKDConfig()
    hidden: float = Field(0.0, ge=0.0)

    @property
    def teacher_logits(self) -> bool:
        return self.logit_kd.weight > 0

    @property
    def teacher_attentions(self) -> bool:
        return self.attention_kl > 0


class LatentLosses(ObjectiveLosses):
    """The latent-reasoning objective's terms (kvdistill.objectives.kava): needs a student.latent section."""

    objective: Literal["latent"] = "latent"
    """The objective: latent (a student.latent section; these terms) or text (a text student; its terms ce,
    kv, cosine, attention_kl, relation, logit_kd, hidden, routing, expert, balance). Left out: from the
    student."""
    cot_ce: float = Field(0.0, ge=0.0)
    """CE of the CoT and answer given the question, the backbone in CoT (teacher) mode."""
    codi: CodiConfig = CodiConfig()
    latent_kv: LatentKVConfig = LatentKVConfig()


OBJECTIVE_LOSSES: dict[str, type[ObjectiveLosses]] = {"text": TextLosses, "latent": LatentLosses}
Losses = Annotated[TextLosses | LatentLosses, Field(discriminator="objective")]


def objective_of_student(student: Any) -> str:
    """The objective a student section implies: latent with a student.latent section, else text."""
    latent = student.get("latent") if isinstance(student, dict) else getattr(student, "latent", None)
    return "text" if latent is None else "latent"


def with_objective(raw: dict) -> dict:
    """A raw run config with `losses.objective` filled in where it is left out (`objective_of_student`), and
    the other objective's terms at their defaults dropped (a config written before the split); the rest as it
    is."""
    losses = raw.get("losses", {})
    if not isinstance(losses, dict):
        return raw
    kind = losses.get("objective", objective_of_student(raw.get("student") or {}))
    own = OBJECTIVE_LOSSES.get(kind)
    if own is None:  # an unknown tag: the union reports it
        return raw
    kept = {"objective": kind}
    for key, value in losses.items():
        if key == "objective" or key in own.model_fields or not _at_other_default(kind, key, value):
            kept.setdefault(key, value)
    return {**raw, "losses": kept}


def _at_other_default(kind: str, key: str, value: Any) -> bool:
    """Whether `key` is a term of another objective than `kind`, set to that term's default."""
    for other, cls in OBJECTIVE_LOSSES.items():
        if other == kind or key not in cls.model_fields:
            continue
        try:
            given = cls.model_validate({key: value})
        except ValidationError:
            return False
        return getattr(given, key) == getattr(cls(), key)
    return False


def foreign_key_problem(kind: str, key: str) -> str | None:
    """The problem of losses.`key` in a section of objective `kind` when it is a term of another objective
    (its key and the fix), else None."""
    for other, cls in OBJECTIVE_LOSSES.items():
        if other != kind and key in cls.model_fields:
            own = ", ".join(k for k in OBJECTIVE_LOSSES[kind].model_fields if k != "objective")
            switch = (
                "add a student.latent section (a latent-reasoning student)"
                if other == "latent"
                else "drop the student.latent section (a text student)"
            )
            return (
                f"losses.{key} is a term of the {other} objective, but this run's is {kind} "
                f"(losses.objective; the {kind} objective's terms: {own}): drop losses.{key}, or {switch}"
            )
    return None


def section_of(tag: str) -> type[BaseModel] | None:
    """The losses section class of objective `tag` (a discriminator value in a validation error's
    location)."""
    return OBJECTIVE_LOSSES.get(tag)
