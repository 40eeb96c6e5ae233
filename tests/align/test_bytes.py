"""byte_spans: a fast tokenizer's character offsets -> UTF-8 byte spans, exact below the character.

Goldens on four real tokenizers, spans that tile the text and hold each token's own bytes on 30 mixed-script
texts, ASCII unchanged, batch == each text alone, the even-split fallback (goldens on BERT's NFD jamo and on
hand-made tokenizations), and errors that quote the bad input.
"""

from __future__ import annotations

import pytest
import torch

import kvdistill.align.bytes as byte_module
from kvdistill.align.bytes import byte_spans
from kvdistill.align.tokens import token_alignment
from kvdistill.errors import KvdistillError
from kvdistill.models.capture import tokenize

ZOO = ["smollm2-135m", "gemma3-270m", "gpt2-tokenizer", "llama2-tokenizer"]  # the fixtures are in conftest.py
BYTE_LEVEL = {"smollm2-135m", "gpt2-tokenizer"}


def encode(tok, text: str) -> tuple[list[str], list[tuple[int, int]], list[tuple[int, int]]]:
    """Tokens, the tokenizer's own character offsets, and `tokenize`'s byte spans of one text."""
    chars = [tuple(s) for s in tok(text, return_offsets_mapping=True)["offset_mapping"]]
    enc = tokenize(tok, [text])
    tokens = tok.convert_ids_to_tokens(enc["input_ids"][0].tolist())
    return tokens, chars, [tuple(s) for s in enc["offset_mapping"][0].tolist()]


def spelled(name: str, token: str) -> bytes:
    """The bytes a token stands for, written independently of the library: transformers' GPT-2 byte table for
    byte-level BPE, '<0xNN>' and '▁' -> ' ' for SentencePiece."""
    if name in BYTE_LEVEL:
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        byte_of = {ch: b for b, ch in bytes_to_unicode().items()}
        return bytes(byte_of[ch] for ch in token)
    if token.startswith("<0x") and token.endswith(">") and len(token) == 6:
        return bytes([int(token[3:5], 16)])
    return token.replace("▁", " ").encode()


# ------------------------------------------------------------------------------------------ goldens
GOLDEN = [
    # SmolLM2 splits each of 東 京 into two tokens that share its character span
    (
        "smollm2-135m",
        "東京",
        ["æĿ", "±", "äº", "¬"],
        [(0, 1), (0, 1), (1, 2), (1, 2)],
        [(0, 2), (2, 3), (3, 5), (5, 6)],
    ),
    # a token that holds a whole character (the space) and the first byte of the next one
    ("smollm2-135m", " 東", ["Ġæ", "Ŀ", "±"], [(0, 2), (1, 2), (1, 2)], [(0, 2), (2, 3), (3, 4)]),
    ("gpt2-tokenizer", "😀 x", ["ðŁĺ", "Ģ", "Ġx"], [(0, 1), (0, 1), (1, 3)], [(0, 3), (3, 4), (4, 6)]),
    # SentencePiece byte fallback: one byte per token
    (
        "llama2-tokenizer",
        "a 👨",
        ["<s>", "▁a", "▁", "<0xF0>", "<0x9F>", "<0x91>", "<0xA8>"],
        [(0, 0), (0, 1), (1, 2), (2, 3), (2, 3), (2, 3), (2, 3)],
        [(0, 0), (0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6)],
    ),
    # the '▁' Llama-2 prepends to the text stands for no byte of it
    (
        "llama2-tokenizer",
        "東京",
        ["<s>", "▁", "東", "京"],
        [(0, 0), (0, 1), (0, 1), (1, 2)],
        [(0, 0), (0, 0), (0, 3), (3, 6)],
    ),
    # a combining mark is a character of its own (2 bytes)
    (
        "gemma3-270m",
        "x\u0301 東京",
        ["<bos>", "x", "\u0301", "▁東京"],
        [(0, 0), (0, 1), (1, 2), (2, 5)],
        [(0, 0), (0, 1), (1, 3), (3, 10)],
    ),
]


@pytest.mark.parametrize(
    "name, text, tokens, chars, expected", GOLDEN, ids=[f"{g[0]}:{g[1]}" for g in GOLDEN]
)
def test_golden_byte_spans(load, name, text, tokens, chars, expected):
    got_tokens, got_chars, got_bytes = encode(load(name), text)
    assert got_tokens == tokens and got_chars == chars
    assert got_bytes == expected


