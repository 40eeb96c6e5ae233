"""Building an objective from a run config: the student, its teachers (online models or caches), the
objective."""

from __future__ import annotations

import torch

from kvdistill.cache.reader import open_teacher_cache
from kvdistill.config import StudentConfig
from kvdistill.models.geometry import geometry_of
from kvdistill.models.load import (
    attn_implementation_for,
    load_config,
    load_model,
    load_tokenizer,
    resolve_dtype,
)
from kvdistill.models.queries import supports_queries
from kvdistill.objectives.base import TrainingObjective
from kvdistill.objectives.kava import KavaObjective
from kvdistill.objectives.text import TextObjective
from kvdistill.student import build_student, unwrap_student
from kvdistill.student.latent import LatentHead, LatentStudent, embedding_rms
from kvdistill.teachers import CachedTeacher, OnlineTeacher


def build_teachers(cfg, device) -> list:
    """The teachers of `cfg`, in order: a `CachedTeacher` for source cache (refused unless it matches the
    run), else an `OnlineTeacher` loaded with the attention kernel its losses need."""
    teachers = []
    on_gpu = torch.device(device).type == "cuda"
    for i, tcfg in enumerate(cfg.teachers):
        if tcfg.source == "cache":
            # refused unless it holds this run's teacher, tokenizer, compression and data (and the logits it
            # reads)
            reader = open_teacher_cache(
                tcfg, cfg.data, cfg.losses.logit_kd if cfg.losses.objective == "text" else None
            )
            # its tokenizer (no weights; the cache's fingerprint was checked against it): logit KD aligns with
            # it
            tok = load_tokenizer(tcfg.model) if cfg.losses.teacher_logits else None
            teachers.append(CachedTeacher(tcfg.name, reader, tok))
            continue
        dtype = tcfg.dtype if tcfg.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
        comp = tcfg.compression
        # a latent student's R-KV target reads the teachers' attention too (kvdistill.objectives.kava)
        reads_rkv = comp.kind == "rkv" or _latent_rkv(cfg)
        # attention probabilities are read for attention_kl, and by rkv for families whose importance cannot
        # come from hooked queries (models.queries); sdpa otherwise
        if (
            tcfg.from_config is not None
        ):  # a randomly initialised teacher (seed 0), eager attention where read
            model, tok = build_student(
                StudentConfig(from_config=tcfg.from_config, tokenizer=tcfg.tokenizer, dtype=dtype),
                seed=0,
                attentions=cfg.losses.teacher_attentions or reads_rkv,
                key=f"teachers[{i}].from_config",
            )
            model.to(resolve_dtype(dtype))
            teachers.append(
                OnlineTeacher(
                    tcfg.name,
                    model,
                    tok,
                    layers=comp.layers,
                    compression=comp.build() if comp.kind != "full" else None,
                )
            )
            continue
        rkv_attn = reads_rkv and not supports_queries(geometry_of(load_config(tcfg.model)))
        attn = attn_implementation_for(cfg.losses.teacher_attentions or rkv_attn)
        model, tok = load_model(tcfg.model, dtype=dtype, attn_implementation=attn)
        teachers.append(
            OnlineTeacher(
                tcfg.name,
                model,
                tok,
                compression=comp.build() if comp.kind != "full" else None,
                layers=comp.layers,
            )
        )
    return teachers


def _latent_rkv(cfg) -> bool:
    return cfg.losses.objective == "latent" and cfg.losses.latent_kv.target.kind == "rkv"


def build_objective(cfg, device="cpu", *, init_student: str | None = None) -> TrainingObjective:
    """The student (from its config, or `init_student`), the teachers and the objective of `cfg` on
    `device`."""
    student_cfg = cfg.student
    if init_student is not None:
        student_cfg = student_cfg.model_copy(
            update={"model": str(init_student), "from_config": None, "tokenizer": None}
        )
    return OBJECTIVES[cfg.losses.objective](cfg, student_cfg, device)


def _build_text(cfg, student_cfg, device) -> TextObjective:
    """A text student and its teachers."""
    student, tokenizer = build_student(
        student_cfg, seed=cfg.train.seed, attentions=cfg.losses.attention_kl > 0
    )
    teachers = build_teachers(cfg, device)
    torch.manual_seed(cfg.train.seed + 1)  # projector / router init independent of how the student was built
    return TextObjective(cfg, student, tokenizer, teachers, device)


def _build_kava(cfg, student_cfg, device) -> KavaObjective:
    """A latent student (backbone + latent head) and its teachers. The backbone runs eager attention when its
    own R-KV target needs attention probabilities its queries cannot give (models.queries)."""
    lat = cfg.student.latent
    self_rkv = _latent_rkv(cfg) and cfg.losses.latent_kv.weight > 0 and cfg.losses.latent_kv.self_teacher
    backbone, tokenizer = build_student(student_cfg, seed=cfg.train.seed)
    if self_rkv and not supports_queries(
        geometry_of(unwrap_student(backbone))
    ):  # rebuilt (same seed) with eager
        backbone, tokenizer = build_student(student_cfg, seed=cfg.train.seed, attentions=True)
    torch.manual_seed(cfg.train.seed + 2)  # the head's init independent of how the backbone was built
    hidden = backbone.get_input_embeddings().embedding_dim
    rms = embedding_rms(backbone) if lat.head == "embed_norm" else None
    student = LatentStudent(
        backbone, LatentHead(hidden, lat.tokens, lat.projection, head=lat.head, embed_rms=rms), lat.iterations
    )
    teachers = build_teachers(cfg, device)
    torch.manual_seed(cfg.train.seed + 1)
    return KavaObjective(cfg, student, tokenizer, teachers, device)


OBJECTIVES = {
    "text": _build_text,
    "latent": _build_kava,
}  # objective kind -> builder (cfg, student_cfg, device)
