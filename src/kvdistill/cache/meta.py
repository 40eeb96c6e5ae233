"""What a cache of a teacher over a dataset holds, derived from their configs alone (no weights): the
teacher's `TeacherSpec` (id, KV geometry, built compression, stored layers, logits) and the cache's meta
(`expected_meta`: teacher id and geometry, tokenizer fingerprint, compression, the dataset fingerprint of the
records' ids and texts and `data.max_length`). Extraction writes this meta (`kvdistill.cache.extract`);
training's open of a cached teacher (`kvdistill.cache.reader.open_teacher_cache`) rebuilds it from the run's
config and refuses a cache that differs, naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvdistill.cache.manifest import fingerprint_records, fingerprint_tokenizer, make_meta
from kvdistill.config import DataConfig, LogitKDConfig, TeacherConfig
from kvdistill.errors import KvdistillError

if TYPE_CHECKING:
    from kvdistill.compress import Compression
    from kvdistill.models.geometry import KVGeometry
    from kvdistill.teachers.logits import LogitSpec


def dataset_records(data_cfg: DataConfig) -> list[dict]:
    """Every record training can ask a teacher for: eval split + train split, in load order."""
    from kvdistill.data import load_records

    # with no held-out splits and no cap the train split is every record, in the same order as eval + val +
    # train
    records = load_records(
        data_cfg.model_copy(update={"eval_size": 0, "val_size": 0, "train_size": None}), split="train"
    )
    seen: set[str] = set()
    dupes = sorted({str(r["id"]) for r in records if str(r["id"]) in seen or seen.add(str(r["id"]))})
    if dupes:
        raise KvdistillError(
            f"the data holds ids {dupes[:5]} more than once, so a cache cannot tell those records apart",
            "give every record a distinct id",
        )
    return records


def dataset_fingerprint(records: list[dict], max_length: int) -> str:
    """`max_length=<n>:<fingerprint_records>`: truncation changes the stored K/V as much as the texts do."""
    return f"max_length={int(max_length)}:{fingerprint_records(records)}"


def teacher_id(model: str) -> str:
    """The id a cache records for a teacher: the zoo name for offline models (aliases folded), the resolved
    path for local directories, the hub id otherwise."""
    from kvdistill.models import zoo

    entry = zoo.resolve_name(model)
    if entry is not None:
        return entry.name
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else str(model).rstrip("/")


@dataclass
class TeacherSpec:
    """What an extraction (or a cache check) knows of a teacher without its weights, derived once by
    `teacher_spec`: the id a cache records, the KV geometry of its config.json, the built compression and the
    stored layers (`compression.resolve_layers`)."""

    id: str
    geometry: KVGeometry
    compression: Compression
    layers: list[int]
    logits: LogitSpec | None = None


def logit_spec(
    teacher_cfg: TeacherConfig, geometry: KVGeometry, logit_kd: LogitKDConfig | None
) -> LogitSpec | None:
    """What a cache of `teacher_cfg` holds of its logits (None: no logits section); top_k and temperatures
    from the section, else from `logit_kd` (the run's losses.logit_kd; None: its defaults)."""
    from kvdistill.teachers.logits import LogitSpec

    section = teacher_cfg.logits
    if section is None:
        return None
    temps = section.resolved(logit_kd)
    k = section.top_k if section.top_k is not None else (logit_kd.top_k if logit_kd is not None else None)
    if k is None:
        raise KvdistillError(
            f"teacher '{teacher_cfg.name}': how many log-probabilities to store is not given",
            "set teachers.N.logits.top_k (`--logits-top-k`) or losses.logit_kd.top_k",
        )
    if temps is None:
        raise KvdistillError(
            f"teacher '{teacher_cfg.name}': losses.logit_kd has a linear τ schedule, and a cache stores "
            "log-probabilities "
            "at given temperatures only",
            "set teachers.N.logits.temperatures (`--logits-temperatures`), or use a step / constant schedule",
        )
    return LogitSpec(k, section.dtype, tuple(temps), int(geometry.vocab_size))


def teacher_spec(teacher_cfg: TeacherConfig, logit_kd: LogitKDConfig | None = None) -> TeacherSpec:
    """The `TeacherSpec` of `teacher_cfg`, from its config.json only; layers out of range: an error naming
    them. logit_kd: the run's losses.logit_kd, whose temperatures a logits section without its own stores."""
    from kvdistill.models.geometry import geometry_of
    from kvdistill.models.load import load_config

    tid = teacher_id(teacher_cfg.model)
    geometry = geometry_of(load_config(teacher_cfg.model), name=tid)
    compression = teacher_cfg.compression.build()
    return TeacherSpec(
        tid,
        geometry,
        compression,
        compression.resolve_layers(geometry.num_layers),
        logit_spec(teacher_cfg, geometry, logit_kd),
    )


def expected_meta(
    teacher_cfg: TeacherConfig,
    data_cfg: DataConfig,
    *,
    records: list[dict] | None = None,
    tokenizer=None,
    spec: TeacherSpec | None = None,
    logit_kd: LogitKDConfig | None = None,
) -> dict[str, Any]:
    """The meta of a cache of `teacher_cfg` over `data_cfg`, from the teacher's config.json and tokenizer only
    (no weights). `records` / `tokenizer` / `spec`: already loaded or derived ones (the tokenizer must be the
    teacher's, the spec `teacher_spec(teacher_cfg, logit_kd)`)."""
    from kvdistill.models.load import load_tokenizer

    spec = spec if spec is not None else teacher_spec(teacher_cfg, logit_kd)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(teacher_cfg.model)
    records = records if records is not None else dataset_records(data_cfg)
    return make_meta(
        spec.id,
        spec.geometry.to_dict(),
        fingerprint_tokenizer(tokenizer),
        spec.compression.to_dict(),
        dataset_fingerprint(records, data_cfg.max_length),
        logits=None if spec.logits is None else spec.logits.to_dict(),
    )