# ------------------------------------------------------------------------------------------ 30 mixed texts
@pytest.mark.parametrize("name", ZOO)
def test_spans_tile_the_text_and_hold_each_tokens_own_bytes(load, mixed_texts, name):
    tok = load(name)
    specials = set(tok.all_special_ids)
    phantoms = 0
    for text in mixed_texts:
        enc = tokenize(tok, [text])
        ids, spans = enc["input_ids"][0].tolist(), enc["offset_mapping"][0].tolist()
        tokens, data = tok.convert_ids_to_tokens(ids), text.encode()
        real = [(k, a, z) for k, (a, z) in enumerate(spans) if z > a]
        # no gaps, no overlaps, the whole text
        assert real[0][1] == 0 and real[-1][2] == len(data), text
        assert all(real[k][2] == real[k + 1][1] for k in range(len(real) - 1)), text
        for k, (a, z) in enumerate(spans):
            if z == a:  # a special token, or Llama-2's prepended '▁' (stands for no byte of the text)
                phantoms += ids[k] not in specials
                assert ids[k] in specials or (name == "llama2-tokenizer" and tokens[k] == "▁" and k == 1), (
                    text
                )
                continue
            want = spelled(name, tokens[k])
            if name == "llama2-tokenizer" and k == real[0][0] and not text.startswith(" "):
                want = want.removeprefix(b" ")  # the prepended '▁' merged into the first word ('▁I')
            assert data[a:z] == want, (text, tokens[k])
    # Llama-2 prepends '▁' as a token of its own on the 14 texts that start with a character it cannot merge
    # with (CJK, emoji, Hebrew, Devanagari, Thai, a digit, 'ﬁ')
    assert phantoms == (14 if name == "llama2-tokenizer" else 0)


@pytest.mark.parametrize("name", ZOO)
def test_groups_are_resolved_vectorised(load, mixed_texts, name, monkeypatch):
    """Only groups the token lengths cannot explain reach the per-group Python (Llama-2's prepended '▁')."""
    calls = []
    real_matched = byte_module._matched
    monkeypatch.setattr(byte_module, "_matched", lambda *a: calls.append(a) or real_matched(*a))
    monkeypatch.setattr(byte_module, "_even_split", lambda *a: pytest.fail("no even split expected"))
    tokenize(load(name), mixed_texts)
    assert len(calls) == (14 if name == "llama2-tokenizer" else 0)


# ------------------------------------------------------------------------------------------ ASCII and batches
ASCII = [
    "The quick brown fox jumps over 13 lazy dogs.",
    "Question: 3 apples and 4 pears?\nAnswer: 7",
    "tabs\tand  double spaces, {json: [1, 2]} & <html>",
    "x",
]


@pytest.mark.parametrize("name", [*ZOO, "minilm-l6"])
def test_ascii_byte_spans_equal_character_offsets(load, name):
    tok = load(name)
    chars = tok(ASCII, return_offsets_mapping=True, padding=True, return_tensors="pt")["offset_mapping"]
    assert torch.equal(tokenize(tok, ASCII, padding_side=tok.padding_side)["offset_mapping"], chars)


def test_ascii_text_starting_with_a_digit_on_llama2(load):
    """The one change on ASCII: Llama-2's prepended '▁' before a digit shared the digit's span, now it is
    empty."""
    tokens, chars, spans = encode(load("llama2-tokenizer"), "42 apples")
    assert tokens[:3] == ["<s>", "▁", "4"] and chars[:3] == [(0, 0), (0, 1), (0, 1)]
    assert spans[:3] == [(0, 0), (0, 0), (0, 1)] and spans[3:] == chars[3:]
    eye = torch.eye(len(spans))
    eye[0, 0] = eye[1, 1] = 0  # <s> and the prepended '▁' cover no text
    assert torch.equal(token_alignment(spans, spans).to_dense(), eye)
    mixed = token_alignment(chars, chars).to_dense()  # with character spans '▁' and '4' mix half and half
    assert mixed[1, 1] == mixed[1, 2] == mixed[2, 1] == mixed[2, 2] == 0.5


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("name", ["smollm2-135m", "llama2-tokenizer"])
def test_batch_equals_each_text_alone(load, mixed_texts, name, padding_side):
    tok = load(name)
    texts = mixed_texts[:12]
    enc = tokenize(tok, texts, padding_side=padding_side)
    mask = enc["attention_mask"].bool()  # (B, T)
    assert bool((~mask).any())
    for b, text in enumerate(texts):
        alone = tokenize(tok, [text])["offset_mapping"][0]  # (T_b, 2)
        assert torch.equal(enc["offset_mapping"][b][mask[b]], alone), text
        assert bool((enc["offset_mapping"][b][~mask[b]] == 0).all())


