"""Token alignment on UTF-8 byte spans: equivalence to a brute-force IoU reference on five real tokenizers,
the identity for a tokenization aligned with itself on 30 mixed-script texts, partial-character tokens paired
byte for byte across tokenizers, golden values, overlapping / unsorted / truncated spans, batch == per-sample,
and errors that quote the bad input. Prefix partners (`prefix_positions`) against a brute force over the
texts' bytes on real tokenizer pairs, and the identity for one tokenization; common chunks spell the same
bytes on both sides, in order, with no common boundary inside."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvdistill.align.bytes import byte_spans
from kvdistill.align.tokens import (
    align_to_student,
    batch_token_alignment,
    common_chunks,
    prefix_positions,
    token_alignment,
)
from kvdistill.errors import KvdistillError
from kvdistill.models.capture import tokenize

TOKENIZERS = ["smollm2-135m", "gemma3-270m", "minilm-l6", "gpt2-tokenizer", "llama2-tokenizer"]
PAIRS = list(itertools.permutations(TOKENIZERS, 2))  # (student, teacher), 20 ordered pairs
ZOO = ["smollm2-135m", "gemma3-270m", "gpt2-tokenizer", "llama2-tokenizer"]


@functools.cache
def tokenizer(name: str):
    from kvdistill.models.load import load_tokenizer

    return load_tokenizer(name)


def chars_of(name: str, text: str, **kwargs) -> list[tuple[int, int]]:
    """The tokenizer's own character offsets."""
    return tokenizer(name)(text, return_offsets_mapping=True, add_special_tokens=True, **kwargs)[
        "offset_mapping"
    ]


def spans_of(name: str, text: str, **kwargs) -> list[tuple[int, int]]:
    """UTF-8 byte spans (what `tokenize` returns), also for the empty text `tokenize` refuses."""
    tok = tokenizer(name)
    encoding = tok(text, return_offsets_mapping=True, add_special_tokens=True, **kwargs)
    ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    spans = byte_spans(
        tok,
        [text],
        torch.tensor([ids], dtype=torch.long).view(1, -1),
        torch.tensor([offsets], dtype=torch.long).view(1, -1, 2),
    )  # (1, T, 2)
    return [tuple(s) for s in spans[0].tolist()]


def reference(student: list, teacher: list) -> torch.Tensor:
    """The definition, one pair at a time: IoU of [start, end) intervals, rows normalised to sum to 1 or 0."""
    out = torch.zeros(len(student), len(teacher), dtype=torch.float64)
    for i, (a0, a1) in enumerate(student):
        for j, (b0, b1) in enumerate(teacher):
            inter = min(a1, b1) - max(a0, b0)
            if a1 > a0 and b1 > b0 and inter > 0:
                out[i, j] = inter / ((a1 - a0) + (b1 - b0) - inter)
        total = out[i].sum()
        if total > 0:
            out[i] /= total
    return out.float()


def check(student: list, teacher: list) -> torch.Tensor:
    """token_alignment agrees with the reference and has the promised form; returns it dense."""
    align = token_alignment(student, teacher)
    assert align.layout == torch.sparse_coo and align.is_coalesced() and align.dtype == torch.float32
    assert tuple(align.shape) == (len(student), len(teacher))
    assert bool((align.values() > 0).all())  # only true overlaps are stored
    dense = align.to_dense()
    torch.testing.assert_close(dense, reference(student, teacher), atol=1e-6, rtol=0)
    sums = dense.sum(dim=1)
    assert bool(((sums - 1).abs() < 1e-5).logical_or(sums == 0).all())
    return dense


# ------------------------------------------------------------------------------------------ property tests
MIXED = list("abcXYZ  \n\t0123456789.,!?-éèüñçÅø中文日本語東京한국어😀👍🏽🎉❤️\u200d👩👨👧🇫🇷")
texts = st.text(
    alphabet=st.one_of(st.characters(codec="utf-8", exclude_categories=("Cs",)), st.sampled_from(MIXED)),
    max_size=200,
)


