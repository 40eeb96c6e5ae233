"""The one greedy decoder's reading of an answer: new tokens decoded in the prompt's context (a SentencePiece
tokenizer keeps the answer's leading space, which decoding the new ids alone drops), the tokens an answer
needs, and the stop that ends each generated row there."""

from __future__ import annotations

import pytest
import torch

from kvdistill.eval.decode import AnswerEnd, pad_id, read_answer


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


def feed(stop, prompts: list[list[int]], news: list[list[int]], pad: int) -> list[int | None]:
    """Call `stop` as `generate` does after each new token of a left-padded batch (rows that stopped are fed
    padding); the count of new tokens at which each row stopped, None where it never did."""
    width = max(map(len, prompts))
    length = max(map(len, news))
    rows = [[pad] * (width - len(p)) + p for p in prompts]
    stopped: list[int | None] = [None] * len(news)
    for n in range(1, length + 1):
        for b, new in enumerate(news):
            rows[b].append(new[n - 1] if stopped[b] is None and n <= len(new) else pad)
        done = stop(torch.tensor(rows), None)
        assert done.shape == (len(news),) and done.dtype == torch.bool
        for b in range(len(news)):
            if done[b] and stopped[b] is None:
                stopped[b] = n
    return stopped


@pytest.mark.parametrize("name", ["llama2-tokenizer", "gpt2-tokenizer"])
@pytest.mark.parametrize("after_marker", [False, True])
def test_answer_end_stops_each_row_where_read_answer_ends_it(tokenizers, name, after_marker):
    """Rows of one batch stop at the token read_answer's count names (there the answer line ends at a line
    break), the rest go on; a row without an answer line (with after_marker: none after 'Answer:') never
    stops; what read_answer reads from the cut row is what it reads from the whole one."""
    tok = tokenizers[name]
    pad = pad_id(tok)
    texts = [
        ("Question: 3 + 4?\nReasoning:", " 3 + 4 = 7.\nAnswer: 7\nQuestion: more"),
        ("Question: How many apples does Tom have now?\nReasoning:", " He had 2 and got 5 more"),
        ("Q: 1?\nReasoning:", " one.\nAnswer: 1\n\nAnswer: 2\n"),
    ]
    prompts, news = zip(*(split(tok, p, r) for p, r in texts), strict=True)
    stop = AnswerEnd(tok, list(prompts), max(map(len, prompts)), after_marker=after_marker, drop=(pad,))
    stopped = feed(stop, list(prompts), list(news), pad)
    for prompt, new, at in zip(prompts, news, stopped, strict=True):
        text, needed = read_answer(tok, prompt, new, after_marker=after_marker)
        if needed == len(new) and not text.endswith("\n"):
            assert at is None  # no answer line: to max_new_tokens, as before
        else:
            assert at == needed
            assert read_answer(tok, prompt, new[:at], after_marker=after_marker) == (text, needed)
    assert stopped[1] is None and stopped[0] is not None
    if after_marker:  # ends after "Answer: 7", not at the reasoning's line break
        assert tok.decode(news[0][: stopped[0]]).rstrip().endswith("Answer: 7")
    else:
        assert tok.decode(news[0][: stopped[0]]).strip() == "3 + 4 = 7."
