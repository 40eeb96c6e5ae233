"""`kvdistill validate` and `train` run the same checks before a first step (kvdistill.train.preflight): an
inconsistent from_config student or a data field that is not a column is refused by both with exit code 2,
naming the keys and the fix, with nothing written; every record of a file is used; Hugging Face datasets
(saved, in memory) and chat (messages) data train end to end."""

from __future__ import annotations

import json
import logging

import pytest
import yaml

from kvdistill.config import load_config
from kvdistill.data import load_records
from kvdistill.train.trainer import train

BASE = {
    "name": "own",
    "student": {
        "from_config": {
            "base": "smollm2-135m",
            "num_hidden_layers": 2,
            "hidden_size": 64,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "intermediate_size": 128,
        },
        "tokenizer": "gpt2-tokenizer",
    },
    "data": {"source": "arithmetic", "size": 16, "eval_size": 4, "max_length": 48},
    "train": {"steps": 2, "batch_size": 2, "lr": 1.0e-3, "tensorboard": False},
}
PLAIN_CHAT = (
    "{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}### assistant:\n{% endif %}"
)


def write_config(path, **sections):
    raw = json.loads(json.dumps(BASE))
    for key, value in sections.items():
        raw[key] = value if not isinstance(value, dict) else {**raw.get(key, {}), **value}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def refused_alike(cli, config, out, *must):
    """validate and train both exit 2 with every string of `must` in the message; --out never created."""
    for command in (["validate", config], ["train", config, "--out", out]):
        code, err = cli(*command)
        assert code == 2, (command[0], err)
        for text in must:
            assert text in err, (command[0], text, err)
        assert not out.exists()


@pytest.mark.parametrize(
    ("spec", "must"),
    [
        # the student: it crashed at its first checkpoint
        (
            {"base": "smollm2-135m", "num_hidden_layers": 2, "hidden_size": 64},
            [
                "hidden_size 64 with 9 heads (num_attention_heads, from the base smollm2-135m)",
                "set num_attention_heads to 1, 2, 4 or 8 (head_dim 64, 32, 16 or 8)",
            ],
        ),
        # the README's former example
        (
            {"base": "smollm2-135m", "num_hidden_layers": 4, "hidden_size": 256},
            ["hidden_size 256 with 9 heads", "e.g. num_attention_heads: 8, num_key_value_heads: 2"],
        ),
        (
            {"base": "smollm2-135m", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 8},
            [
                "num_key_value_heads 3 (from the base smollm2-135m) does not divide num_attention_heads 8",
                "set num_key_value_heads to 1, 2, 4 or 8",
            ],
        ),
        (
            {
                "family": "llama",
                "hidden_size": 100,
                "num_attention_heads": 8,
                "num_key_value_heads": 2,
                "head_dim": 16,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
            },
            ["student.from_config: LlamaConfig refuses these fields", "hidden size (100) is not a multiple"],
        ),
    ],
)
def test_an_inconsistent_from_config_student_is_refused_by_validate_and_train(tmp_path, cli, spec, must):
    config = write_config(tmp_path / "c.yaml", student={"from_config": spec})
    refused_alike(cli, config, tmp_path / "run", "student.from_config", *must)


def test_an_inconsistent_from_config_teacher_is_refused_alike(tmp_path, cli):
    teacher = {
        "name": "t",
        "from_config": {"base": "smollm2-135m", "num_hidden_layers": 2, "hidden_size": 96},
        "tokenizer": "gpt2-tokenizer",
    }
    config = write_config(tmp_path / "c.yaml", teachers=[teacher])
    refused_alike(
        cli,
        config,
        tmp_path / "run",
        "teachers[0].from_config: hidden_size 96 with 9 heads",
        "set num_attention_heads to",
    )


def test_a_data_field_that_is_not_a_column_is_refused_by_validate_and_train(tmp_path, cli):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} + 1?", "answer": i + 1}) + "\n" for i in range(10)))
    config = write_config(
        tmp_path / "c.yaml",
        data={"source": "jsonl", "path": str(data), "size": None, "question_field": "promt"},
    )
    raw = yaml.safe_load(config.read_text())
    del raw["data"]["size"]
    config.write_text(yaml.safe_dump(raw))
    refused_alike(
        cli,
        config,
        tmp_path / "run",
        "data.question_field = 'promt': no such column in",
        "did you mean 'prompt'?",
        "set data.question_field to one of the columns, e.g. data.question_field=prompt",
    )


def test_a_thousand_record_file_trains_on_all_of_it_and_a_cap_is_logged(tmp_path, cli, caplog):
    data = tmp_path / "big.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": f"What is {i} times 2?", "answer": 2 * i}) + "\n" for i in range(1000)
        )
    )
    config = write_config(
        tmp_path / "c.yaml",
        train={"steps": 1},
        data={"source": "jsonl", "path": str(data), "eval_size": 20, "max_length": 10},
    )
    raw = yaml.safe_load(config.read_text())
    del raw["data"]["size"]
    config.write_text(yaml.safe_dump(raw))
    code, err = cli("validate", config)
    assert code == 0 and "(980 train / 20 eval records)" in err
    assert "note: data.max_length = 10 truncates" in err and "of 1000 records for the student" in err
    assert cli("train", config, "--out", tmp_path / "run")[0] == 0
    stored = json.loads((tmp_path / "run" / "data.json").read_text())
    assert (stored["train"]["records"], stored["eval"]["records"]) == (980, 20)
    with caplog.at_level(logging.WARNING):
        assert cli("train", config, "--out", tmp_path / "capped", "data.limit=100")[0] == 0
    assert "using 100 of its 1000 records (data.limit), 900 left out" in caplog.text
    assert json.loads((tmp_path / "capped" / "data.json").read_text())["train"]["records"] == 80


