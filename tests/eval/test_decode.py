"""The one greedy decoder's reading of an answer: new tokens decoded in the prompt's context (a SentencePiece
tokenizer keeps the answer's leading space, which decoding the new ids alone drops), and the tokens an answer
needs."""

from __future__ import annotations

import pytest

from kvdistill.eval.decode import pad_id, read_answer


@pytest.fixture(scope="module")
def tokenizers():
    from kvdistill.models.load import load_tokenizer

    return {name: load_tokenizer(name) for name in ("llama2-tokenizer", "gpt2-tokenizer")}


def split(tok, prompt: str, rest: str) -> tuple[list[int], list[int]]:
    """(prompt ids, the ids the whole text adds after them): a prompt and the tokens a model would
    generate."""
    prompt_ids, whole = tok(prompt).input_ids, tok(prompt + rest).input_ids
    assert whole[: len(prompt_ids)] == prompt_ids
    return prompt_ids, whole[len(prompt_ids) :]


@pytest.mark.parametrize(("name", "needed"), [("llama2-tokenizer", 5), ("gpt2-tokenizer", 3)])
def test_answer_is_read_in_the_prompts_context(tokenizers, name, needed):
    tok = tokenizers[name]
    prompt, new = split(tok, "Question: 3 + 4?\nAnswer:", " 7 apples\nQuestion: more")
    assert read_answer(tok, prompt, new, after_marker=False) == (" 7 apples\n", needed)  # cut after the line
    alone = tok.decode(new[:needed], skip_special_tokens=True)  # what decoding the new ids alone gave
    assert alone == (
        "7 apples\n" if name == "llama2-tokenizer" else " 7 apples\n"
    )  # SentencePiece drops the '▁'


@pytest.mark.parametrize(("name", "needed"), [("llama2-tokenizer", 16), ("gpt2-tokenizer", 11)])
def test_cot_answer_is_read_after_the_marker(tokenizers, name, needed):
    tok = tokenizers[name]
    prompt, new = split(tok, "Question: 3 + 4?\nReasoning:", " 3 + 4 = 7.\nAnswer: 7\nQuestion:")
    assert read_answer(tok, prompt, new, after_marker=True) == (" 3 + 4 = 7.\nAnswer: 7\n", needed)
    # no answer line ends: every token, the whole continuation
    assert read_answer(tok, prompt, new[:3], after_marker=True) == (
        tok.decode(prompt + new[:3], skip_special_tokens=True)[
            len(tok.decode(prompt, skip_special_tokens=True)) :
        ],
        3,
    )


def test_pad_id_is_the_pad_token_else_eos(tokenizers):
    tok = tokenizers["gpt2-tokenizer"]
    assert pad_id(tok) == tok.pad_token_id

    class Bare:
        pad_token_id, eos_token_id = None, 7

    assert pad_id(Bare()) == 7
