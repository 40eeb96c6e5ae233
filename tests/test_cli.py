"""The command line as a user runs it (`kvdistill.cli.main`): eval, validate, report and inspect."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from kvdistill.cli import main

TINY_RUN = """
name: tiny
student:
  from_config: {base: smollm2-135m, num_hidden_layers: 2, hidden_size: 64, intermediate_size: 128,
                num_attention_heads: 2, num_key_value_heads: 1, head_dim: 32}
  tokenizer: gpt2-tokenizer
teachers:
  - {name: smollm2, model: smollm2-135m}
data: {source: gsm_symbolic, size: 12, eval_size: 4, max_length: 40}
train: {steps: 2, batch_size: 2, lr: 1.0e-3, tensorboard: false}
"""


def run_cli(args: list[str]) -> int:
    argv = sys.argv
    sys.argv = ["kvdistill", *args]
    try:
        main()
    except SystemExit as exit_:
        return int(exit_.code or 0)
    finally:
        sys.argv = argv
    return 0


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr with whitespace collapsed: rich wraps long lines)."""
    code = run_cli(list(args))
    out, err = capsys.readouterr()
    return code, out, " ".join(err.split())


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    """A 2-step run of a 2-layer student distilled from SmolLM2 (one teacher, 8 train / 4 eval samples)."""
    root = tmp_path_factory.mktemp("cli")
    config = root / "tiny.yaml"
    config.write_text(TINY_RUN)
    assert run_cli(["train", str(config), "--out", str(root / "run")]) == 0
    return root / "run"


# ------------------------------------------------------------------------------------------------ eval
def test_eval_json_on_a_run_dir(run_dir, capsys):
    code, out, _ = cli(capsys, "eval", str(run_dir), "--json")
    assert code == 0
    result = json.loads(out)
    assert result["student"] == str(run_dir / "final")
    assert result["teachers"] == {"smollm2": "smollm2-135m"}  # from the run's config.yaml
    assert result["data"] == {
        "source": "gsm_symbolic",
        "path": None,
        "eval_size": 4,
        "max_length": 40,
        "seed": 0,
    }
    summary = json.loads((run_dir / "summary.json").read_text())
    # the run's held-out split and token limit: the trainer's own final eval CE
    assert result["perplexity"]["ce"] == pytest.approx(summary["eval/ce"], rel=1e-5)
    assert result["exact_match"]["n"] == 4 and 0.0 <= result["exact_match"]["exact_match"] <= 1.0
    probe = result["probe_kv_error"]["smollm2"]
    assert len(probe["layers"]) == 2 and all(v > 0 for v in probe["layers"])
    assert probe["mean"] == pytest.approx(sum(probe["layers"]) / 2)
    saved = json.loads((run_dir / "eval.json").read_text())  # kept in the run for `kvdistill report`
    assert saved["perplexity"] == result["perplexity"] and saved["step"] == 2
    assert saved["written_by"] == "kvdistill eval"


def test_eval_markdown_on_a_checkpoint_dir(run_dir, capsys):
    code, out, _ = cli(capsys, "eval", str(run_dir / "checkpoints" / "step-2"), "--no-em", "--size", "2")
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[:2] == ["| metric | value |", "|---|---|"]
    assert lines[2].startswith("| held-out perplexity | ") and "exact match" not in out
    assert re.search(r"\| KV probe 1-R² vs smollm2 .* \| [\d.]+; [\d.]+, [\d.]+ \|", out)


def test_eval_of_a_missing_checkpoint_is_a_clean_error(tmp_path, capsys):
    code, out, err = cli(capsys, "eval", str(tmp_path / "nope" / "run"), "--json")
    assert code == 2 and out == ""
    assert "does not exist" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------ validate
