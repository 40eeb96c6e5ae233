"""Loading a run configuration: YAML file + dotted command-line overrides, validated when loaded.

Every problem is collected and reported together (`ConfigError.problems`), each naming the key, the value that
is wrong and, for a typo, the nearest valid key. `kvdistill validate CONFIG` prints them all;
`semantic_problems` adds the checks that need the models' configs.
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from kvdistill.config.objective import foreign_key_problem
from kvdistill.config.problems import validation_problems
from kvdistill.config.schema import GENERATED, DataConfig, RunConfig, StudentConfig, TeacherConfig
from kvdistill.errors import ConfigError, KvdistillError


# ---------------------------------------------------------------------------------------------- loading
def _parse_scalar(text: str) -> Any:
    """An override's value as YAML (`3`, `1e-4`, `[0, 1]`, `true`); text that is not YAML (a path such as
    `[red]x.jsonl`) is the string itself."""
    if not text.strip():
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (YAML-parsed values; `teachers.0.weight=2` indexes lists); `~a.b.c`
    removes a key (back to its default), e.g. `~data.size` when `data.source=jsonl` replaces a generator."""
    for item in overrides:
        if item.startswith("~") and "=" not in item:
            _remove_key(raw, item[1:].strip())
            continue
        if "=" not in item:
            raise ConfigError([f"override '{item}' is not of the form key.path=value"], source="overrides")
        path, value = item.split("=", 1)
        parts = path.strip().split(".")
        node: Any = raw
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(
                        [f"override '{path}': index '{part}' out of range (list has {len(node)} items)"],
                        source="overrides",
                    )
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


def _remove_key(raw: dict, path: str) -> None:
    node: Any = raw
    parts = path.split(".")
    for part in parts[:-1]:
        node = (
            node[int(part)]
            if isinstance(node, list) and part.isdigit() and int(part) < len(node)
            else (node.get(part) if isinstance(node, dict) else None)
        )
        if node is None:
            raise ConfigError(
                [f"override '~{path}': there is no '{part}' to remove a key from"], source="overrides"
            )
    if not isinstance(node, dict) or parts[-1] not in node:
        raise ConfigError([f"override '~{path}': the config sets no '{path}'"], source="overrides")
    del node[parts[-1]]


def merge_data(base: dict | None, changes: dict) -> dict:
    """A raw data section with `changes` applied. Changing `source` to another kind drops the keys only the
    old kind reads and `changes` does not set (a generator's size and path; a file's or dataset's limit,
    split, subset; the skill mixture's skills, mix, train_skills), so a run that swaps a generator for a file
    is not refused over the generator's leftover size."""
    base = dict(base or {})
    merged = {**base, **changes}
    if "source" in changes and changes["source"] != base.get("source", "gsm_symbolic"):
        generated = merged["source"] in GENERATED
        stale = ("limit", "split", "subset", "path") if generated else ("size",)
        if merged["source"] != "skills":
            stale += ("skills", "mix", "train_skills")
        for key in stale:
            if key not in changes:
                merged.pop(key, None)
    return merged


def parse_config(raw: dict, source: str = "config") -> RunConfig:
    """Validate a raw mapping; raises ConfigError listing every problem."""
    if not isinstance(raw, dict):
        raise ConfigError([f"top level must be a mapping, got {type(raw).__name__}"], source=source)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(
            validation_problems(err, RunConfig, unknown=foreign_key_problem), source=source
        ) from None


def read_raw(path: str | Path, overrides: list[str] | None = None) -> dict:
    """The mapping in a YAML config file with dotted overrides applied (not validated)."""
    p = Path(path)
    if not p.is_file():
        raise KvdistillError(
            f"config file '{path}' does not exist", "check the path (ready configs: configs/*.yaml)"
        )
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError([f"not valid YAML: {err}"], source=str(path)) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"top level must be a mapping, got {type(raw).__name__}"], source=str(path))
    return apply_overrides(raw, overrides or [])


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, raw: dict | None = None
) -> RunConfig:
    """Load a YAML config (or a raw mapping), apply dotted overrides, validate."""
    if raw is None:
        if path is None:
            raise KvdistillError("no config given", "pass a YAML file, e.g. configs/phase1.yaml")
        return parse_config(read_raw(path, overrides), source=str(path))
    raw = apply_overrides(dict(raw), overrides or [])
    return parse_config(raw, source=str(path) if path else "config")


def dump_config(config: RunConfig) -> str:
    """YAML of the whole config, every default spelled out (what DIR/config.yaml holds), such that reloading
    it means exactly the same run: a field whose being set decides something (`Section.presence_fields`, e.g.
    text vs template mode of a data file) is written only where it was set."""
    return yaml.safe_dump(resolved_dict(config), sort_keys=False, allow_unicode=True)


def resolved_dict(section: BaseModel) -> dict:
    """`section.model_dump(mode="json")` without the presence fields (`Section.presence_fields`) left
    unset."""
    out = section.model_dump(mode="json")
    _drop_unset_presence(section, out)
    return out


