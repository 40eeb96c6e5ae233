"""Every check a run passes before its first step, in one place: `kvdistill validate` and `train` both call
`preflight`, so "ok" from validate means train starts.

What it checks, listing every problem together (each naming the key and the fix):

- the config's semantic checks (`kvdistill.config.semantic_problems`): models found, from_config students and
  teachers built through their family's config class (heads, widths, KV heads; the model built on the meta
  device, no weights), layer maps possible, caches present, K/V capturable, logit KD tokenizers;
- learning rates AdamW can use (also for configs built in code, which skip the schema's bounds);
- the data: both splits read as training reads them (a field that is not a column, an empty file, too few
records
  for data.eval_size, ...), returned so that training does not read them twice;
- an online teacher's kept layers (compression.layers) holding every layer its layer map reads;
- a latent student's records cut into question / CoT / answer (`kvdistill.data.segments`);
- with train.on_policy, every training record's prompt (its text up to the {question} line,
  `kvdistill.data.template.question_prompt`);
- data.max_length within every model's position table;
- train.distributed fsdp's refusals (`kvdistill.train.distributed.fsdp_problems`);
- the estimated peak memory per process (`kvdistill.train.memory.estimate_note`): a note, a warning where it
will
  not fit the device seen;
- and it counts the records data.max_length truncates for each model (the student and every online teacher,
each
  in its own tokenization or chat template): a note, not a problem.

Nothing here writes anything or loads weights.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

from kvdistill.config import RunConfig, TrainConfig, semantic_problems
from kvdistill.errors import KvdistillError


@dataclass
class Checked:
    """The problems found (empty: the run can start), the records of both splits (empty where unreadable),
    notes on the models (sizes a from_config spec re-derived, `kvdistill.models.from_config`; logged where the
    model is built) and on the data (records data.max_length truncates)."""

    problems: list[str]
    model_notes: list[str] = field(default_factory=list)
    data_notes: list[str] = field(default_factory=list)
    train_records: list[dict] = field(default_factory=list)
    eval_records: list[dict] = field(default_factory=list)


def preflight(cfg: RunConfig, *, dataset=None) -> Checked:
    """Every check of `cfg` that training runs before its first step; `dataset`: an in-memory
    `datasets.Dataset` for the data section (Python API)."""
    from kvdistill.data import load_records
    from kvdistill.train.distributed import fsdp_problems

    problems = semantic_problems(cfg) + learning_rate_problems(cfg) + fsdp_problems(cfg)
    train_records: list[dict] = []
    eval_records: list[dict] = []
    try:
        train_records = load_records(cfg.data, split="train", dataset=dataset)
        # training's held-out figures: the validation split where there is one (the test split is left to the
        # final scoring), else the eval split
        held_split = "val" if cfg.data.val_size else "eval"
        if cfg.data.val_size or cfg.data.eval_size:
            eval_records = load_records(cfg.data, split=held_split, dataset=dataset)
    except KvdistillError as err:
        problems.append(_as_problem(err))
    if cfg.student.latent is not None and train_records:  # what the latent objective cuts every record into
        from kvdistill.data.segments import segments

        try:
            for record in train_records[:1] + eval_records[:1]:
                segments(record, cfg.data.template)
        except KvdistillError as err:
            problems.append(_as_problem(err))
    if (
        cfg.train.on_policy is not None and train_records
    ):  # the prompt an on-policy student continues, per record
        from kvdistill.data.template import question_prompt

        try:
            for record in train_records:
                question_prompt(record, cfg.data.template)
        except KvdistillError as err:
            problems.append(_as_problem(err))
    data_notes = []
    if not problems:
        problems += _position_problems(cfg) + _kept_layer_problems(cfg)
        try:
            data_notes = _truncation_notes(cfg, train_records + eval_records)
        except KvdistillError as err:  # e.g. a tokenizer without a chat template for messages data
            problems.append(_as_problem(err))
    notes = _notes(cfg) + ([] if problems else _memory_notes(cfg))
    return Checked(problems, notes, data_notes, train_records, eval_records)


def _memory_notes(cfg: RunConfig) -> list[str]:
    """The estimated peak memory per process (`kvdistill.train.memory.estimate_note`) on WORLD_SIZE processes
    (launched), else one per visible GPU; a warning where it exceeds the device."""
    import os

    import torch

    from kvdistill.train.memory import device_memory, estimate_note

    world = int(os.environ.get("WORLD_SIZE") or max(1, torch.cuda.device_count()))
    size, name = device_memory()
    try:
        line, over = estimate_note(cfg, world, size, name)
    except (KvdistillError, OSError, ValueError) as err:  # a model the estimate cannot build: no estimate
        return [f"no memory estimate ({type(err).__name__}: {err})"]
    return [("WARNING: " if over else "") + line]


def _truncation_notes(cfg: RunConfig, records: list[dict]) -> list[str]:
    """'data.max_length = L truncates n of N records for the student (the longest: M tokens)', per model."""
    from kvdistill.models.load import load_tokenizer
    from kvdistill.models.tokenization import token_counts

    s = cfg.student
    models = [("the student", s.tokenizer or s.model or s.from_config.get("base"))]
    models += [
        (f"teacher '{t.name}'", t.model or t.tokenizer or t.from_config.get("base"))
        for t in cfg.teachers
        if t.source == "online"
    ]
    texts = [r["text"] for r in records]
    notes = []
    for who, name in models:
        counts = token_counts(load_tokenizer(name), texts)
        over = [c for c in counts if c > cfg.data.max_length]
        if over:
            notes.append(
                f"data.max_length = {cfg.data.max_length} truncates {len(over)} of {len(counts)} records "
                f"for {who} (the longest: {max(over)} tokens)"
            )
    return notes


def _kept_layer_problems(cfg: RunConfig) -> list[str]:
    """An online teacher that keeps only some layers (compression.layers) must keep every layer its layer map
    reads (what the objective checks when it is built, here from the configs)."""
    from kvdistill.align.layers import layer_map
    from kvdistill.config.load import _num_layers, _student_layers, teacher_hf_config

    subsets = [
        (i, t)
        for i, t in enumerate(cfg.teachers)
        if t.source == "online" and t.compression.layers is not None
    ]
    if not subsets or cfg.student.latent is not None:
        return []
    student_layers = _student_layers(cfg.student, [])
    problems = []
    for i, t in subsets:
        teacher_layers = _num_layers(teacher_hf_config(t, key=f"teachers[{i}].from_config"))
        if student_layers is None or teacher_layers is None:
            continue
        lm = t.layer_map
        matrix = layer_map(
            student_layers,
            teacher_layers,
            strategy=lm.strategy,
            explicit=lm.explicit,
            interpolate=lm.interpolate,
        )  # (L_s, L_t)
        read = sorted(int(j) for j in (matrix.sum(0) > 0).nonzero().flatten())
        missing = sorted(set(read) - set(t.compression.layers))
        if missing:
            problems.append(
                f"teachers[{i}] ({t.name}).compression.layers {t.compression.layers} leaves out layers "
                f"{missing} that its layer map ({lm.strategy}) reads; fix: keep them in "
                f"compression.layers (e.g. {read}) or change the layer_map"
            )
    return problems


def _notes(cfg: RunConfig) -> list[str]:
    from kvdistill.models.from_config import hf_config_from_spec

    specs = [("student.from_config", cfg.student.from_config)]
    specs += [(f"teachers[{i}].from_config", t.from_config) for i, t in enumerate(cfg.teachers)]
    notes = []
    for key, spec in specs:
        if spec is not None:
            with contextlib.suppress(KvdistillError):  # a problem already listed
                notes += [f"{key}: {n}" for n in hf_config_from_spec(spec, key=key)[1]]
    return notes


def _as_problem(err: KvdistillError) -> str:
    return err.problem + (f"; fix: {err.fix}" if err.fix else "")


def learning_rate_problems(cfg: RunConfig) -> list[str]:
    """Learning rates AdamW cannot use: AdamW moves every weight by about lr per step, and above float32's
    range the update itself overflows."""
    limit = next(m.le for m in TrainConfig.model_fields["lr"].metadata if getattr(m, "le", None) is not None)
    return [
        f"{key} = {value:g}: not a learning rate AdamW can use (it moves every weight by about lr per step); "
        f"give a finite value above 0 and at most {limit:g}, e.g. 3e-4"
        for key, value in (("train.lr", cfg.train.lr), ("train.projector_lr", cfg.train.projector_lr))
        if value is not None and not (math.isfinite(value) and 0 < value <= limit)
    ]


def position_problems(models: list[tuple[str, object]], max_length: int) -> list[str]:
    """data.max_length longer than a model's position table: models are (who, KVGeometry)."""
    short = [(who, g.max_positions) for who, g in models if g.max_positions and g.max_positions < max_length]
    if not short:
        return []
    limit = min(m for _, m in short)
    return [
        f"data.max_length = {max_length} is longer than the maximum positions of "
        + ", ".join(f"{who} ({m})" for who, m in short)
        + f"; set data.max_length to at most {limit} (texts are truncated to it), or use models with longer "
        "contexts"
    ]


def _position_problems(cfg: RunConfig) -> list[str]:
    """`position_problems` from the models' configs (config.json or the from_config spec; no weights)."""
    from kvdistill.config.load import teacher_hf_config
    from kvdistill.models.from_config import hf_config_from_spec
    from kvdistill.models.geometry import geometry_of
    from kvdistill.models.load import load_config

    s = cfg.student
    try:
        models = [
            (
                "student",
                geometry_of(load_config(s.model) if s.model else hf_config_from_spec(s.from_config)[0]),
            )
        ]
        models += [
            (f"teacher '{t.name}'", geometry_of(teacher_hf_config(t, key=f"teachers[{i}].from_config")))
            for i, t in enumerate(cfg.teachers)
            if t.source == "online"
        ]
    except KvdistillError:  # reported by semantic_problems already
        return []
    return position_problems(models, cfg.data.max_length)
