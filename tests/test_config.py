"""Config loading: defaults, dotted overrides, and every problem reported at once with suggestions."""

from __future__ import annotations

import pytest

from kvdistill.config import apply_overrides, dump_config, load_config, parse_config
from kvdistill.errors import ConfigError, KvdistillError

BASE = {"student": {"model": "smollm2-135m"}, "teachers": [{"model": "gemma3-270m"}]}


def test_defaults_and_teacher_name():
    cfg = parse_config(BASE)
    assert cfg.teachers[0].name == "gemma3-270m"
    assert cfg.train.steps == 100 and cfg.fusion.kind == "fixed"


def test_teacher_names_never_hold_a_dot():
    # Names key torch modules and buffers, which refuse '.'.
    cfg = parse_config({**BASE, "teachers": [{"model": "Qwen/Qwen2.5-1.5B"}]})
    assert cfg.teachers[0].name == "Qwen2_5-1_5B"
    with pytest.raises(ConfigError) as info:
        parse_config({**BASE, "teachers": [{"model": "gemma3-270m", "name": "g.3"}]})
    assert "'g_3'" in str(info.value)


def test_overrides_nested_and_list_index():
    raw = apply_overrides(dict(BASE), ["train.lr=0.01", "teachers.0.weight=0.25", "losses.kv.kind=smooth_l1"])
    cfg = parse_config(raw)
    assert cfg.train.lr == 0.01
    assert cfg.teachers[0].weight == 0.25
    assert cfg.losses.kv.kind == "smooth_l1"


def test_all_problems_listed_with_suggestion():
    raw = {**BASE, "train": {"stpes": 3, "lr": "fast"}, "losses": {"kv": {"kind": "l3"}}}
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    text = str(info.value)
    assert len(info.value.problems) >= 3
    assert "train.steps" in text  # nearest valid key for the typo 'stpes'
    assert "lr" in text and "kind" in text