def _drop_unset_presence(section: BaseModel, dumped: dict) -> None:
    for name in type(section).model_fields:
        value = getattr(section, name)
        if name in getattr(type(section), "presence_fields", ()) and name not in section.model_fields_set:
            dumped.pop(name, None)
        elif isinstance(value, BaseModel) and isinstance(dumped.get(name), dict):
            _drop_unset_presence(value, dumped[name])
        elif isinstance(value, list) and isinstance(dumped.get(name), list):
            for item, raw in zip(value, dumped[name], strict=True):
                if isinstance(item, BaseModel) and isinstance(raw, dict):
                    _drop_unset_presence(item, raw)


def _absolute(value: Any) -> Any:
    """A relative path that exists here as an absolute one; anything else (a zoo name, a hub id) unchanged."""
    if not isinstance(value, str) or not value or Path(value).is_absolute():
        return value
    path = Path(value).expanduser()
    return os.path.abspath(path) if path.exists() else value


def resolve_paths(config: RunConfig) -> RunConfig:
    """The config with every local path made absolute (data.path, models, tokenizers, from_config bases and
    cache directories that exist relative to the working directory), so that the run's config.yaml means the
    same run from any directory. Names that are not local paths (offline zoo names, hub ids) are kept."""
    raw = resolved_dict(config)
    if raw["data"].get("path"):
        raw["data"]["path"] = _absolute(raw["data"]["path"])
    for entry in [raw["student"], *raw["teachers"]]:
        for key in ("model", "tokenizer", "cache_dir"):
            if entry.get(key):
                entry[key] = _absolute(entry[key])
        if isinstance(entry.get("from_config"), dict) and "base" in entry["from_config"]:
            entry["from_config"]["base"] = _absolute(entry["from_config"]["base"])
    return parse_config(raw, source=f"config '{config.name}'")


def semantic_problems(config: RunConfig) -> list[str]:
    """Checks that need the models' configs (not weights): teacher found, layer map possible, cache present.

    Loads only `config.json` of each model, so it is fast; returns the problems (empty list when all is well).
    """
    problems: list[str] = []
    student_layers = _student_layers(config.student, problems)
    for i, t in enumerate(config.teachers):
        problems += _teacher_problems(i, t, student_layers)
    problems += _data_problems(config.data) + tracker_problems(config)
    if not problems:  # what training checks when it builds the objective, so that "ok" means the run starts
        problems += _capture_problems(config) + _logit_problems(config)
    return problems


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


def tracker_problems(config: RunConfig) -> list[str]:
    """A tracker of train.report_to whose package is not installed here, with the pip command."""
    import importlib.util

    missing = [
        name for name in config.train.trackers if importlib.util.find_spec(TRACKER_PACKAGES[name]) is None
    ]
    return [
        f"train.report_to: {name} is not installed here; run `pip install {TRACKER_PACKAGES[name]}` (or "
        f"`pip install 'kvdistill[trackers]'`), or drop '{name}' from train.report_to"
        for name in missing
    ]


def _capture_problems(config: RunConfig) -> list[str]:
    """Every online model's K/V geometry can be derived (its family is capturable), from config.json only."""
    from kvdistill.models.geometry import geometry_of
    from kvdistill.models.load import load_config as load_hf_config

    models = [("student.model", config.student.model)] if config.student.model else []
    models += [
        (f"teachers[{i}] ({t.name}).model", t.model)
        for i, t in enumerate(config.teachers)
        if t.source == "online" and t.model is not None
    ]
    problems = []
    for key, model in models:
        try:
            geometry_of(load_hf_config(model))
        except KvdistillError as err:
            problems.append(f"{key}: {err.problem}")
    return problems