@pytest.mark.parametrize("student_name,teacher_name", PAIRS, ids=[f"{s}->{t}" for s, t in PAIRS])
@settings(max_examples=40, deadline=None)
@given(text=texts)
def test_matches_bruteforce_on_real_tokenizers(student_name, teacher_name, text):
    check(spans_of(student_name, text), spans_of(teacher_name, text))


intervals = st.lists(
    st.tuples(st.integers(0, 40), st.integers(0, 12)).map(lambda p: (p[0], p[0] + p[1])), max_size=30
)


@settings(max_examples=200, deadline=None)
@given(student=intervals, teacher=intervals)
def test_matches_bruteforce_on_arbitrary_intervals(student, teacher):
    """Unsorted, duplicated, nested and empty intervals: the sweep's candidate filter must stay exact."""
    check(student, teacher)


# ----------------------------------------------------------------------------------------- hand-written cases
def test_special_tokens_with_empty_spans_get_zero_rows():
    student = [(0, 0), (0, 5), (5, 11), (0, 0)]  # [CLS] hello world [SEP]
    teacher = [(0, 0), (0, 5), (5, 11)]  # <bos> hello world
    dense = check(student, teacher)
    assert torch.equal(dense, torch.tensor([[0, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]], dtype=torch.float32))


def test_identical_tokenizations_give_identity():
    text = "The quick brown fox jumps over 13 lazy dogs.\nNew line, same tokens."
    spans = spans_of("smollm2-135m", text)
    assert all(b > a for a, b in spans) and all(spans[i][1] <= spans[i + 1][0] for i in range(len(spans) - 1))
    assert torch.equal(token_alignment(spans, spans).to_dense(), torch.eye(len(spans)))


@pytest.mark.parametrize("name", ZOO)
def test_identity_on_mixed_script_texts(mixed_texts, name):
    """A tokenization aligned with itself is exactly the identity on its tokens that cover text (specials and
    Llama-2's prepended '▁' have empty spans, so zero rows), on CJK, emoji, combining marks, RTL scripts.
    With character spans, the tokens one character is split into would mix instead."""
    tok = tokenizer(name)
    broken_by_chars = 0
    for text in mixed_texts:
        enc = tokenize(tok, [text])
        spans = enc["offset_mapping"][0]  # (T, 2) bytes
        covered = (spans[:, 1] > spans[:, 0]).float()  # (T,)
        assert torch.equal(token_alignment(spans, spans).to_dense(), torch.diag(covered)), text
        chars = torch.tensor(chars_of(name, text))  # (T, 2)
        broken_by_chars += not torch.equal(
            token_alignment(chars, chars).to_dense(), torch.diag((chars[:, 1] > chars[:, 0]).float())
        )
    # byte-level BPE and byte fallback split characters on most of these 30 texts; Gemma-3 only rare ones
    assert (
        broken_by_chars
        == {"smollm2-135m": 28, "gemma3-270m": 3, "gpt2-tokenizer": 29, "llama2-tokenizer": 21}[name]
    )


@pytest.mark.parametrize("student_name,teacher_name", PAIRS, ids=[f"{s}->{t}" for s, t in PAIRS])
def test_matches_bruteforce_on_mixed_script_texts(mixed_texts, student_name, teacher_name):
    for text in mixed_texts:
        check(spans_of(student_name, text), spans_of(teacher_name, text))


