"""Records from real files (jsonl/csv/parquet/text): field mapping, template offsets, split, clear errors."""

from __future__ import annotations

import json
import logging

import pytest

from kvdistill.config import DataConfig
from kvdistill.data import batches, collate_records, load_records, render_template
from kvdistill.errors import KvdistillError

QA = [
    {"question": f"What is {i} + {i}?", "cot": f"{i} + {i} = {2 * i}" if i % 3 else None, "answer": 2 * i}
    for i in range(20)
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cfg(path, source="jsonl", **kw):
    return DataConfig(source=source, path=str(path), eval_size=kw.pop("eval_size", 4), **kw)


def both(config):
    return load_records(config, "train"), load_records(config, "eval")


# ---------------------------------------------------------------------------------------------- template
def test_render_template_offsets_and_skipped_cot():
    text, start = render_template("Q: {question}\nR: {cot}\nA: {answer}", "1+1?", None, "2")
    assert text == "Q: 1+1?\nA: 2" and start == len("Q: 1+1?\nA: ")
    text, start = render_template("Q: {question}\nR: {cot}\nA: {answer}", "x {answer} y", "because", "2")
    assert text == "Q: x {answer} y\nR: because\nA: 2" and text[start:] == "2"
    # {cot} sharing a line with other placeholders: only the placeholder goes
    text, start = render_template("{question} {cot} => {answer}", "q", None, "7")
    assert text == "q  => 7" and start == 6
    text, start = render_template("{question}", "q", "c", "a")
    assert (text, start) == ("q", None)


def test_unknown_placeholder_suggests(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", QA)
    with pytest.raises(KvdistillError, match=r"\{qestion\}.*did you mean '\{question\}'"):
        load_records(cfg(path, template="Q: {qestion} A: {answer}"))


# ---------------------------------------------------------------------------------------------- sources
def test_jsonl_template_mode(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", QA)
    train, evals = both(cfg(path))
    assert len(train) == 16 and len(evals) == 4
    for r in train + evals:
        assert r["text"][r["answer_start"] :] == r["answer"] + "\n"  # the template ends the answer line
        assert r["text"].startswith(f"Question: {r['question']}\n")
        i = int(r["id"].split(":")[1])
        assert r["answer"] == str(2 * i) and r["cot"] == QA[i]["cot"]
        assert ("Reasoning:" in r["text"]) == (QA[i]["cot"] is not None)
    assert {r["id"] for r in train}.isdisjoint(r["id"] for r in evals)
    assert {r["id"] for r in train + evals} == {f"qa.jsonl:{i}" for i in range(20)}


def test_csv_field_mapping_and_id_column(tmp_path):
    path = tmp_path / "data.csv"
    lines = ["uid,prompt,solution,final"] + [f"r{i},How many {i}?,count to {i},{i}" for i in range(10)]
    path.write_text("\n".join(lines) + "\n")
    config = cfg(
        path,
        "csv",
        question_field="prompt",
        cot_field="solution",
        answer_field="final",
        eval_size=2,
        template="{question}\n{cot}\n=> {answer}",
    )
    train, evals = both(config)
    r = evals[0]
    i = int(r["answer"])
    assert r["text"] == f"How many {i}?\ncount to {i}\n=> {i}" and r["text"][r["answer_start"] :] == str(i)
    assert r["id"] == f"data.csv:{i}"  # no 'id' column: file name and row
    write_jsonl(tmp_path / "ids.jsonl", [{"id": f"doc-{i}", **q} for i, q in enumerate(QA)])
    assert {r["id"] for r in both(cfg(tmp_path / "ids.jsonl"))[0]} <= {f"doc-{i}" for i in range(20)}


def test_parquet_text_field(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "docs.parquet"
    datasets.Dataset.from_list([{"body": f"document number {i}", "n": i} for i in range(12)]).to_parquet(
        str(path)
    )
    train, evals = both(cfg(path, "parquet", text_field="body", eval_size=3))
    assert len(train) == 9 and len(evals) == 3
    assert sorted(r["text"] for r in train + evals) == sorted(f"document number {i}" for i in range(12))
    assert all(r["answer_start"] is None and r["question"] is None for r in train)


def test_text_mode_locates_answer(tmp_path):
    rows = [{"text": f"The sum is {i * 7}. Final: {i * 7}", "answer": i * 7} for i in range(1, 9)]
    train, _ = both(cfg(write_jsonl(tmp_path / "t.jsonl", rows), eval_size=2))
    for r in train:
        assert r["text"][r["answer_start"] :] == r["answer"]  # the last occurrence
        assert r["answer_start"] == r["text"].rindex("Final: ") + len("Final: ")


def test_text_file_one_record_per_line(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text("first line\n\nsecond line\nthird line\n   \nfourth line\n")
    train, evals = both(cfg(path, "text", eval_size=1))
    got = {r["id"]: r["text"] for r in train + evals}
    assert got == {
        "lines.txt:1": "first line",
        "lines.txt:3": "second line",
        "lines.txt:4": "third line",
        "lines.txt:6": "fourth line",
    }


def test_limit_caps_and_eval_split_stable(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", QA)
    full_train, full_eval = both(cfg(path))
    capped_train, capped_eval = both(cfg(path, limit=10))
    assert [r["id"] for r in capped_eval] == [r["id"] for r in full_eval]
    assert len(capped_train) == 6 and {r["id"] for r in capped_train} <= {r["id"] for r in full_train}
    assert both(cfg(path)) == (full_train, full_eval)  # deterministic
    other_train, other_eval = both(cfg(path, seed=1))
    assert [r["id"] for r in other_eval] != [r["id"] for r in full_eval]
    assert {r["id"] for r in other_train}.isdisjoint(r["id"] for r in other_eval)
    assert load_records(cfg(path, eval_size=0), "eval") == []


# ---------------------------------------------------------------------------------------------- dedupe
def test_train_loses_exactly_the_questions_planted_from_eval(tmp_path, caplog):
    # 20 distinct problems plus 5 planted repeats of problems 0-4 (whitespace changed), each with its own id
    rows = [{"id": f"q{i}", **q} for i, q in enumerate(QA)]
    rows += [{"id": f"dup{i}", **QA[i], "question": f"  What is {i}  +\t{i}? "} for i in range(5)]
    path = write_jsonl(tmp_path / "planted.jsonl", rows)
    config = cfg(path, eval_size=8, seed=1)
    with caplog.at_level(logging.INFO, logger="kvdistill.data.records"):
        train, evals = both(config)
    eval_ids, train_ids = [r["id"] for r in evals], {r["id"] for r in train}
    assert len(evals) == 8
    twins = {f"q{i}": f"dup{i}" for i in range(5)} | {f"dup{i}": f"q{i}" for i in range(5)}
    dropped = {twins[x] for x in eval_ids if x in twins and twins[x] not in eval_ids}
    assert dropped  # seed 1 puts some twins on either side of the split (else the test would test nothing)
    assert train_ids == {r["id"] for r in rows} - set(eval_ids) - dropped
    assert len(train) == 25 - 8 - len(dropped)
    assert f"dropped {len(dropped)} of 17 train records" in caplog.text
    # eval is exactly the first 8 of the shuffled records (all 25 held out: the whole order), none dropped;
    # train keeps the order of the rest
    order = load_records(cfg(path, eval_size=25, seed=1), "eval")
    assert evals == order[:8]
    assert [r["id"] for r in train] == [r["id"] for r in order[8:] if r["id"] not in dropped]


def test_text_records_dedupe_on_normalised_text(tmp_path):
    rows = [{"text": f"document {i}"} for i in range(6)] + [{"text": f"document\n {i} "} for i in range(6)]
    train, evals = both(cfg(write_jsonl(tmp_path / "t.jsonl", rows), eval_size=3))
    held = {" ".join(r["text"].split()) for r in evals}
    assert len(evals) == 3 and len(train) == 12 - 3 - 3  # each eval text's twin leaves train
    assert held.isdisjoint(" ".join(r["text"].split()) for r in train)


def test_nothing_left_after_dedupe(tmp_path):
    rows = [{"id": f"r{i}", "question": "What is 2 + 2?", "answer": "4"} for i in range(4)]
    config = cfg(write_jsonl(tmp_path / "same.jsonl", rows), eval_size=1)
    with pytest.raises(
        KvdistillError, match=r"gives 4 records: the first 1 \(data.eval_size\) are held out and all 3 others"
    ) as info:
        load_records(config, "train")
    assert "none are left for training" in str(info.value) and "data.eval_size" in info.value.fix
    assert [r["question"] for r in load_records(config, "eval")] == ["What is 2 + 2?"]


# ---------------------------------------------------------------------------------------------- errors
def test_missing_path(tmp_path):
    with pytest.raises(KvdistillError, match="does not exist") as info:
        load_records(cfg(tmp_path / "nope.jsonl"))
    assert "nope.jsonl" in str(info.value) and info.value.fix


def test_typo_field_suggests_nearest_column(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", QA)
    with pytest.raises(KvdistillError) as info:
        load_records(cfg(path, question_field="questoin"))
    msg = str(info.value)
    assert "data.question_field = 'questoin'" in msg and "did you mean 'question'" in msg
    assert "columns: question, cot, answer" in msg
    with pytest.raises(KvdistillError, match="data.text_field = 'txt'.*columns: question, cot, answer"):
        load_records(cfg(path, text_field="txt"))
    with pytest.raises(KvdistillError, match="data.cot_field = 'reasoning'"):
        load_records(cfg(path, cot_field="reasoning"))


def test_neither_text_nor_question_column(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"a": 1, "b": 2}] * 8)
    with pytest.raises(
        KvdistillError, match=r"neither a 'text' column.*nor a 'question' column.*columns: a, b"
    ):
        load_records(cfg(path))


@pytest.mark.parametrize(
    "source,name,content",
    [
        ("jsonl", "e.jsonl", ""),
        ("jsonl", "w.jsonl", "\n \n"),
        ("csv", "h.csv", "question,answer\n"),
        ("text", "b.txt", "\n\n"),
    ],
)
def test_empty_file(tmp_path, source, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(KvdistillError, match="holds no records"):
        load_records(cfg(path, source))


def test_blank_text_names_row_and_id(tmp_path):
    rows = [{"id": f"doc-{i}", "text": "   " if i == 5 else f"text {i}"} for i in range(8)]
    with pytest.raises(KvdistillError, match=r"row 5 \(id 'doc-5'\): text is empty"):
        load_records(cfg(write_jsonl(tmp_path / "t.jsonl", rows)))
    rows = [{"question": "q", "answer": "" if i == 2 else "a"} for i in range(8)]
    with pytest.raises(
        KvdistillError, match=r"row 2 \(id 'qa.jsonl:2'\): answer \(data.answer_field\) is empty"
    ):
        load_records(cfg(write_jsonl(tmp_path / "qa.jsonl", rows)))


def test_too_few_records_for_eval_size(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", QA[:5])
    with pytest.raises(
        KvdistillError, match="eval_size = 5 but .* only 5 records: none are left for training"
    ):
        load_records(cfg(path, eval_size=5), "train")
    assert len(load_records(cfg(path, eval_size=5), "eval")) == 5
    with pytest.raises(KvdistillError, match="eval_size = 8 but .* only 5 records"):
        load_records(cfg(path, eval_size=8), "eval")


def test_wrong_format_and_duplicate_ids(tmp_path):
    path = tmp_path / "really.csv"
    path.write_text("question,answer\nq,1\n")
    with pytest.raises(KvdistillError, match="could not read .* as jsonl") as info:
        load_records(cfg(path, "jsonl"))
    assert "data.source" in info.value.fix
    dup = write_jsonl(
        tmp_path / "dup.jsonl", [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}, {"id": "b", "text": "z"}]
    )
    with pytest.raises(KvdistillError, match=r"ids \['a'\] occur more than once"):
        load_records(cfg(dup, eval_size=1))
    with pytest.raises(KvdistillError, match="split 'test'"):
        load_records(cfg(dup), "test")


# ---------------------------------------------------------------------------------------------- batches
def test_batches_deterministic_per_epoch():
    records = [{"id": str(i)} for i in range(10)]
    epoch0 = list(batches(records, 4, seed=3, epoch=0))
    assert [len(b) for b in epoch0] == [4, 4, 2]
    assert epoch0 == list(batches(records, 4, seed=3, epoch=0))
    assert sorted(r["id"] for b in epoch0 for r in b) == sorted(r["id"] for r in records)
    assert epoch0 != list(batches(records, 4, seed=3, epoch=1))
    assert epoch0 != list(batches(records, 4, seed=4, epoch=0))
    assert [len(b) for b in batches(records, 4, drop_last=True)] == [4, 4]
    assert collate_records(tuple(epoch0[0])) == epoch0[0]
    with pytest.raises(KvdistillError, match=r"batch_size \(0\)"):
        next(batches(records, 0))


def test_non_utf8_bytes_are_named_with_their_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "bad \xff\xfe bytes"}\n')
    before = path.read_bytes()
    with pytest.raises(KvdistillError, match=r"is not UTF-8: byte 0xff at offset 31 \(line 2\)") as err:
        load_records(DataConfig(source="jsonl", path=str(path), eval_size=0, limit=10))
    assert "iconv" in err.value.fix and path.read_bytes() == before


# ----------------------------------------------------------------------------------------- every record, caps
def test_a_thousand_record_file_is_read_whole_and_a_cap_is_logged(tmp_path, caplog):
    rows = [{"question": f"What is {i} times 3?", "answer": 3 * i} for i in range(1000)]
    path = write_jsonl(tmp_path / "big.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="kvdistill.data.records"):
        train, evals = both(cfg(path, eval_size=50))
    assert len(evals) == 50 and len(train) == 950  # no silent cut (it was data.size = 256)
    assert {r["id"] for r in train + evals} == {f"big.jsonl:{i}" for i in range(1000)}
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="kvdistill.data.records"):
        train, evals = both(cfg(path, eval_size=50, limit=300))
    assert (len(train), len(evals)) == (250, 50)
    assert [r.getMessage() for r in caplog.records] == [
        "data.path '" + str(path) + "': using 300 of its 1000 records (data.limit), 700 left out"
    ]


def test_size_is_for_generators_and_limit_for_files(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", QA)
    with pytest.raises(
        ValueError, match=r"data.size \(100\) is the number of generated problems.*data.limit: 100"
    ):
        DataConfig(source="jsonl", path=str(path), size=100)
    with pytest.raises(ValueError, match="data.limit caps the records of a file or dataset.*data.size: 5"):
        DataConfig(source="arithmetic", limit=5)
    with pytest.raises(ValueError, match="data.split is read by data.source hf only"):
        DataConfig(source="jsonl", path=str(path), split="test")


def test_blank_lines_skipped_are_logged(tmp_path, caplog):
    path = tmp_path / "lines.txt"
    path.write_text("one\n\n  \ntwo\nthree\n")
    with caplog.at_level(logging.WARNING, logger="kvdistill.data.modes"):
        records = load_records(cfg(path, "text", eval_size=0))
    assert [r["text"] for r in sorted(records, key=lambda r: r["id"])] == ["one", "two", "three"]
    assert any("skipped 2 blank line(s) of 5" in r.getMessage() for r in caplog.records)


# -------------------------------------------------------------------------------------- Hugging Face datasets
def test_a_saved_dataset_a_dataset_dict_split_and_a_folder_of_files(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([{"q": f"What is {i} + 1?", "a": str(i + 1)} for i in range(12)])
    ds.save_to_disk(str(tmp_path / "saved"))
    fields = {"question_field": "q", "answer_field": "a", "eval_size": 2}
    train, evals = both(DataConfig(source="hf", path=str(tmp_path / "saved"), **fields))
    assert len(train) == 10 and len(evals) == 2 and evals[0]["text"].startswith("Question: What is ")
    assert {r["id"] for r in train + evals} == {f"saved:{i}" for i in range(12)}

    datasets.DatasetDict({"train": ds, "test": ds.select(range(4))}).save_to_disk(str(tmp_path / "dict"))
    test_split = load_records(
        DataConfig(source="hf", path=str(tmp_path / "dict"), split="test", **fields), "eval"
    )
    assert len(test_split) == 2
    with pytest.raises(
        KvdistillError, match=r"data.split 'valid' is not a split of .* \(splits: train, test\)"
    ):
        load_records(DataConfig(source="hf", path=str(tmp_path / "dict"), split="valid", **fields))
    with pytest.raises(KvdistillError, match="holds a single split"):
        load_records(DataConfig(source="hf", path=str(tmp_path / "saved"), split="test", **fields))

    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "part-0.jsonl", QA[:10])
    write_jsonl(folder / "part-1.jsonl", QA[10:])
    train, evals = both(DataConfig(source="hf", path=str(folder), eval_size=4))
    assert len(train) + len(evals) == 20


def test_an_in_memory_dataset_and_a_field_that_is_not_a_column():
    import datasets

    ds = datasets.Dataset.from_list([{"question": f"Q{i}?", "answer": str(i)} for i in range(8)])
    train = load_records(DataConfig(eval_size=2), "train", dataset=ds)
    evals = load_records(DataConfig(eval_size=2), "eval", dataset=ds)
    assert len(train) == 6 and len(evals) == 2 and evals[0]["id"].startswith("dataset:")
    with pytest.raises(
        KvdistillError, match="data.question_field = 'prompt': no such column in the dataset passed in"
    ):
        load_records(DataConfig(source="hf", question_field="prompt", eval_size=2), dataset=ds)
    with pytest.raises(
        KvdistillError, match="a dataset was passed in, and the data section names another source"
    ):
        load_records(DataConfig(source="jsonl", path="x.jsonl"), dataset=ds)
    with pytest.raises(KvdistillError, match="data.source 'hf' needs data.path"):
        load_records(DataConfig(source="hf"))


def test_messages_rows_become_conversations_answered_by_the_last_assistant_turn(tmp_path):
    from kvdistill.models.chat import ChatText

    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} + 1?"},
                {"role": "assistant", "content": f"{i + 1}"},
            ]
        }
        for i in range(6)
    ]
    records = load_records(cfg(write_jsonl(tmp_path / "chat.jsonl", rows), eval_size=0))
    r = next(r for r in records if r["id"] == "chat.jsonl:2")
    assert isinstance(r["text"], ChatText) and r["text"] == "user: What is 2 + 1?\nassistant: 3\n"
    assert r["text"][r["answer_start"] :].startswith("3") and r["answer"] == "3"
    assert r["question"] == "user: What is 2 + 1?\nassistant: "
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user"}]}])
    with pytest.raises(KvdistillError, match="is not a non-empty list of {role, content} messages"):
        load_records(cfg(bad, eval_size=0, messages_field="messages"))
    with pytest.raises(KvdistillError, match="data.messages_field = 'chat': no such column"):
        load_records(cfg(tmp_path / "chat.jsonl", eval_size=0, messages_field="chat"))