def test_a_saved_hugging_face_dataset_trains(tmp_path, cli, teacher_dirs):
    import datasets

    rows = [{"q": f"What is {i} + 2?", "steps": f"{i} + 2 = {i + 2}", "a": str(i + 2)} for i in range(12)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "ds"))
    config = write_config(
        tmp_path / "c.yaml",
        data={
            "source": "hf",
            "path": str(tmp_path / "ds"),
            "split": "train",
            "question_field": "q",
            "cot_field": "steps",
            "answer_field": "a",
        },
        teachers=[{"name": "qwen2", "model": str(teacher_dirs["qwen2"])}],
    )
    raw = yaml.safe_load(config.read_text())
    del raw["data"]["size"]
    config.write_text(yaml.safe_dump(raw))
    assert cli("validate", config)[0] == 0
    assert cli("train", config, "--out", tmp_path / "run")[0] == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss/kv/qwen2"] > 0 for r in rows if "loss/kv/qwen2" in r] == [True, True]


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    """The GPT-2 tokenizer with a plain '### role:' chat template: a second format next to SmolLM2's
    ChatML."""
    from kvdistill.models.load import load_tokenizer

    tok = load_tokenizer("gpt2-tokenizer")
    tok.chat_template = PLAIN_CHAT
    path = tmp_path_factory.mktemp("chat-tokenizer")
    tok.save_pretrained(path)
    return path


def test_a_messages_dataset_trains_with_each_model_in_its_own_chat_template(
    tmp_path, cli, chat_tokenizer, teacher_dirs
):
    data = tmp_path / "chat.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"What is {i} + 5?"},
                        {"role": "assistant", "content": f"{i} + 5 = {i + 5}. The answer is {i + 5}."},
                    ]
                }
            )
            + "\n"
            for i in range(10)
        )
    )
    config = write_config(
        tmp_path / "c.yaml",
        data={"source": "jsonl", "path": str(data), "eval_size": 2, "max_length": 96},
        student={"tokenizer": str(chat_tokenizer)},
        teachers=[{"name": "smollm2", "model": str(teacher_dirs["qwen2"])}],
    )  # SmolLM2's tokenizer
    raw = yaml.safe_load(config.read_text())
    del raw["data"]["size"]
    config.write_text(yaml.safe_dump(raw))
    assert cli("validate", config)[0] == 0
    assert cli("train", config, "--out", tmp_path / "run")[0] == 0
    sample = json.loads((tmp_path / "run" / "alignment_sample.json").read_text())
    assert sample["student"]["tokens"][:3] == ["###", "Ġuser", ":"]  # the student reads its own format ...
    teacher = sample["teachers"]["smollm2"]
    assert teacher["tokens"][0] == "<|im_start|>"  # ... the teacher its ChatML
    s_tokens, t_tokens, A = sample["student"]["tokens"], teacher["tokens"], teacher["alignment"]
    pairs = {
        (s_tokens[i], t_tokens[max(range(len(row)), key=row.__getitem__)])
        for i, row in enumerate(A)
        if sum(row)
    }
    assert ("What", "What") in pairs and ("Ġanswer", "Ġanswer") in pairs
    assert not any(
        s.startswith("#") or t.startswith("<|") for s, t in pairs
    )  # template markup aligns to nothing
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss/kv/smollm2"] > 0 for r in rows if "loss/kv/smollm2" in r)
    # a student tokenizer without a chat template is refused by validate, naming the fix
    code, err = cli("validate", config, "student.tokenizer=gpt2-tokenizer")
    assert code == 2 and "has no chat template" in err and "instruct model" in err


def test_an_in_memory_dataset_through_the_python_api(tmp_path, teacher_dirs):
    import datasets

    ds = datasets.Dataset.from_list(
        [{"question": f"What is {i} - 1?", "answer": str(i - 1)} for i in range(10)]
    )
    raw = json.loads(json.dumps(BASE))
    raw["data"] = {"eval_size": 2, "max_length": 48}
    raw["teachers"] = [{"name": "qwen2", "model": str(teacher_dirs["qwen2"])}]
    cfg = load_config(raw=raw)
    train(cfg, tmp_path / "run", dataset=ds, progress=False)
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved.data.source == "hf" and saved.data.path == str((tmp_path / "run" / "dataset").resolve())
    # the run directory keeps its data: the same records read back from it
    expected = load_records(cfg.data, "eval", dataset=ds)
    assert load_records(saved.data, "eval") == expected
    assert json.loads((tmp_path / "run" / "data.json").read_text())["train"]["records"] == 8


def test_kept_teacher_layers_the_layer_map_reads_are_checked_by_validate(tmp_path, cli, teacher_dirs):
    teacher = {
        "name": "qwen2",
        "model": str(teacher_dirs["qwen2"]),
        "compression": {"kind": "right_crop", "budget": 8, "layers": [0, 1]},
    }
    config = write_config(tmp_path / "c.yaml", teachers=[teacher])
    # a 2-layer student maps onto the first and last of the teacher's 3 layers (ratio): 0 and 2
    refused_alike(
        cli,
        config,
        tmp_path / "run",
        "teachers[0] (qwen2).compression.layers [0, 1] leaves out layers [2]",
        "keep them in compression.layers (e.g. [0, 2])",
    )