def test_partial_character_tokens_pair_with_the_same_bytes_across_tokenizers():
    """'鱻' is 3 bytes E9 B1 BB. SmolLM2: 'Ġé' (space + E9), '±' (B1), '»' (BB); Llama-2: '▁' (space) and one
    byte-fallback token per byte. On bytes each partial-character token pairs with the other side's same
    bytes; on characters every token of 鱻 mixed with all of the other side's."""
    text = "a 鱻"
    smol, llama = spans_of("smollm2-135m", text), spans_of("llama2-tokenizer", text)
    assert smol == [(0, 1), (1, 3), (3, 4), (4, 5)]  # a, 'Ġé', '±', '»'
    assert llama == [(0, 0), (0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]  # <s>, '▁a', '▁', <0xE9>, <0xB1>, <0xBB>
    expected = torch.tensor(
        [
            [0, 1, 0, 0, 0, 0],  # a -> '▁a'
            [0, 0, 0.5, 0.5, 0, 0],  # 'Ġé' [1, 3) -> '▁' [1, 2) and <0xE9> [2, 3), IoU 1/2 each
            [0, 0, 0, 0, 1, 0],  # '±' -> <0xB1>
            [0, 0, 0, 0, 0, 1],  # '»' -> <0xBB>
        ]
    )
    torch.testing.assert_close(check(smol, llama), expected, atol=1e-7, rtol=0)
    back = torch.zeros(6, 4)
    back[1, 0] = back[2, 1] = back[3, 1] = back[4, 2] = back[5, 3] = (
        1  # each byte lies inside one SmolLM2 token
    )
    torch.testing.assert_close(check(llama, smol), back, atol=1e-7, rtol=0)
    # the same pair on character spans: 'Ġé' (1, 3) overlaps '▁' (1, 2) and the three (2, 3) byte tokens
    on_chars = check(chars_of("smollm2-135m", text), chars_of("llama2-tokenizer", text))
    torch.testing.assert_close(on_chars[2], torch.tensor([0, 0, 0, 1 / 3, 1 / 3, 1 / 3]), atol=1e-7, rtol=0)


def test_one_student_token_covering_two_teacher_tokens():
    # student "foobar" [0, 6); teacher "foob" [0, 4) and "ar-baz" [4, 10).
    # IoU = 4/6 and 2/10; normalised: (2/3) / (2/3 + 1/5) = 10/13 and (1/5) / (13/15) = 3/13.
    dense = check([(0, 6)], [(0, 4), (4, 10)])
    torch.testing.assert_close(dense, torch.tensor([[10 / 13, 3 / 13]]), atol=1e-7, rtol=0)
    # exact cover: IoU 4/10 and 6/10, already summing to 1
    torch.testing.assert_close(
        check([(0, 10)], [(0, 4), (4, 10)]), torch.tensor([[0.4, 0.6]]), atol=1e-7, rtol=0
    )


def test_overlapping_and_unsorted_spans():
    # student [0, 4) vs teacher duplicates [0, 4), [0, 4) and [2, 6): IoU 1, 1, 2/6 -> 3/7, 3/7, 1/7
    torch.testing.assert_close(
        check([(0, 4)], [(0, 4), (0, 4), (2, 6)]), torch.tensor([[3 / 7, 3 / 7, 1 / 7]]), atol=1e-7, rtol=0
    )
    # nested teacher spans, out of order: [3, 4) vs [0, 10) (IoU 1/10) and [3, 4) (IoU 1) -> 1/11, 10/11;
    # [5, 6) lies after the nested [1, 2) and [3, 4) but inside [0, 10) only
    dense = check([(5, 6), (3, 4)], [(3, 4), (0, 10), (1, 2)])
    expected = torch.tensor([[0, 1, 0], [10 / 11, 1 / 11, 0]])
    torch.testing.assert_close(dense, expected, atol=1e-7, rtol=0)


def test_emoji_and_cjk_with_byte_level_overlaps():
    text = "I ❤️ 東京 and 서울! 😀👍🏽 family: 👨\u200d👩\u200d👧 flags 🇫🇷🇯🇵 done."
    chars, gpt2 = chars_of("gpt2-tokenizer", text), spans_of("gpt2-tokenizer", text)
    assert len(set(chars)) < len(chars)  # on characters byte-level BPE gives several tokens the same span
    assert len(set(gpt2)) == len(gpt2)  # on bytes never
    char_of_byte = [c for c, ch in enumerate(text) for _ in ch.encode()]  # byte -> its character
    for student_name, teacher_name in PAIRS:
        dense = check(spans_of(student_name, text), spans_of(teacher_name, text))
        # a non-empty student token aligns to nothing only where the teacher drops the characters:
        # BERT's WordPiece leaves whitespace and the emoji variation selector U+FE0F out of every token
        for (a, b), total in zip(spans_of(student_name, text), dense.sum(dim=1).tolist(), strict=True):
            if b > a and total == 0:
                dropped = {text[char_of_byte[k]] for k in range(a, b)}
                assert teacher_name == "minilm-l6" and dropped <= {" ", "\ufe0f", "\u200d"}


def test_truncated_teacher_leaves_tail_rows_zero():
    text = "Alignment survives truncation: the tail of the student has nothing to align to at all."
    student = spans_of("smollm2-135m", text)
    teacher = spans_of("gemma3-270m", text, truncation=True, max_length=6)
    assert len(teacher) == 6
    dense = check(student, teacher)
    covered = max(end for _, end in teacher)
    tail = torch.tensor([a >= covered for a, _ in student])
    assert bool(tail.any()) and bool((dense[tail] == 0).all())
    assert bool((dense[~tail].sum(dim=1) > 0.999).all())


def test_empty_inputs_and_tensor_inputs():
    assert tuple(token_alignment([], [(0, 3)]).shape) == (0, 1)
    assert token_alignment([(0, 3)], []).to_dense().shape == (1, 0)
    assert token_alignment([(0, 0)], [(0, 0)])._nnz() == 0
    as_tensor = token_alignment(torch.tensor([[0, 6]], dtype=torch.int32), torch.tensor([[0, 4], [4, 10]]))
    torch.testing.assert_close(as_tensor.to_dense(), torch.tensor([[10 / 13, 3 / 13]]))


# ------------------------------------------------------------------------------------------ batch
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batch_equals_per_sample(padding_side):
    texts = [
        "Short one.",
        "A much longer second sample with 42 digits, café and 東京 😀.",
        "",
        "Third: multiple\nlines\n\nof text.",
    ]
    encoded = {}
    for name in ("gemma3-270m", "minilm-l6"):
        tok = tokenizer(name)
        old_side, tok.padding_side = tok.padding_side, padding_side
        try:
            encoded[name] = tok(texts, return_offsets_mapping=True, padding=True, return_tensors="pt")
        finally:
            tok.padding_side = old_side
        enc = encoded[name]
        enc["offset_mapping"] = byte_spans(tok, texts, enc["input_ids"], enc["offset_mapping"])  # (B, T, 2)
    s, t = encoded["gemma3-270m"], encoded["minilm-l6"]
    s_mask, t_mask = s["attention_mask"], t["attention_mask"]  # (B, T_s), (B, T_t)
    assert bool((s_mask == 0).any()) and bool((t_mask == 0).any())
    batch = batch_token_alignment(s["offset_mapping"], s_mask, t["offset_mapping"], t_mask)  # (B, T_s, T_t)
    assert batch.shape == (len(texts), s_mask.shape[1], t_mask.shape[1]) and batch.dtype == torch.float32
    for b in range(len(texts)):
        keep_s, keep_t = s_mask[b].bool(), t_mask[b].bool()
        single = token_alignment(s["offset_mapping"][b][keep_s], t["offset_mapping"][b][keep_t]).to_dense()
        assert torch.equal(batch[b][keep_s][:, keep_t], single)
        assert bool((batch[b][~keep_s] == 0).all()) and bool((batch[b][:, ~keep_t] == 0).all())


def test_batch_mask_wins_over_nonempty_padding_spans():
    # padding that carries a real-looking span must still be zeroed by the mask
    spans = torch.tensor([[[0, 3], [3, 6], [0, 6]], [[0, 2], [2, 4], [4, 6]]])  # (B=2, T=3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    out = batch_token_alignment(spans, mask, spans, mask)
    torch.testing.assert_close(out[0], torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 0]]))
    torch.testing.assert_close(out[1], torch.eye(3))


