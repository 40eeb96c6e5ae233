"""The run configuration: its sections, each validated when built (pydantic, unknown keys refused), and the
checks across them (`RunConfig`).

Every problem is collected and reported together (`ConfigError.problems`), each naming the key, the value
that is wrong and, for a typo, the nearest valid key. `kvdistill validate CONFIG` prints them all.

Layout of a config (every section optional except `student` and `data`), one module per section::

    student:   {model | from_config, tokenizer, lora, dtype, gradient_checkpointing, latent,   (student)
                upcycle}
    teachers:  - {name, model, source: online|cache, cache_dir, weight, layer_map, projector,      (teachers)
                dtype, skill}
    data:      {source, path, split, subset, fields, template, size | limit, seed, max_length,    (data)
                eval_size, val_size, train_size, skills, mix, train_skills}
    losses:    {objective: text|latent, ce, ... the objective's own terms}                         (objective)
                 text:   kv: {weight, kind, normalize, keys, values, schedule}, cosine,
                         attention_kl, relation, logit_kd, hidden, routing, expert, balance
                 latent: cot_ce, codi, latent_kv
    fusion:    {kind: fixed|similarity|router|confidence, space: loss|target|latent, weights,      (fusion)
                similarity, router, entropy, latent, confidence}
    train:     {steps, batch_size, grad_accum, lr, ..., mixed_precision, seed, save_every,         (train)
                log_every}
"""

from __future__ import annotations

from pydantic import model_validator

from kvdistill.config.data import GENERATED, DataConfig  # noqa: F401 (re-exported: sections of the schema)
from kvdistill.config.fusion import (  # noqa: F401
    ConfidenceConfig,
    EntropyConfig,
    FusionConfig,
    LatentConfig,
    RouterConfig,
    SimilarityConfig,
)
from kvdistill.config.losses import (  # noqa: F401
    CodiConfig,
    ExpertLossConfig,
    KVLossConfig,
    LatentKVConfig,
    LatentTargetConfig,
    LogitKDConfig,
    RoutingLossConfig,
    TemperatureSchedule,
)
from kvdistill.config.objective import LatentLosses, Losses, TextLosses, with_objective  # noqa: F401
from kvdistill.config.section import Section
from kvdistill.config.student import LatentStudentConfig, LoraConfig, StudentConfig, UpcycleConfig  # noqa: F401
from kvdistill.config.teachers import (  # noqa: F401
    CachedLogitsConfig,
    CompressionConfig,
    LayerMapConfig,
    TeacherConfig,
    budget_problems,
)
from kvdistill.config.train import EarlyStoppingConfig, FsdpConfig, OnPolicyConfig, TrainConfig  # noqa: F401
from kvdistill.paths import segment_problem