# ------------------------------------------------------------------------------------------ fallback
def test_fallback_splits_a_shared_character_evenly_on_bert_jamo(load):
    """BERT's NFD turns 서 into two jamo tokens of 3 bytes each on one 3-byte character: the derived bytes
    cannot be reconciled, so the character's bytes are split evenly, in token order."""
    tokens, chars, spans = encode(load("minilm-l6"), "서울")
    assert tokens == ["[CLS]", "ᄉ", "##ᅥ", "##ᄋ", "##ᅮ", "##ᆯ", "[SEP]"]
    assert chars == [(0, 0), (0, 1), (0, 1), (1, 2), (1, 2), (1, 2), (0, 0)]
    # 서 (3 bytes, 2 tokens): [0, 3·1//2) = [0, 1) and [1, 3); 울 (3 bytes, 3 tokens): one byte each
    assert spans == [(0, 0), (0, 1), (1, 3), (3, 4), (4, 5), (5, 6), (0, 0)]
    eye = torch.eye(len(spans))
    eye[0, 0] = eye[-1, -1] = 0
    assert torch.equal(token_alignment(spans, spans).to_dense(), eye)  # still the identity


def test_fallback_on_hand_made_tokenizations(load):
    tok = load("gpt2-tokenizer")
    f, i = tok.convert_tokens_to_ids(["f", "i"])
    # NFKC-like: 'ﬁ' (3 bytes) spelled as 'f' 'i' (1 byte each) -> split 1 / 2
    out = byte_spans(tok, ["ﬁ"], [[f, i]], [[[0, 1], [0, 1]]])
    assert out.tolist() == [[[0, 1], [1, 3]]] and out.dtype == torch.int64
    # four tokens on one 3-byte character: at least one byte each, so two of them coincide
    out = byte_spans(tok, ["東"], [[f, i, f, i]], [[[0, 1]] * 4])
    assert out.tolist() == [[[0, 1], [0, 1], [1, 2], [2, 3]]]
    # the same input gives the same spans: deterministic
    assert torch.equal(byte_spans(tok, ["東"], [[f, i, f, i]], [[[0, 1]] * 4]), out)


def test_empty_batch_and_specials(load):
    tok = load("gemma3-270m")
    assert byte_spans(tok, ["", ""], torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0, 2)).shape == (
        2,
        0,
        2,
    )
    # a special token in the middle keeps an empty span, at the byte offset of its character
    out = byte_spans(tok, ["東京"], [[2, 2, 2]], [[[0, 1], [1, 1], [1, 2]]])
    assert out.tolist() == [[[0, 3], [3, 3], [3, 6]]]


def test_gpt2_byte_table_is_transformers():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    assert {ch: b for b, ch in bytes_to_unicode().items()} == byte_module._BYTE_OF


# ------------------------------------------------------------------------------------------ errors
def test_errors_quote_the_bad_input(load):
    tok = load("gpt2-tokenizer")
    with pytest.raises(
        KvdistillError,
        match=r"byte_spans got 2 texts, input_ids \(1, 2\) and offset_mapping "
        r"\(1, 2, 2\)",
    ) as err:
        byte_spans(tok, ["ab", "cd"], [[1, 2]], [[[0, 1], [1, 2]]])
    assert err.value.fix
    with pytest.raises(
        KvdistillError,
        match=r"offset_mapping\[0, 1\] = \[1, 5\] is not a span of text #0 "
        r"\(2 characters\)",
    ) as err:
        byte_spans(tok, ["東京"], [[1, 2]], [[[0, 1], [1, 5]]])
    assert "these very texts" in err.value.fix