def test_align_to_student_is_the_weighted_mix():
    spans_s = torch.tensor([[[0, 6], [6, 8]]])  # (B=1, T_s=2, 2)
    spans_t = torch.tensor([[[0, 4], [4, 10]]])  # (B=1, T_t=2, 2)
    ones = torch.ones(1, 2, dtype=torch.long)
    alignment = batch_token_alignment(spans_s, ones, spans_t, ones)  # (1, 2, 2)
    teacher = torch.randn(1, 3, 2, 5)  # (B, H, T_t, D)
    out = align_to_student(teacher, alignment)  # (B, H, T_s, D)
    assert out.shape == (1, 3, 2, 5)
    torch.testing.assert_close(out[0, :, 0], 10 / 13 * teacher[0, :, 0] + 3 / 13 * teacher[0, :, 1])
    torch.testing.assert_close(out[0, :, 1], teacher[0, :, 1])  # [6, 8) lies inside [4, 10) only
    eye = torch.eye(2)[None]  # (1, T, T)
    torch.testing.assert_close(align_to_student(teacher, eye), teacher)


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "student,teacher,message",
    [
        ([[0, 1, 2]], [[0, 1]], "student_spans has shape (1, 3), expected (T, 2)"),
        ([[0, 1]], [0, 1, 2], "teacher_spans has shape (3,), expected (T, 2)"),
        ([[0, 2], [-1, 3]], [[0, 1]], "student_spans[1] = [-1, 3] is negative"),
        ([[0, 2]], [[0, 1], [5, 3]], "teacher_spans[1] = [5, 3] has start 5 > end 3"),
        ([[0.5, 2]], [[0, 1]], "non-integer"),
    ],
)
def test_bad_spans_raise(student, teacher, message):
    with pytest.raises(KvdistillError) as err:
        token_alignment(student, teacher)
    assert message in str(err.value) and err.value.fix