def test_round_trip_through_yaml(tmp_path):
    cfg = parse_config(BASE)
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(Exception) as info:
        load_config(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(info.value)


def test_packaged_quickstart_config_parses():
    from importlib.resources import files

    cfg = load_config(files("kvdistill") / "configs" / "quickstart.yaml")
    assert [t.name for t in cfg.teachers] == ["smollm2", "gemma3"]


def test_options_that_would_be_ignored_are_refused_together():
    raw = {
        **BASE,
        "teachers": [{"model": "gemma3-270m", "weight": 0.3, "compression": {"kind": "rkv", "budget": 8}}],
        "fusion": {
            "kind": "router",
            "similarity": {"prototype": "kmeans"},
            "latent": {"dim": 8},
            "router": {"kind": "attention", "per_token": True},
        },
        "losses": {"hidden": 0.5, "logit_kd": {"beta": 0.2}},
    }
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    text = str(info.value)
    for expected in (
        "fusion.similarity is changed from its default but only fusion.kind: similarity reads it",
        "fusion.latent is changed",
        "per_token needs router kind 'mlp' or 'gate'",
        "losses.logit_kd.beta is set but divergence is 'forward'",
    ):
        assert expected in text, expected
    fixed = {**raw, "fusion": {"kind": "router"}, "losses": {"hidden": 0.5}}
    with pytest.raises(ConfigError) as info:
        parse_config(fixed)
    text = str(info.value)
    assert "teachers.0.weight (0.3) is set but fusion.kind router" in text
    assert "losses.hidden need teacher 'gemma3-270m' (teachers.0) online and uncompressed" in text
    ok = parse_config(
        {
            "student": {"model": "smollm2-135m"},
            "teachers": [{"model": "gemma3-270m"}, {"model": "smollm2-135m"}],
            "fusion": {"kind": "similarity", "similarity": {"prototype": "kmeans"}},
        }
    )
    assert parse_config(ok.model_dump()) == ok  # a fully dumped config (every default written) reloads


def test_routing_a_single_teacher_is_refused():
    with pytest.raises(ConfigError, match="there is one teacher: its weight is always 1"):
        parse_config(
            {
                "student": {"model": "smollm2-135m"},
                "teachers": [{"model": "gemma3-270m"}],
                "fusion": {"kind": "router"},
            }
        )


def test_a_misspelt_offline_name_gets_the_nearest_one():
    from kvdistill.models.load import load_config as load_hf_config

    with pytest.raises(KvdistillError, match="'smolm2-135m' is not an offline model name") as err:
        load_hf_config("smolm2-135m")
    assert "did you mean 'smollm2-135m'?" in err.value.fix
    assert "nearest offline names: smollm2-135m" in err.value.problem  # said before any hub lookup


def test_validate_runs_the_checks_training_runs():
    """What logit KD cannot do is refused by validate, not first by train after writing its run directory: a
    top_k past a teacher's vocabulary, cross_tokenizer without a teacher of another tokenizer. Logit KD across
    tokenizers passes."""
    from kvdistill.config import check_config

    raw = {
        "student": {"model": "smollm2-135m"},
        "teachers": [{"model": "gemma3-270m"}],
        "losses": {"logit_kd": {"weight": 1.0, "cross_tokenizer": "span"}},
    }
    assert check_config(raw)[1] == []
    raw["teachers"] = [{"model": "smollm2-135m"}]
    raw["losses"] = {"logit_kd": {"weight": 1.0, "cross_tokenizer": "span", "top_k": 60000}}
    problems = check_config(raw)[1]
    assert any("top_k is set with cross_tokenizer: span" in p for p in problems), problems
    raw["losses"]["logit_kd"].pop("cross_tokenizer")
    problems = check_config(raw)[1]
    assert any(
        "top_k (60000) must be below teachers[0] (smollm2-135m)'s vocabulary of 49152" in p for p in problems
    ), problems
    raw["losses"] = {"logit_kd": {"weight": 1.0, "cross_tokenizer": "project"}}
    problems = check_config(raw)[1]
    assert any(
        "cross_tokenizer is set but every online teacher shares the student's tokenizer" in p
        for p in problems
    ), problems
    raw["losses"] = {"logit_kd": {"weight": 1.0}}
    assert check_config(raw)[1] == []


def test_a_tilde_override_removes_a_key():
    from kvdistill.config import apply_overrides
    from kvdistill.errors import ConfigError

    raw = {"data": {"source": "arithmetic", "size": 12}, "teachers": [{"name": "a", "weight": 2}]}
    out = apply_overrides(raw, ["data.source=jsonl", "~data.size", "~teachers.0.weight"])
    assert out == {"data": {"source": "jsonl"}, "teachers": [{"name": "a"}]}
    with pytest.raises(ConfigError, match="the config sets no 'data.limit'"):
        apply_overrides(out, ["~data.limit"])


def test_merging_a_data_section_of_another_source_kind_drops_the_old_kinds_keys():
    from kvdistill.config import DataConfig, merge_data

    gen = {"source": "arithmetic", "size": 300, "eval_size": 20}
    to_file = merge_data(gen, {"source": "jsonl", "path": "t.jsonl"})
    assert to_file == {"source": "jsonl", "path": "t.jsonl", "eval_size": 20}
    DataConfig.model_validate(to_file)  # no leftover data.size to refuse
    back = merge_data({**to_file, "limit": 50}, {"source": "sorting", "size": 40})
    assert back == {"source": "sorting", "size": 40, "eval_size": 20}
    assert merge_data(gen, {"size": 10}) == {**gen, "size": 10}  # same source: a plain update


# ---------------------------------------------------------------------------------------------- resolved dump
@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"data": {"source": "jsonl", "path": "d.jsonl", "text_field": "body"}},  # text mode by a set field
        {"data": {"source": "jsonl", "path": "d.jsonl"}},  # mode left to the file's columns
        {"losses": {"logit_kd": {"weight": 0.5, "schedule": {"kind": "linear", "start": 4.0, "end": 1.0}}}},
    ],
)
def test_dump_spells_out_every_default_and_reloads_to_the_same_run(extra):
    """Also a guard for new fields whose presence the data reader asks (`"X" in cfg.model_fields_set`): each
    must be a presence field, or config.yaml would change how the run reads its data."""
    import yaml

    cfg = parse_config({**BASE, **extra})
    raw = yaml.safe_load(dump_config(cfg))
    assert raw["train"]["save_every"] == 0 and raw["fusion"]["router"]["kind"] == "mlp"  # defaults written
    assert raw["teachers"][0]["layer_map"]["strategy"] == "ratio"
    again = parse_config(raw)
    assert again == cfg
    for section in ("data", "losses"):  # fields whose being set means something keep that
        assert getattr(again, section).model_fields_set >= {
            f
            for f in type(getattr(cfg, section)).presence_fields
            if f in getattr(cfg, section).model_fields_set
        }
    assert ("text_field" in again.data.model_fields_set) == ("text_field" in cfg.data.model_fields_set)
    assert ("temperature" in again.losses.logit_kd.model_fields_set) is False


