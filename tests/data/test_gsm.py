"""GSM-Symbolic generation: real reasoning_gym problems, chain of thought kept, train and eval disjoint."""

from __future__ import annotations

import pytest

from kvdistill.config import DataConfig
from kvdistill.data import gsm_symbolic_records, load_records
from kvdistill.data.answers import exact_match, extract_answer, normalize_number
from kvdistill.errors import KvdistillError

pytest.importorskip("reasoning_gym")


def test_records_non_empty_with_cot_and_answer_offset():
    records = gsm_symbolic_records(8, seed=0)
    assert len(records) == 8 and len({r["id"] for r in records}) == 8
    for r in records:
        assert r["question"] and r["answer"] and r["cot"]
        assert "####" not in r["cot"]  # GSM8K's final-answer line is dropped from the reasoning
        assert r["text"] == f"Question: {r['question']}\nReasoning: {r['cot']}\nAnswer: {r['answer']}\n"
        assert r["text"][r["answer_start"] :] == r["answer"] + "\n"  # the template ends the answer line
        assert exact_match(extract_answer(r["text"]), r["answer"])
        assert normalize_number(r["answer"]) == r["answer"]  # numeric gold, already in canonical form


def test_prefix_stable_and_seeded():
    assert gsm_symbolic_records(8, seed=0) == gsm_symbolic_records(12, seed=0)[:8]
    assert [r["question"] for r in gsm_symbolic_records(4, seed=0)] != [
        r["question"] for r in gsm_symbolic_records(4, seed=5)
    ]


def test_template_without_cot():
    records = gsm_symbolic_records(3, seed=1, template="Q: {question}\nA: {answer}")
    for r in records:
        assert (
            r["text"] == f"Q: {r['question']}\nA: {r['answer']}"
            and r["text"][r["answer_start"] :] == r["answer"]
        )


def test_load_records_split_disjoint_and_eval_independent_of_size():
    config = DataConfig(source="gsm_symbolic", size=24, eval_size=6, seed=2)
    train, evals = load_records(config, "train"), load_records(config, "eval")
    assert len(train) == 18 and len(evals) == 6
    assert {r["id"] for r in train}.isdisjoint(r["id"] for r in evals)
    assert {r["question"] for r in train}.isdisjoint(r["question"] for r in evals)
    bigger = DataConfig(source="gsm_symbolic", size=40, eval_size=6, seed=2)
    assert load_records(bigger, "eval") == evals


def test_no_eval_question_in_train():
    # GSM-Symbolic repeats problems (10% of 400 questions drawn with one seed recur among 40,000 drawn with
    # another); within one dataset no eval question may reach train.
    config = DataConfig(source="gsm_symbolic", size=400, eval_size=40, seed=3)
    train, evals = load_records(config, "train"), load_records(config, "eval")
    held = {" ".join(r["question"].split()) for r in evals}
    assert len(evals) == 40 and train and held.isdisjoint(" ".join(r["question"].split()) for r in train)
    assert evals == gsm_symbolic_records(40, seed=3)


def test_disk_file_round_trip_and_use_without_reasoning_gym(tmp_path, monkeypatch):
    import builtins

    from kvdistill.data import gsm

    monkeypatch.setenv("KVDISTILL_HOME", str(tmp_path))
    fresh = gsm.gsm_symbolic_records(40, seed=3)
    path = gsm.cache_file(3)
    assert path.is_file() and len(path.read_text().splitlines()) == 40 + 16
    # a machine without reasoning_gym reads the file and gets the same records, a shorter request its prefix
    real_import = builtins.__import__

    def no_gym(name, *args, **kwargs):
        if name == "reasoning_gym":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gym)
    assert gsm.gsm_symbolic_records(40, seed=3) == fresh
    assert gsm.gsm_symbolic_records(10, seed=3) == fresh[:10]
    # more than the file holds, without reasoning_gym: a clear error naming the file and the fix
    with pytest.raises(KvdistillError, match="holds 56") as err:
        gsm.gsm_symbolic_records(400, seed=3)
    assert "copy that file" in err.value.fix
    monkeypatch.setattr(builtins, "__import__", real_import)
    # a damaged file is ignored and rewritten
    path.write_text("{not json\n")
    assert gsm.gsm_symbolic_records(40, seed=3) == fresh
    assert len(path.read_text().splitlines()) == 56