def test_batch_errors_quote_shapes():
    spans = torch.zeros(2, 3, 2, dtype=torch.long)
    with pytest.raises(
        KvdistillError, match=r"student_spans \(2, 3, 2\) has B = 2, teacher_spans \(1, 3, 2\) has B = 1"
    ):
        batch_token_alignment(spans, torch.ones(2, 3), spans[:1], torch.ones(1, 3))
    with pytest.raises(
        KvdistillError, match=r"teacher_mask has shape \(2, 4\) but teacher_spans has \(B, T\) = \(2, 3\)"
    ):
        batch_token_alignment(spans, torch.ones(2, 3), spans, torch.ones(2, 4))
    with pytest.raises(KvdistillError, match=r"student_spans has shape \(3, 2\), expected \(B, T, 2\)"):
        batch_token_alignment(spans[0], torch.ones(3), spans, torch.ones(2, 3))
    bad = spans.clone()
    bad[1, 2] = torch.tensor([4, 1])
    with pytest.raises(KvdistillError, match=r"teacher_spans\[1, 2\] = \[4, 1\] has start 4 > end 1"):
        batch_token_alignment(spans, torch.ones(2, 3), bad, torch.ones(2, 3))


def test_align_to_student_errors_quote_shapes():
    with pytest.raises(
        KvdistillError, match=r"alignment \(2, 3, 5\) does not match teacher_tensor \(2, 4, 6, 8\)"
    ):
        align_to_student(torch.zeros(2, 4, 6, 8), torch.zeros(2, 3, 5))
    with pytest.raises(KvdistillError, match=r"teacher_tensor has shape \(4, 6, 8\)"):
        align_to_student(torch.zeros(4, 6, 8), torch.zeros(2, 3, 6))


# --------------------------------------------------------------------------------------- sparse (gather) form
SPARSE_TEXTS = [
    "Question: 3 apples and 4 pears, how many fruits?\nAnswer: 7",
    "Ünïcode ✓ 数学 🙂 ok, naïve café — 12.5%",
    "short",
]