def test_resolve_paths_makes_local_paths_absolute(tmp_path, monkeypatch):
    from kvdistill.config import resolve_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "teacher").mkdir()
    cfg = resolve_paths(
        parse_config(
            {
                "student": {"model": "smollm2-135m"},
                "teachers": [{"model": "teacher"}],
                "data": {"source": "jsonl", "path": "d.jsonl"},
            }
        )
    )
    assert cfg.data.path == str(tmp_path / "d.jsonl")
    assert cfg.teachers[0].model == str(tmp_path / "teacher") and cfg.teachers[0].name == "teacher"
    assert cfg.student.model == "smollm2-135m"  # a zoo name, not a local path: kept
    assert "text_field" not in cfg.data.model_fields_set


@pytest.mark.parametrize("name", ["quickstart", "pikv", "phase5"])
def test_a_resolved_config_passes_the_same_checks(name):
    """Fields whose being set is checked (an unread cross_tokenizer, a temperature next to a schedule) stay
    unset through the resolved dump that config.yaml holds."""
    import yaml

    from kvdistill.config import config_path, resolve_paths, semantic_problems

    cfg = load_config(config_path(name))
    again = parse_config(yaml.safe_load(dump_config(resolve_paths(cfg))))
    assert again == cfg and semantic_problems(again) == semantic_problems(cfg) == []


def test_every_field_the_code_asks_the_presence_of_is_a_presence_field():
    """`"X" in <section>.model_fields_set` anywhere in src/ names a field that dump_config must not write
    unset."""
    import re
    from pathlib import Path

    from kvdistill.config import RunConfig

    src = Path(__file__).resolve().parents[1] / "src" / "kvdistill"
    asked = set()
    for file in src.rglob("*.py"):
        text = file.read_text()
        asked |= set(re.findall(r'"(\w+)" (?:not )?in (?:\w+\.)*(?:model_fields_set|explicit)\b', text))
    declared = set()

    def walk(cls):
        declared.update(getattr(cls, "presence_fields", ()))
        for field in cls.model_fields.values():
            for arg in (field.annotation, *getattr(field.annotation, "__args__", ())):
                for inner in (arg, *getattr(arg, "__args__", ())):
                    if isinstance(inner, type) and hasattr(inner, "model_fields") and inner is not cls:
                        walk(inner)

    walk(RunConfig)
    assert asked and asked <= declared, sorted(asked - declared)


def test_confidence_options_that_would_be_ignored_are_refused():
    two = {
        "student": {"model": "smollm2-135m"},
        "teachers": [{"model": "gemma3-270m"}, {"model": "smollm2-135m"}],
    }
    with pytest.raises(ConfigError) as info:
        parse_config(
            {
                **two,
                "fusion": {
                    "kind": "router",
                    "confidence": {"temperature": 0.5},
                    "router": {"target_weight": 2.0},
                },
            }
        )
    text = str(info.value)
    assert "fusion.confidence is changed from its default but only fusion.kind: confidence" in text
    assert "fusion.router.target_weight (2.0)" in text and "set fusion.router.target: confidence" in text
    ok = parse_config(
        {
            **two,
            "fusion": {
                "kind": "router",
                "confidence": {"temperature": 0.5},
                "router": {"target": "confidence", "target_weight": 2.0},
            },
        }
    )
    assert ok.fusion.confidence.temperature == 0.5 and parse_config(ok.model_dump()) == ok
    cached = {
        **two,
        "teachers": [
            {"model": "gemma3-270m", "compression": {"kind": "rkv", "budget": 8}},
            {"model": "smollm2-135m"},
        ],
        "fusion": {"kind": "confidence"},
    }
    with pytest.raises(
        ConfigError,
        match=r"fusion.kind confidence scores each sample with teacher 'gemma3-270m''s "
        r"own logits \(teachers.0\)",
    ):
        parse_config(cached)
    with pytest.raises(ConfigError, match="fusion.kind confidence weighs teachers against each other"):
        parse_config({**BASE, "fusion": {"kind": "confidence"}})
    with pytest.raises(ConfigError, match="confidence.temperature"):
        parse_config({**two, "fusion": {"kind": "confidence", "confidence": {"temperature": 0}}})