class RunConfig(Section):
    name: str = "run"
    student: StudentConfig
    teachers: list[TeacherConfig] = []
    data: DataConfig = DataConfig()
    losses: Losses = TextLosses()
    """Which objective the run trains (`objective`: text, or latent for a student with a student.latent
    section; left out: from the student) and that objective's terms (`kvdistill.config.objective`)."""
    fusion: FusionConfig = FusionConfig()
    train: TrainConfig = TrainConfig()

    @model_validator(mode="before")
    @classmethod
    def _objective(cls, data):
        """losses.objective from the student where it is left out
        (`kvdistill.config.objective.with_objective`)."""
        return with_objective(data) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _cross_checks(self):
        problems = []
        problems += [p for p in [segment_problem(self.name, "name")] if p]  # the run's folder in a curriculum
        names = [t.name for t in self.teachers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            problems.append(f"teachers: duplicate names {dupes}; give each teacher a distinct `name`")
        problems += [
            p
            for i, t in enumerate(self.teachers)
            for p in budget_problems(t.compression, self.data.max_length, f"teachers.{i}.compression")
        ]
        problems += self._unread_dtypes()
        if self.fusion.weights is not None and len(self.fusion.weights) != len(self.teachers):
            problems.append(
                f"fusion.weights has {len(self.fusion.weights)} entries but there are {len(self.teachers)} "
                "teachers"
            )
        latent = self.student.latent is not None
        if latent != isinstance(self.losses, LatentLosses):
            problems.append(
                f"losses.objective is {self.losses.objective}, but the student has "
                f"{'a' if latent else 'no'} student.latent section: the latent objective trains a "
                "latent-reasoning student, the text objective a text student; set losses.objective: "
                f"{'latent' if latent else 'text'} (or leave it out), or "
                f"{'drop student.latent' if latent else 'add a student.latent section'}"
            )
        elif latent:
            problems += self._latent_problems()
        else:
            problems += self._text_problems()
        if self.train.compile and (self.fusion.space != "loss" or latent or not self.teachers):
            problems.append(
                f"train.compile compiles the K/V errors of fusion.space loss with teachers and a text "
                f"student; this run (space {self.fusion.space}, {len(self.teachers)} teacher(s), "
                f"{'latent' if latent else 'text'} student) has none to compile: drop train.compile"
            )
        problems += self._selection_problems()
        if self.train.on_policy is not None:
            problems += self._on_policy_problems()
        if self.fusion.kind in ("router", "similarity", "confidence") and len(self.teachers) == 1:
            problems.append(
                f"fusion.kind {self.fusion.kind} weighs teachers against each other, but there is one "
                "teacher: its weight is always 1 and nothing is learned; use fusion.kind: fixed"
            )
        problems += self._skill_problems()
        if self.fusion.kind != "fixed" or self.fusion.weights is not None:
            problems += [
                f"teachers.{n}.weight ({t.weight}) is set but fusion.kind {self.fusion.kind} with "
                f"{'fusion.weights' if self.fusion.weights is not None else 'its own weights'} never reads "
                "it; drop it (or use fusion.kind: fixed without fusion.weights)"
                for n, t in enumerate(self.teachers)
                if t.weight != 1.0
            ]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _unread_dtypes(self) -> list[str]:
        """An online teacher's compression.dtype (a cache's storage dtype) and a cached teacher's dtype (the
        dtype it runs in online, or while `kvdistill extract` writes its cache): neither is read by
        training."""
        problems = []
        for n, t in enumerate(self.teachers):
            if t.source == "online" and t.compression.dtype != CompressionConfig().dtype:
                problems.append(
                    f"teachers.{n}.compression.dtype ({t.compression.dtype}) is the storage dtype of a "
                    f"teacher cache, but teacher '{t.name}' runs online, where its K/V keep the dtype it "
                    f"runs in (teachers.{n}.dtype): drop compression.dtype, or set teachers.{n}.dtype"
                )
            if t.source == "cache" and t.dtype != TeacherConfig.model_fields["dtype"].default:
                problems.append(
                    f"teachers.{n}.dtype ({t.dtype}) is the dtype a teacher runs in, but teacher "
                    f"'{t.name}' is read from its cache, whose K/V come in the dtype they were stored in "
                    f"(teachers.{n}.compression.dtype): drop teachers.{n}.dtype (for `kvdistill "
                    f"extract`, pass it as an override: teachers.{n}.dtype={t.dtype})"
                )
        return problems

    def _text_problems(self) -> list[str]:
        """What the text objective's terms need: a distillation term with teachers, teachers for MoE terms,
        something to train on, and teachers that give what the terms read."""
        c, problems = self.losses, []
        kd_terms = c.kv.weight + c.cosine + c.attention_kl + c.relation + c.logit_kd.weight + c.hidden
        kd_terms += c.routing.weight + c.expert.weight
        if self.teachers and kd_terms == 0:
            problems.append(
                "teachers are given but every distillation loss weight is 0 (losses.kv.weight, ...)"
            )
        moe_terms = [k for k in ("routing", "expert") if getattr(c, k).weight > 0]
        if moe_terms and not self.teachers:
            problems.append(
                f"losses.{'/'.join(moe_terms)} weight is set but there are no teachers to distil from; "
                "add an MoE teacher or set the weight to 0"
            )
        if c.ce == 0 and not self.teachers:
            problems.append("no teachers and losses.ce is 0: nothing to train on")
        return problems + self._teacher_capabilities()

    def _skill_problems(self) -> list[str]:
        labelled = [(n, t.skill) for n, t in enumerate(self.teachers) if t.skill is not None]
        problems = [
            f"teachers.{n}.skill '{skill}' is not among data.skills {self.data.skills}; name one of them "
            "(routing accuracy reads each held-out record's skill), or drop it"
            for n, skill in labelled
            if skill not in self.data.skills
        ]
        skills = [skill for _, skill in labelled]
        problems += [
            f"teachers: skill '{s}' is given to several teachers; one specialist per skill"
            for s in sorted({s for s in skills if skills.count(s) > 1})
        ]
        return problems

    def _selection_problems(self) -> list[str]:
        """train.early_stopping / eval_exact_match / grad_norms_every need what they read."""
        t, problems = self.train, []
        if t.early_stopping is not None:
            if not t.eval_every:
                problems.append(
                    "train.early_stopping selects at evaluations, but train.eval_every is 0; set it "
                    "(e.g. train.eval_every=50)"
                )
            if not self.data.val_size:
                problems.append(
                    "train.early_stopping selects on the validation split, but data.val_size is 0 (the "
                    "test split is never used for selection); set data.val_size (e.g. 256)"
                )
            if t.early_stopping.metric == "exact_match" and not t.eval_exact_match:
                problems.append("train.early_stopping.metric exact_match needs train.eval_exact_match: true")
        if t.eval_cot and not t.eval_exact_match:
            problems.append(
                "train.eval_cot is how train.eval_exact_match decodes, but eval_exact_match is false; "
                "set it or drop eval_cot"
            )
        if t.eval_cot and self.student.latent is not None:
            problems.append(
                "train.eval_cot is for text students; a latent student (student.latent) answers in latent "
                "mode (train.eval_exact_match alone): drop it"
            )
        if t.grad_norms_every and self.losses.ce == 0:
            problems.append(
                "train.grad_norms_every compares the CE gradient with the other terms', but losses.ce is 0"
            )
        return problems

    def _latent_problems(self) -> list[str]:
        """A latent student reads fixed teacher weights and its targets' teachers online, or from caches of
        the latent target; other fusions, compressed online teachers and cached logits are refused (the text
        objective's terms are not in its losses section: `kvdistill.config.objective`)."""
        c, lat = self.losses, self.student.latent
        problems = []
        if self.fusion != FusionConfig():
            problems.append(
                "a latent student combines teachers with fixed weights (teachers.N.weight): drop the "
                "fusion section"
            )
        tgt = c.latent_kv.target
        for n, t in enumerate(self.teachers):
            if t.logits is not None:
                problems.append(
                    f"teachers.{n}.logits (cached top-k log-probabilities) is read by losses.logit_kd of "
                    "a text student; a latent student reads teachers through L_KV only: drop it"
                )
            if t.source == "online" and t.compression != CompressionConfig():
                problems.append(
                    f"teachers.{n} ('{t.name}'): a latent student compresses an online teacher's CoT K/V "
                    "itself (losses.latent_kv.target); drop its compression"
                )
            if t.source == "cache":
                comp = t.compression
                want = dict(
                    kind=tgt.kind,
                    budget=lat.tokens,
                    span="cot",
                    **(
                        dict(lam=tgt.lam, scoring=tgt.scoring, window=tgt.window) if tgt.kind == "rkv" else {}
                    ),
                )
                wrong = {k: v for k, v in want.items() if getattr(comp, k) != v}
                if tgt.kind == "full" or wrong:
                    problems.append(
                        f"teachers.{n} ('{t.name}') is read from a cache, which must hold the latent target: "
                        "compression "
                        f"{', '.join(f'{k}: {v}' for k, v in wrong.items()) or 'right_crop or rkv'} "
                        "(extract it with `kvdistill extract ... teacher.compression.span=cot`); the full "
                        "resampled target is computed online only"
                    )
        if self.teachers and c.latent_kv.weight == 0:
            problems.append(
                "teachers are given but losses.latent_kv.weight is 0: the latent student reads teachers "
                "only through L_KV"
            )
        if c.latent_kv.weight > 0 and not self.teachers and not c.latent_kv.self_teacher:
            problems.append(
                "losses.latent_kv.weight > 0 with self_teacher false and no teachers: no K/V target"
            )
        if c.latent_kv.weight > 0 and lat.tokens == 0:
            problems.append("losses.latent_kv needs latent slots: student.latent.tokens is 0")
        elif (
            c.latent_kv.weight > 0 and tgt.kind == "rkv" and tgt.scoring == "rkv" and lat.tokens <= tgt.window
        ):
            problems.append(
                f"losses.latent_kv.target.scoring rkv keeps R-KV's window of {tgt.window} CoT tokens and "
                f"scores the rest: student.latent.tokens ({lat.tokens}) must exceed it (or lower "
                "losses.latent_kv.target.window)"
            )
        if c.ce == 0 and c.cot_ce == 0 and c.codi.weight == 0 and c.latent_kv.weight == 0:
            problems.append(
                "every latent-student loss weight is 0 (losses.ce, cot_ce, codi.weight, latent_kv.weight)"
            )
        return problems

    def _teacher_capabilities(self) -> list[str]:
        """Terms and fusion spaces that need what only an online, uncompressed teacher gives."""
        c = self.losses
        terms = [
            name
            for name, w in (
                ("losses.relation", c.relation),
                ("losses.attention_kl", c.attention_kl),
                ("losses.hidden", c.hidden),
                ("losses.logit_kd.weight", c.logit_kd.weight),
                ("losses.routing.weight", c.routing.weight),
                ("losses.expert.weight", c.expert.weight),
            )
            if w > 0
        ]
        problems = []
        for n, t in enumerate(self.teachers):
            # logit KD reads a cached teacher's stored top-k log-probabilities (teachers.N.logits)
            online_only = [x for x in terms if not (t.source == "cache" and x == "losses.logit_kd.weight")]
            if online_only and (t.source == "cache" or t.compression.kind != "full"):
                problems.append(
                    f"{', '.join(online_only)} need teacher '{t.name}' (teachers.{n}) online and "
                    f"uncompressed (it is source {t.source}, compression {t.compression.kind}); set those "
                    f"weights to 0 or teachers.{n}.source: online with compression.kind: full"
                )
            problems += self._cached_logit_problems(n, t)
            reads = (
                "fusion.kind confidence"
                if self.fusion.kind == "confidence"
                else "fusion.router.target confidence"
            )
            if self.fusion.scores_teachers and (t.source == "cache" or t.compression.kind != "full"):
                problems.append(
                    f"{reads} scores each sample with teacher '{t.name}''s own logits (teachers.{n}), "
                    f"which needs it online and uncompressed (it is source {t.source}, compression "
                    f"{t.compression.kind}); set teachers.{n}.source: online with compression.kind: full, "
                    "or use another fusion.kind"
                )
            if self.fusion.space != "loss" and t.compression.kind != "full":
                problems.append(
                    f"fusion.space '{self.fusion.space}' needs uncompressed teachers, but teachers.{n} "
                    f"('{t.name}') has compression.kind {t.compression.kind}; use fusion.space: loss "
                    "or compression.kind: full"
                )
        return problems

    def _on_policy_problems(self) -> list[str]:
        """What on-policy distillation cannot work with: a student whose text it cannot sample, teachers that
        cannot see the sampled text, data without a prompt to continue."""
        op, problems = self.train.on_policy, []
        if self.student.latent is not None:
            problems.append(
                "train.on_policy samples a text student's continuations; a latent student (student.latent) "
                "answers through latent tokens: drop train.on_policy"
            )
        if not self.teachers:
            problems.append(
                "train.on_policy has no teachers to score the student's samples: add teachers or drop it"
            )
        for n, t in enumerate(self.teachers):
            if t.compression.span == "cot":
                problems.append(
                    f"train.on_policy: teachers.{n}.compression.span cot keeps the record's chain-of-"
                    "thought tokens, and the student's samples have no chain of thought marked in them: use "
                    "span all, or drop train.on_policy"
                )
            if t.source == "cache":
                problems.append(
                    f"train.on_policy: teacher '{t.name}' (teachers.{n}) is read from a cache, which holds "
                    "K/V (and logits) of the data texts extracted before training; it cannot hold those of "
                    "text the student generates during training: use source: online for it, or drop "
                    "train.on_policy"
                )
        if self.data.source == "text":
            problems.append(
                "train.on_policy continues each record's question (its text up to the end of the "
                "{question} line); data.source text has no question: use template-mode data (question, "
                "cot, answer fields) or a generator"
            )
        if op.lam == 1.0 and self.train.teachers_ahead:
            problems.append(
                "train.teachers_ahead runs the teachers on the data text ahead of the step, but with "
                "train.on_policy.lambda 1 every step scores the student's own text: drop "
                "train.teachers_ahead (or lower lambda)"
            )
        return problems

    def _cached_logit_problems(self, n: int, t: TeacherConfig) -> list[str]:
        """teachers.N.logits: read (and checked against the cache) by logit KD from a cached teacher only; the
        cache must be normalised at every τ the loss takes."""
        kd = self.losses.logit_kd
        problems = []
        if t.source == "cache" and kd.weight > 0 and kd.top_k is None:
            problems.append(
                f"losses.logit_kd reads teacher '{t.name}' (teachers.{n}) from a cache, which holds its "
                "top-k "
                "log-probabilities, not its whole distribution: set losses.logit_kd.top_k (e.g. 64; the "
                "rest of the mass is one tail bucket)"
            )
        if t.logits is None:
            if t.source == "cache" and kd.weight > 0:
                problems.append(
                    f"losses.logit_kd reads teacher '{t.name}' (teachers.{n}) from its cache, which then "
                    f"must hold its top-k log-probabilities: add teachers.{n}.logits (e.g. {{dtype: "
                    f"float16}}) and extract the cache with it (`kvdistill extract CONFIG --teacher "
                    f"{t.name}`), or set losses.logit_kd.weight: 0"
                )
            return problems
        if t.source != "cache":
            return [
                f"teachers.{n}.logits describes what a cache holds and is read for source: cache teachers "
                "only "
                f"('{t.name}' is online, its logits come from its forward); drop it"
            ]
        if kd.weight == 0:
            return [
                f"teachers.{n}.logits is read by losses.logit_kd, whose weight is 0; drop it or set the "
                "weight"
            ]
        if t.logits.top_k is not None and kd.top_k is not None and t.logits.top_k < kd.top_k:
            problems.append(
                f"teachers.{n}.logits.top_k ({t.logits.top_k}) is below losses.logit_kd.top_k "
                f"({kd.top_k}): the cache would hold fewer entries than the loss reads; raise it or drop it"
            )
        needed = kd.temperatures_used()
        if needed is None:
            return problems + [
                "losses.logit_kd.schedule kind linear takes every τ between start and end, but a cache "
                "stores the "
                f"log-probabilities normalised at given temperatures only (teacher '{t.name}', "
                f"teachers.{n}); use schedule kind step or "
                "constant with a cached teacher"
            ]
        missing = sorted(set(needed) - set(t.logits.temperatures or needed))
        if missing:
            return problems + [
                f"teachers.{n}.logits.temperatures {t.logits.temperatures} lacks τ {missing} that "
                "losses.logit_kd "
                f"takes; add them (and re-extract), or drop temperatures to store exactly those of the loss"
            ]
        return problems
