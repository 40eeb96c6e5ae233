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


# ------------------------------------------------------------------------------------------ the swap probe
def latent_student(vocab: int, iterations: int):
    """A tiny float64 llama latent student over a real tokenizer's vocabulary, its head changing what it
    feeds back (the identity start would hide a wrong latent)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from kvdistill.student.latent import LatentHead, LatentStudent

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "llama",
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    cfg._attn_implementation = "sdpa"
    backbone = AutoModelForCausalLM.from_config(cfg).double().eval()
    head = LatentHead(32, 3, "mlp").double()
    torch.nn.init.normal_(head.fc2.weight, std=0.5)
    return LatentStudent(backbone, head, iterations).eval()


@pytest.fixture(scope="module")
def swap_setup(tokenizers):
    from kvdistill.data.arith import arithmetic_records
    from kvdistill.data.gsm import DEFAULT_TEMPLATE

    tok = tokenizers["gpt2-tokenizer"]
    records = arithmetic_records(7, 3, template=DEFAULT_TEMPLATE)
    return tok, records, DEFAULT_TEMPLATE


def test_swap_donors_take_the_next_question_with_another_answer():
    from kvdistill.data.segments import segments
    from kvdistill.eval.decode import swap_donors

    def item(answer, prompt="Answer:"):
        template = "Question: {question}\nReasoning: {cot}\n" + prompt + " {answer}\n"
        r = {"id": answer, "question": "q", "cot": "c", "answer": answer}
        r["text"] = template.format(**r)
        return r, segments(r, template)

    usable = [item("1"), item("1"), item("2"), item("3", "Result:"), item("4", "Result:"), item("1")]
    # 0 and 1 skip the next record of the same answer; 3 and 4 pair within their own answer prompt; 5 wraps
    assert swap_donors(usable) == [2, 2, 5, 4, 3, 2]
    assert swap_donors([item("1"), item("1.0"), item("5", "Result:")]) is None  # 1 = 1.0; "Result:" alone


def test_swap_probe_answers_from_the_donors_latents(swap_setup):
    """Every swapped answer equals a one-by-one greedy loop over the question, the donor question's latents
    (computed alone) and the answer prompt; answers from the own latents differ for some rows, so using them
    would fail this."""
    from kvdistill.data.segments import segments
    from kvdistill.eval.decode import latent_exact_match, latent_swap_exact_match, swap_donors

    tok, records, template = swap_setup
    student = latent_student(len(tok), iterations=2)
    own = latent_exact_match(student, tok, records, template, max_new_tokens=4, batch_size=3)
    swap = latent_swap_exact_match(student, tok, records, template, max_new_tokens=4, batch_size=3)
    usable = [(r, segments(r, template)) for r in records]
    donors = swap_donors(usable)
    assert swap["n"] == own["n"] == 7 and len(swap["per_item"]) == 7
    rows = {s["id"]: s for s in swap["samples"]}  # the first 8 rows: all 7 here
    assert len(rows) == 7
    differ = 0
    with torch.no_grad():
        for (r, seg), j in zip(usable, donors, strict=True):
            d_ids = tok(usable[j][1].prefix, return_tensors="pt").input_ids
            e = student.latents(d_ids, torch.ones_like(d_ids))  # (1, M, d)
            q = tok(seg.prefix, return_tensors="pt").input_ids
            p = tok(seg.answer_prompt, add_special_tokens=False, return_tensors="pt").input_ids
            seq = torch.cat([student.embed(q), e, student.embed(p)], 1)
            new = []
            for _ in range(4):
                logits = student.backbone(inputs_embeds=seq).logits
                t = int(logits[0, -1].argmax())
                if t == tok.eos_token_id:
                    break
                new.append(t)
                seq = torch.cat([seq, student.embed(torch.tensor([[t]]))], 1)
            context = q[0].tolist() + p[0].tolist()
            assert rows[r["id"]]["generated"] == read_answer(tok, context, new, after_marker=False)[0]
            assert rows[r["id"]]["donor"] == usable[j][0]["id"]
            differ += (
                rows[r["id"]]["generated"]
                != next(s for s in own["samples"] if s["id"] == r["id"])["generated"]
            )
    assert differ > 0
    assert all(len(s["latent_reads"]) == 3 for s in swap["samples"] + own["samples"])  # M = 3 slots
    follows = [s["follows"] for s in swap["samples"]]
    assert swap["follows"] == sum(follows) / 7


def test_swap_probe_changes_nothing_when_the_latents_ignore_the_question(swap_setup):
    """With no Jacobi pass the latents are the head's learned start, the same for every question: swapping
    them must leave every answer as it was."""
    from kvdistill.eval.decode import latent_exact_match, latent_swap_exact_match

    tok, records, template = swap_setup
    student = latent_student(len(tok), iterations=0)
    own = latent_exact_match(student, tok, records, template, max_new_tokens=4, batch_size=4)
    swap = latent_swap_exact_match(student, tok, records, template, max_new_tokens=4, batch_size=4)
    assert swap["per_item"] == own["per_item"] and swap["exact_match"] == own["exact_match"]
    assert [s["generated"] for s in swap["samples"]] == [s["generated"] for s in own["samples"]]


def test_latents_are_read_only_for_the_rows_kept_as_samples(tokenizers):
    """The reads cost a pass: taken for the batches that hold the first 8 rows (the samples), not for the
    rest."""
    from kvdistill.data.arith import arithmetic_records
    from kvdistill.data.gsm import DEFAULT_TEMPLATE
    from kvdistill.eval.decode import SAMPLES, latent_exact_match

    tok = tokenizers["gpt2-tokenizer"]
    student = latent_student(len(tok), iterations=1)
    calls = []
    read = student.read_latents
    student.read_latents = lambda ids, mask, e: calls.append(ids.shape[0]) or read(ids, mask, e)
    out = latent_exact_match(
        student,
        tok,
        arithmetic_records(11, 3, template=DEFAULT_TEMPLATE),
        DEFAULT_TEMPLATE,
        max_new_tokens=2,
        batch_size=4,
    )
    assert calls == [4, 4] and SAMPLES == 8 and out["n"] == 11  # rows 0-3 and 4-7; not 8-10
    assert len(out["samples"]) == 8 and all(len(s["latent_reads"]) == 3 for s in out["samples"])
