"""`kvdistill eval` plumbing: which student and run a CHECKPOINT names, which data, and an end-to-end
result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from kvdistill.config import dump_config, parse_config
from kvdistill.data import load_records
from kvdistill.errors import KvdistillError
from kvdistill.eval.heldout import perplexity
from kvdistill.eval.run import data_config, evaluate_checkpoint, markdown_table
from kvdistill.rundir import resolve_checkpoint

QA = [
    ("What is 2 plus 3?", "5"),
    ("What is 4 plus 4?", "8"),
    ("What is 10 minus 1?", "9"),
    ("What is 3 times 3?", "9"),
    ("What is 7 plus 7?", "14"),
    ("What is 6 minus 2?", "4"),
]


@pytest.fixture(scope="module")
def tiny_student(tmp_path_factory):
    """A 2-layer random llama with the GPT-2 tokenizer, saved as a student directory."""
    from kvdistill.models.load import load_tokenizer

    tok = load_tokenizer("gpt2-tokenizer")
    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    path = tmp_path_factory.mktemp("student")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_run(root, student_dir, data: dict | None = None):
    """A run directory as the trainer leaves it: config.yaml, final/student, checkpoints/step-N/student."""
    cfg = parse_config(
        {
            "name": "r",
            "student": {"model": str(student_dir)},
            "teachers": [{"name": "self", "model": str(student_dir)}],
            "data": data or {"size": 40, "eval_size": 8, "seed": 3, "max_length": 64},
        }
    )
    root.mkdir()
    (root / "config.yaml").write_text(dump_config(cfg))
    for sub in ("final/student", "checkpoints/step-1/student", "checkpoints/step-2/student"):
        (root / sub).mkdir(parents=True)
        (root / sub / "config.json").write_text("{}")
    for step in (1, 2):
        (root / f"checkpoints/step-{step}/trainer_state.json").write_text(json.dumps({"step": step}))
    return root


def test_resolve_run_checkpoint_and_student_dirs(tmp_path, tiny_student):
    run = make_run(tmp_path / "run", tiny_student)
    assert resolve_checkpoint(run) == (str(run / "final/student"), run)
    assert resolve_checkpoint(run / "final") == (str(run / "final/student"), run)
    assert resolve_checkpoint(run / "final/student") == (str(run / "final/student"), run)
    step = run / "checkpoints/step-2"
    assert resolve_checkpoint(step) == (str(step / "student"), run)
    assert resolve_checkpoint(step / "student") == (str(step / "student"), run)
    assert resolve_checkpoint(tiny_student) == (str(tiny_student), None)  # a bare student: no run
    assert resolve_checkpoint("smollm2-135m") == ("smollm2-135m", None)
    # a run stopped before the end: its latest complete checkpoint
    (run / "final/student/config.json").unlink()
    assert resolve_checkpoint(run) == (str(step / "student"), run)
    with pytest.raises(KvdistillError, match="not a run, checkpoint or student directory"):
        resolve_checkpoint(tmp_path)


def test_data_from_the_run_keeps_its_eval_split(tmp_path, tiny_student):
    from kvdistill.config import load_config

    run_cfg = load_config(make_run(tmp_path / "run", tiny_student) / "config.yaml")
    dcfg = data_config(None, run_cfg, None, None)
    assert (dcfg.eval_size, dcfg.max_length, dcfg.seed) == (8, 64, 3)
    assert load_records(dcfg, "eval") == load_records(run_cfg.data, "eval")
    smaller = data_config(None, run_cfg, 4, 32)
    assert (smaller.eval_size, smaller.max_length) == (4, 32)
    assert load_records(smaller, "eval") == load_records(run_cfg.data, "eval")[:4]  # prefix-stable generation
    bigger = data_config(
        None, run_cfg, 64, None
    )  # more held-out samples than the run's data.size: still a fit split
    assert len(load_records(bigger, "train")) >= 16
    default = data_config(None, None, None, None)
    assert (default.source, default.eval_size, default.max_length) == ("gsm_symbolic", 32, 256)
    with pytest.raises(KvdistillError, match="unknown file type '.xlsx'"):
        data_config("data.xlsx", None, None, None)
    with pytest.raises(KvdistillError, match="no held-out samples"):
        data_config(None, None, 0, None)


def test_run_with_a_question_answer_file_reads_it_in_template_mode(tmp_path, tiny_student):
    """config.yaml spells out data.text_field; the file must still be read as (question, answer) rows."""
    from kvdistill.config import load_config

    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in QA))
    run = make_run(tmp_path / "run", tiny_student, {"source": "jsonl", "path": str(path), "eval_size": 2})
    records = load_records(data_config(None, load_config(run / "config.yaml"), None, None), "eval")
    assert [r["answer"] for r in records] and all(r["text"].startswith("Question: ") for r in records)


def test_evaluate_student_dir_on_a_file_against_itself(tmp_path, tiny_student):
    path = tmp_path / "qa.jsonl"
    # distinct questions: a repeated one would be dropped from the probe's fit split (train/eval dedupe)
    rows = [(f"{q} (variant {i})", a) for i in range(4) for q, a in QA]
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in rows))
    result = evaluate_checkpoint(
        str(tiny_student), data=str(path), teachers=[str(tiny_student)], size=4, max_length=32, device="cpu"
    )
    held = load_records(data_config(str(path), None, 4, 32), "eval")
    from kvdistill.models.load import load_model

    model, tok = load_model(str(tiny_student))
    assert result["perplexity"] == perplexity(model, tok, held, max_length=32)
    assert result["perplexity"]["ppl"] > 1000  # a random model over a 50k vocabulary
    em = result["exact_match"]
    assert em["n"] == 4 and em["exact_match"] == em["correct"] / 4
    name = tiny_student.name
    assert result["teachers"] == {name: str(tiny_student)}
    layers = result["probe_kv_error"][name]["layers"]
    assert len(layers) == 2 and max(layers) < 0.01  # the student is its own teacher
    assert result["run_dir"] is None and result["samples"] == 4
    table = markdown_table(result)
    assert f"| held-out perplexity | {result['perplexity']['ppl']:.3f}" in table
    assert f"KV probe 1-R² vs {name}" in table and f"({em['correct']}/4)" in table


# ----------------------------------------------------------------------------------------- a run that travels
def _cli(*args) -> int:
    import sys

    from kvdistill.cli import main

    argv, sys.argv = sys.argv, ["kvdistill", *map(str, args)]
    try:
        main()
    except SystemExit as exit_:
        return int(exit_.code or 0)
    finally:
        sys.argv = argv
    return 0


def test_a_moved_run_loads_evaluates_and_reports_from_another_directory(teacher_dirs, tmp_path, monkeypatch):
    """Relative data and teacher paths at training time; the run directory moved and evaluated from elsewhere:
    config.yaml holds every default and absolute paths, final/ loads with from_pretrained, eval.json is saved
    and shown by the report."""
    import os
    import shutil

    import yaml

    work, elsewhere, other = (tmp_path / d for d in ("work", "elsewhere", "other"))
    for d in (work, elsewhere, other):
        d.mkdir()
    monkeypatch.chdir(work)
    with open("data.jsonl", "w") as f:
        for i in range(12):
            q, a = QA[i % len(QA)]
            f.write(json.dumps({"question": f"{q} ({i})", "cot": "Think.", "answer": a}) + "\n")
    teacher = os.path.relpath(teacher_dirs["qwen2"], work)
    Path("my.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "mine",
                "student": {
                    "from_config": {
                        "base": "smollm2-135m",
                        "num_hidden_layers": 2,
                        "hidden_size": 64,
                        "intermediate_size": 128,
                        "num_attention_heads": 2,
                        "num_key_value_heads": 1,
                        "head_dim": 32,
                    },
                    "tokenizer": "gpt2-tokenizer",
                },
                "teachers": [{"name": "qwen2", "model": teacher}],
                "data": {"source": "jsonl", "path": "data.jsonl", "eval_size": 4, "max_length": 32},
                "train": {"steps": 2, "batch_size": 2, "tensorboard": False},
            }
        )
    )
    assert _cli("train", "my.yaml", "--out", "run") == 0
    stored = yaml.safe_load(Path("run/config.yaml").read_text())
    assert stored["data"]["path"] == str(work / "data.jsonl")
    assert stored["teachers"][0]["model"] == str(teacher_dirs["qwen2"].resolve())
    assert (
        stored["train"]["save_every"] == 0 and stored["losses"]["kv"]["kind"] == "mse"
    )  # defaults spelled out
    shutil.move(work / "run", elsewhere / "run")
    moved = elsewhere / "run"
    monkeypatch.chdir(other)
    model = AutoModelForCausalLM.from_pretrained(moved / "final")  # the student at the top of final/
    assert model.config.num_hidden_layers == 2 and (moved / "final/kvdistill/objective.safetensors").is_file()
    assert _cli("eval", moved, "--no-em", "--json") == 0
    saved = json.loads((moved / "eval.json").read_text())
    assert saved["written_by"] == "kvdistill eval" and saved["step"] == 2 and saved["samples"] == 4
    summary = json.loads((moved / "summary.json").read_text())
    assert saved["perplexity"]["ce"] == pytest.approx(
        summary["eval/ce"], rel=1e-5
    )  # the run's own held-out split
    assert set(saved["probe_kv_error"]) == {"qwen2"}
    assert _cli("report", moved, "--out", other / "r.md") == 0
    text = (other / "r.md").read_text()
    assert "## Evaluation (kvdistill eval)" in text and "| mine | 2 | 4 |" in text
    assert not list(other.glob("*.json"))  # nothing written where eval ran