def test_validate_lists_every_problem_at_once(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("""
student: {from_config: {base: smollm2-135m, num_hidden_layers: 4}, tokenizer: gpt2-tokenizer}
tachers: []
teachers:
  - {name: missing, model: ./no/such/model}
  - {name: deep, model: gemma3-270m, layer_map: {strategy: explicit, explicit: [0, 5, 20, 17]}}
train: {steps: many}
""")
    code, _, err = cli(capsys, "validate", str(config))
    assert code == 2
    assert "has 4 problem(s)" in err
    assert "unknown key 'tachers'; did you mean 'teachers'?" in err
    assert "'train.steps' = 'many'" in err
    assert "teachers[0] (missing).model: model path './no/such/model' does not exist" in err
    assert "teachers[1] (deep).layer_map" in err and "names teacher layer(s) [20] outside 0..17" in err


def test_validate_accepts_the_quickstart_config(capsys):
    code, _, err = cli(capsys, "validate", "src/kvdistill/configs/quickstart.yaml")
    assert code == 0 and "ok" in err and "2 teacher(s)" in err
    code, _, err = cli(capsys, "validate", "quickstart", "teachers.0.layer_map.strategy=explicit")
    assert code == 2 and "strategy 'explicit' needs a list of teacher layers" in err


# ------------------------------------------------------------------------------------------------ report
@pytest.mark.parametrize("fmt", ["md", "html"])
def test_report_from_a_run_dir(run_dir, tmp_path, capsys, fmt):
    out = tmp_path / f"page.{fmt}"
    code, _, err = cli(
        capsys, "report", str(run_dir), "--out", str(out), *(["--html"] if fmt == "html" else [])
    )
    assert code == 0 and f"wrote {out}" in err
    text = out.read_text()
    images = re.findall(r"page_files/[\w.-]+\.png", text)
    assert images and all((tmp_path / img).is_file() for img in images)
    assert "tiny" in text and "smollm2" in text


def test_report_default_path(run_dir, capsys):
    code, _, _ = cli(capsys, "report", str(run_dir))
    assert code == 0 and (run_dir / "report.md").is_file() and (run_dir / "report_files").is_dir()


# ------------------------------------------------------------------------------------------------ inspect
def test_inspect_prints_geometry_and_layer_map(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    code, out, _ = cli(capsys, "inspect", "smollm2-135m", "gemma3-270m", "--text", "Tom has 12 apples.")
    assert code == 0
    text = " ".join(out.split())
    assert "smollm2-135m (student) ← gemma3-270m (teacher)" in text
    # ratio map 30 -> 18 layers: ends pinned, layer 1 at teacher position 17/29 = 0.586
    assert "0←0, 1←0(0.41)+1(0.59)," in text and "29←17" in text
    assert "projector: per_head (H_kv 3×D 64 → H_kv 1×D 256)" in text
    assert "over 30 layers" in text and "tokens:" in text
    code, out, _ = cli(capsys, "inspect", "smollm2-135m", "gemma3-270m", "--json")
    entries = json.loads(out)
    pairs = entries[1]["plan_from_student"]["layer_map"]["pairs"]
    assert pairs[0] == {"student": 0, "teacher": [[0, 1.0]]} and len(pairs) == 30


@pytest.mark.slow
def test_inspect_a_gguf_file(capsys, monkeypatch, tmp_path_factory):
    """A local .gguf file (SmolLM2's, from its offline package) is converted once and inspected like a zoo
    name.

    KVDISTILL_HOME is the session directory tests/models/test_gguf.py uses too, so the file converts once."""
    from kvdistill.models import zoo

    monkeypatch.setenv("KVDISTILL_HOME", str(tmp_path_factory.getbasetemp() / "kvdistill_home"))
    path = str(zoo._gguf_source(zoo.ZOO["smollm2-135m"]))
    code, out, err = cli(capsys, "inspect", path, "--json")
    assert code == 0, err
    (entry,) = json.loads(out)
    assert entry["name"] == path and entry["model_type"] == "llama"
    assert (entry["num_layers"], entry["num_attention_heads"], entry["num_kv_heads"], entry["head_dim"]) == (
        30,
        9,
        3,
        64,
    )
    assert entry["kv_bytes_per_token"] == 23040
    code, _, err = cli(capsys, "inspect", path + ".missing.gguf")
    assert code == 2 and "does not exist" in err and "a .gguf file" in err


# ------------------------------------------------------------------------------------------------ CLI habits
def test_version(capsys):
    from kvdistill import __version__

    code, out, _ = cli(capsys, "--version")
    assert code == 0 and out == f"kvdistill {__version__}\n"


@pytest.mark.parametrize("name", [None, "quickstart", "phase4"])
def test_config_show_prints_a_complete_commented_config_that_round_trips(capsys, name):
    import yaml

    from kvdistill.config import RunConfig, config_path, load_config
    from kvdistill.config.show import default_config

    code, out, _ = cli(capsys, "config", "show", *([name] if name else []))
    assert code == 0
    raw = yaml.safe_load(out)
    expected = default_config() if name is None else load_config(config_path(name))
    assert load_config(raw=raw) == expected
    # every field of every section is written, each section's fields commented from the schema's docstrings
    assert set(raw) == set(RunConfig.model_fields)
    train_fields = set(type(expected.train).model_fields)
    assert set(raw["train"]) == train_fields - {
        f for f in expected.train.presence_fields if f not in expected.train.model_fields_set
    }
    assert "# Checkpoint every N optimizer steps (0: only at the end)." in out
    assert "(one of: fixed | similarity | router | confidence)" in out
    assert "# text_field:" in out  # a mode-choosing field left unset is shown commented out


def test_every_command_help_has_an_example(capsys):
    import typer

    from kvdistill.cli import app

    def commands(group, prefix: tuple[str, ...]):
        for name, cmd in group.commands.items():
            if hasattr(cmd, "commands"):  # a group (typer's own or click's)
                yield from commands(cmd, (*prefix, name))
            else:
                yield (*prefix, name)

    names = list(commands(typer.main.get_command(app), ()))
    assert {("train",), ("eval",), ("config", "show"), ("cache", "verify"), ("zoo", "list")} <= set(names)
    for path in names:
        code, out, _ = cli(capsys, *path, "--help")
        assert code == 0, path
        assert f"kvdistill {' '.join(path)}" in out and "Example" in out, path


def test_inspect_fits_80_columns_and_shows_tokens_as_text(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = cli(
        capsys, "inspect", "smollm2-135m", "gemma3-270m", "minilm-l6", "--text", "Compute 3 + 4, naïve."
    )
    assert code == 0
    assert max(len(line) for line in out.splitlines()) <= 80
    assert "Ġ" not in out and "▁" not in out
    assert "Compute · 3 ·+ · 4 , ·na ïve ." in out  # SmolLM2's byte-level BPE, spaces as '·'
    assert "[<bos>] Compute · 3 ·+ · 4 , ·naïve ." in out  # Gemma-3: BOS covers no text
    for cell in ("gemma3_text", "rotate_half, d=256,", "23,040 (bf16)"):  # whole cells, wrapped not cut
        assert cell in out


def test_a_misspelt_zoo_name_says_the_nearest_offline_names(capsys):
    code, out, err = cli(capsys, "inspect", "smolm2-135m")
    assert code == 2 and out == ""
    assert "smollm2-135m" in err and "huggingface.co" not in err and "Traceback" not in err


def test_log_level_flag_and_a_bad_level(capsys):
    import logging

    code, _, _ = cli(capsys, "--log-level", "INFO", "config", "show")
    assert code == 0 and logging.getLogger().level == logging.INFO
    code, _, err = cli(capsys, "--log-level", "LOUD", "config", "show")
    assert code == 2 and "LOUD" in err and "DEBUG, INFO, WARNING, ERROR" in err
    logging.getLogger().setLevel(logging.WARNING)


def test_experiment_plan_lists_the_runs_and_creates_no_directory(capsys, tmp_path):
    code, out, err = cli(
        capsys, "experiment", "tiny", "--out", str(tmp_path / "exp"), "--plan", "--seeds", "1"
    )
    assert code == 0, err
    assert re.search(r"ce_only/seed-0: \d+ training records", out)
    assert re.search(r"planned \d+ runs of tiny; nothing trained", err)
    assert not (tmp_path / "exp").exists()


def test_experiment_report_of_a_folder_no_experiment_wrote_is_refused(capsys, tmp_path):
    (tmp_path / "exp").mkdir()
    code, _, err = cli(capsys, "experiment", "tiny", "--out", str(tmp_path / "exp"), "--report")
    assert code != 0 and "is not an experiment directory" in err
    code, _, err = cli(capsys, "experiment", "tiny", "--out", str(tmp_path / "exp"), "--report", "--plan")
    assert code != 0 and "--plan and --report together" in err
    assert list((tmp_path / "exp").iterdir()) == []