@pytest.mark.parametrize(
    "student_name, teacher_name",
    [
        ("gpt2-tokenizer", "smollm2-135m"),
        ("smollm2-135m", "llama2-tokenizer"),
        ("llama2-tokenizer", "gpt2-tokenizer"),
    ],
)
def test_sparse_alignment_resampling_equals_dense_einsum(student_name, teacher_name):
    """Rows = teacher tokens as the objective uses it: the gather form equals einsum with the dense
    alignment."""
    from kvdistill.align.tokens import batch_token_alignment_sparse, resample_rows
    from kvdistill.models.capture import tokenize

    s = tokenize(tokenizer(student_name), SPARSE_TEXTS)
    t = tokenize(tokenizer(teacher_name), SPARSE_TEXTS)
    dense = batch_token_alignment(
        t["offset_mapping"], t["attention_mask"], s["offset_mapping"], s["attention_mask"]
    )
    index, weight = batch_token_alignment_sparse(
        t["offset_mapping"], t["attention_mask"], s["offset_mapping"], s["attention_mask"]
    )  # (B, M, K)
    B, M, T_s = dense.shape
    assert index.shape[:2] == weight.shape[:2] == (B, M) and 1 <= index.shape[2] <= 4
    rebuilt = torch.zeros(B, M, T_s).scatter_add_(2, index, weight)
    assert torch.equal(rebuilt, dense)
    x = torch.randn(B, 3, T_s, 8, generator=torch.Generator().manual_seed(0))  # (B, H, T_s, D)
    ref = torch.einsum("bmt,bhtd->bhmd", dense, x)
    out = resample_rows(x, index[:, None], weight[:, None])
    assert (out - ref).abs().max() <= 1e-6
    # per head (compressed teachers keep different tokens per head): (B, H, M, K)
    heads = resample_rows(x, index[:, None].expand(B, 3, M, -1), weight[:, None].expand(B, 3, M, -1))
    assert torch.equal(heads, out)
    # in bfloat16 the result stays close to the float32 reference
    low = resample_rows(x.bfloat16(), index[:, None], weight[:, None])
    assert low.dtype == torch.bfloat16 and (low.float() - ref).abs().max() <= 0.05


def test_sparse_alignment_of_an_empty_overlap_is_one_zero_slot():
    from kvdistill.align.tokens import batch_token_alignment_sparse

    index, weight = batch_token_alignment_sparse(
        torch.tensor([[[0, 0]]]), torch.ones(1, 1), torch.tensor([[[0, 3]]]), torch.ones(1, 1)
    )
    assert index.shape == (1, 1, 1) and float(weight.sum()) == 0.0


def _brute_partners(text: str, s_spans, s_mask, t_spans, t_mask) -> list[int]:
    """Per student position, the last teacher position whose tokens so far spell the same bytes with as many
    special tokens after them, by concatenating the bytes of each side's tokens one position at a time."""
    data = text.encode("utf-8")

    def states(spans, mask):
        out, read, extra = [], b"", 0
        for (a, e), m in zip(spans.tolist(), mask.tolist(), strict=True):
            if not m:
                out.append(None)
                continue
            if e > a:
                read, extra = read + data[a:e], 0
            else:
                extra += 1
            out.append((read, extra))
        return out

    teacher = states(t_spans, t_mask)
    return [
        max((j for j, st_ in enumerate(teacher) if st_ == state), default=-1) if state is not None else -1
        for state in states(s_spans, s_mask)
    ]


@pytest.mark.parametrize(
    "student_name, teacher_name",
    [
        ("gpt2-tokenizer", "smollm2-135m"),
        ("smollm2-135m", "llama2-tokenizer"),
        ("llama2-tokenizer", "gemma3-270m"),
    ],
)
def test_prefix_positions_match_bruteforce(mixed_texts, student_name, teacher_name):
    texts = mixed_texts[:12] + ["Question: Compute 3 + 4.\nAnswer: 7"]
    s = tokenize(tokenizer(student_name), texts, max_length=40)
    t = tokenize(tokenizer(teacher_name), texts, max_length=32)  # truncated shorter: a tail without partners
    got = prefix_positions(s["offset_mapping"], s["attention_mask"], t["offset_mapping"], t["attention_mask"])
    paired = 0
    for b, text in enumerate(texts):
        want = _brute_partners(
            text,
            s["offset_mapping"][b],
            s["attention_mask"][b],
            t["offset_mapping"][b],
            t["attention_mask"][b],
        )
        assert got[b].tolist() == want, (b, text)
        paired += sum(j >= 0 for j in want)
    assert paired > 0.5 * int(s["attention_mask"].sum())  # most positions have a partner


@pytest.mark.parametrize("name", ZOO)
def test_prefix_positions_of_one_tokenization_are_the_identity(mixed_texts, name):
    enc = tokenize(tokenizer(name), mixed_texts, max_length=48)
    got = prefix_positions(
        enc["offset_mapping"], enc["attention_mask"], enc["offset_mapping"], enc["attention_mask"]
    )
    T = got.shape[1]
    want = torch.where(enc["attention_mask"].bool(), torch.arange(T), -1)
    assert torch.equal(got, want)