def _logit_problems(config: RunConfig) -> list[str]:
    """What logit KD cannot do with a teacher (what the objective refuses): an encoder has no next-token
    logits; a tokenizer that shares no token string with the student's has no event to compare
    (`shared_vocabulary`); top_k must be below each vocabulary; cross_tokenizer is read only where a teacher
    has another tokenizer."""
    if not config.losses.teacher_logits:
        return []
    c = config.losses.logit_kd
    from kvdistill.align.vocab import shared_vocabulary
    from kvdistill.models.geometry import geometry_of
    from kvdistill.models.load import load_config as load_hf_config
    from kvdistill.models.load import load_tokenizer

    student = config.student
    try:
        s_tok = load_tokenizer(student.tokenizer or student.model or student.from_config.get("base"))
    except KvdistillError as err:
        return [f"student tokenizer: {err.problem}"]
    problems, cross = [], False
    for i, t in enumerate(config.teachers):
        if t.source != "online":
            continue
        if t.model is not None and geometry_of(load_hf_config(t.model)).is_encoder:
            problems.append(
                f"losses.logit_kd needs next-token logits, but teachers[{i}] ({t.name}) is an encoder; "
                "set losses.logit_kd.weight: 0 or drop that teacher (its K/V still align by bytes)"
            )
            continue
        t_tok = load_tokenizer(t.model or t.tokenizer or t.from_config.get("base"))
        if c.top_k is not None and c.top_k >= len(t_tok):
            problems.append(
                f"losses.logit_kd.top_k ({c.top_k}) must be below teachers[{i}] ({t.name})'s vocabulary "
                f"of {len(t_tok)}; lower it or drop top_k"
            )
        if t_tok.get_vocab() == s_tok.get_vocab():
            continue
        cross = True
        if c.cross_tokenizer == "project":
            try:
                shared_vocabulary(s_tok, t_tok, len(s_tok), len(t_tok), t.name)
            except KvdistillError as err:
                problems.append(f"losses.logit_kd with teachers[{i}] ({t.name}): {err.problem}; {err.fix}")
    if not cross and "cross_tokenizer" in c.model_fields_set:
        problems.append(
            "losses.logit_kd.cross_tokenizer is set but every online teacher shares the student's "
            "tokenizer (their exact same-vocabulary term never reads it); drop it"
        )
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
        from kvdistill.models.from_config import hf_config_from_spec

        return _num_layers(hf_config_from_spec(student.from_config, key="student.from_config")[0])
    except KvdistillError as err:
        problems.append(err.problem if err.problem.startswith("student") else f"student: {err.problem}")
        if err.fix:
            problems[-1] += f"; fix: {err.fix}"
        return None


def _num_layers(hf_config) -> int | None:
    """Layer count from a transformers config, whatever the family calls it."""
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(hf_config, attr, None), int):
            return getattr(hf_config, attr)
    return None


def teacher_hf_config(t: TeacherConfig, key: str = "teacher.from_config"):
    """A teacher's transformers config: its model's config.json, or the one its from_config builds
    (`kvdistill.models.from_config`, checked as a student's is)."""
    from kvdistill.models.load import load_config as load_hf_config

    if t.model is not None:
        return load_hf_config(t.model)
    from kvdistill.models.from_config import hf_config_from_spec

    return hf_config_from_spec(t.from_config, key=key)[0]


def _teacher_problems(i: int, t: TeacherConfig, student_layers: int | None) -> list[str]:
    """Teacher i found (online: its config.json; cache: a manifest) and its layer map buildable."""
    from kvdistill.align.layers import layer_map

    key = f"teachers[{i}] ({t.name})"
    if t.source == "cache":
        if not (Path(t.cache_dir) / "manifest.json").is_file():
            return [f"{key}.cache_dir: '{t.cache_dir}' holds no manifest.json; run `kvdistill extract` first"]
        return []
    try:
        teacher_layers = _num_layers(teacher_hf_config(t, key=f"teachers[{i}].from_config"))
    except KvdistillError as err:
        if t.model is None:
            return [err.problem + (f"; fix: {err.fix}" if err.fix else "")]
        return [f"{key}.model: {err.problem}"]
    lm = t.layer_map
    if teacher_layers is None:
        return []
    if student_layers is None:  # student unknown: only the teacher side of an explicit map can be checked
        flat = [x for e in lm.explicit or [] for x in (e if isinstance(e, list) else [e])]
        bad = [x for x in flat if not -1 <= x < teacher_layers]
        return (
            [f"{key}.layer_map.explicit: teacher layers {bad} outside 0..{teacher_layers - 1}"] if bad else []
        )
    try:
        layer_map(
            student_layers,
            teacher_layers,
            strategy=lm.strategy,
            explicit=lm.explicit,
            interpolate=lm.interpolate,
        )
    except KvdistillError as err:
        return [
            f"{key}.layer_map ({lm.strategy}, student {student_layers} layers, teacher {teacher_layers}): "
            f"{err.problem}"
        ]
    return []


def _data_problems(data: DataConfig) -> list[str]:
    if data.source not in (*GENERATED, "hf") and data.path and not Path(data.path).exists():
        return [f"data.path: '{data.path}' does not exist"]
    return []


def packaged_file(name: str, folder: str = "", what: str = "config") -> Path:
    """`configs/[folder/]NAME.yaml` shipped with kvdistill; a KvdistillError lists the names there."""
    directory = files("kvdistill") / "configs"
    directory = directory / folder if folder else directory
    packaged = directory / f"{name.removesuffix('.yaml')}.yaml"
    if packaged.is_file():
        return Path(str(packaged))
    names = sorted(p.name.removesuffix(".yaml") for p in directory.iterdir() if p.name.endswith(".yaml"))
    raise KvdistillError(
        f"{what} '{name}' is neither a file nor a packaged {what.split()[-1]}",
        f"give a YAML path or one of: {', '.join(names)}",
    )


def config_path(config: str, folder: str = "", what: str = "config") -> Path:
    """A path, or the name of a packaged config (quickstart, phase1 … phase5; with `folder` experiments, a
    packaged experiment spec)."""
    if Path(config).is_file():
        return Path(config)
    return packaged_file(config, folder, what)