def test_prefix_positions_golden_and_errors():
    # student: BOS "ab" "c"; teacher: "a" "bc" EOS. Partners: after "abc" (student 2 <- teacher 1).
    got = prefix_positions(
        torch.tensor([[[0, 0], [0, 2], [2, 3]]]),
        torch.ones(1, 3),
        torch.tensor([[[0, 1], [1, 3], [3, 3]]]),
        torch.ones(1, 3),
    )
    assert got.tolist() == [[-1, -1, 1]]
    with pytest.raises(KvdistillError, match="batch size mismatch"):
        prefix_positions(torch.zeros(2, 3, 2), torch.ones(2, 3), torch.zeros(1, 3, 2), torch.ones(1, 3))


@pytest.mark.parametrize(
    "student_name, teacher_name",
    [
        ("gpt2-tokenizer", "smollm2-135m"),
        ("smollm2-135m", "llama2-tokenizer"),
        ("llama2-tokenizer", "gemma3-270m"),
    ],
)
def test_common_chunks_spell_the_same_bytes_and_are_minimal(mixed_texts, student_name, teacher_name):
    texts = mixed_texts[:12] + ["Question: Compute 3 + 4.\nAnswer: 7"]
    s = tokenize(tokenizer(student_name), texts, max_length=40)
    t = tokenize(tokenizer(teacher_name), texts, max_length=32)
    s_chunk, t_chunk = common_chunks(
        s["offset_mapping"], s["attention_mask"], t["offset_mapping"], t["attention_mask"]
    )
    total = 0
    for b, text in enumerate(texts):
        data = text.encode("utf-8")

        def pieces(spans, chunks, b=b, data=data):  # chunk -> the bytes of its tokens, in token order
            out: dict[int, list[bytes]] = {}
            for (a, e), c in zip(spans[b].tolist(), chunks[b].tolist(), strict=True):
                if c >= 0:
                    out.setdefault(c, []).append(data[a:e])
            return out

        sp, tp = pieces(s["offset_mapping"], s_chunk), pieces(t["offset_mapping"], t_chunk)
        assert sorted(sp) == sorted(tp) == list(range(len(sp)))  # the same chunks, numbered 0, 1, ...
        covered = b"".join(b"".join(sp[c]) for c in range(len(sp)))
        assert data.startswith(covered)
        for c in range(len(sp)):
            assert b"".join(sp[c]) == b"".join(tp[c])  # both sides spell exactly the chunk's bytes
            ends_s = {len(b"".join(sp[c][: i + 1])) for i in range(len(sp[c]) - 1)}
            ends_t = {len(b"".join(tp[c][: i + 1])) for i in range(len(tp[c]) - 1)}
            assert not ends_s & ends_t  # no common boundary inside a chunk
        # every content token before the last common boundary is in a chunk
        n_real = sum(
            1
            for (a, e), m in zip(
                s["offset_mapping"][b].tolist(), s["attention_mask"][b].tolist(), strict=True
            )
            if m and e > a and e <= len(covered)
        )
        assert sum(len(v) for v in sp.values()) == n_real
        total += len(sp)
    assert total > 50


def test_common_chunks_golden():
    # student: BOS "ab" "c" "de"; teacher: "a" "bc" EOS "d": one common boundary (3), chunk 0 = "abc"
    s_chunk, t_chunk = common_chunks(
        torch.tensor([[[0, 0], [0, 2], [2, 3], [3, 5]]]),
        torch.ones(1, 4),
        torch.tensor([[[0, 1], [1, 3], [3, 3], [3, 4]]]),
        torch.ones(1, 4),
    )
    assert s_chunk.tolist() == [[-1, 0, 0, -1]] and t_chunk.tolist() == [[0, 0, -1, -1]]
    none = common_chunks(
        torch.tensor([[[0, 2]]]), torch.ones(1, 1), torch.tensor([[[0, 1]]]), torch.ones(1, 1)
    )
    assert none[0].tolist() == [[-1]] and none[1].tolist() == [[-1]]
