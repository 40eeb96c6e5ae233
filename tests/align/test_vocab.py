"""The shared-string projection of two vocabularies: strings spelled alike across byte-level BPE and
SentencePiece share a bucket, end-of-text tokens meet by role, unknown / padding tokens and padded rows go to
"other", one tokenizer gives one bucket per keyed entry, and vocabularies with nothing in common are
refused."""

from __future__ import annotations

import functools

import pytest
import torch

from kvdistill.align.vocab import shared_vocabulary, token_keys
from kvdistill.errors import KvdistillError


@functools.cache
def tokenizer(name: str):
    from kvdistill.models.load import load_tokenizer

    return load_tokenizer(name)


def _id(name: str, piece: str) -> int:
    return tokenizer(name).convert_tokens_to_ids(piece)


def test_strings_spelled_alike_share_a_bucket():
    gpt2, llama = tokenizer("gpt2-tokenizer"), tokenizer("llama2-tokenizer")
    proj = shared_vocabulary(gpt2, llama, len(gpt2) + 7, len(llama))  # 7 padded student rows
    assert proj.student.shape == (len(gpt2) + 7,) and proj.teacher.shape == (len(llama),)
    for g, sp in [("Ġthe", "▁the"), ("the", "the"), ("Ċ", "<0x0A>"), (".", "."), ("Ġ+", "▁+")]:
        bucket = proj.student[_id("gpt2-tokenizer", g)]
        assert bucket < proj.shared and bucket == proj.teacher[_id("llama2-tokenizer", sp)], (g, sp)
    assert proj.student[gpt2.eos_token_id] == proj.teacher[llama.eos_token_id] < proj.shared  # one role
    assert proj.teacher[llama.unk_token_id] == proj.shared  # <unk> stands for no string
    assert (proj.student[len(gpt2) :] == proj.shared).all()  # padded rows name no token
    # every shared bucket holds entries of both sides, and the other bucket is the last
    assert set(proj.student.unique().tolist()) - {proj.shared} == set(range(proj.shared))
    assert set(proj.teacher.unique().tolist()) - {proj.shared} == set(range(proj.shared))
    # SentencePiece spells a space both as '▁' and as its byte fallback '<0x20>': one bucket, one event
    assert proj.teacher[_id("llama2-tokenizer", "▁")] == proj.teacher[_id("llama2-tokenizer", "<0x20>")]


@pytest.mark.parametrize("name", ["gpt2-tokenizer", "smollm2-135m"])
def test_one_byte_level_tokenizer_gives_one_bucket_per_entry(name):
    tok = tokenizer(name)
    proj = shared_vocabulary(tok, tok, len(tok), len(tok))
    assert torch.equal(proj.student, proj.teacher)
    keyed = [k for k in token_keys(tok, len(tok)) if k is not None]
    assert proj.shared == len(keyed) == len(set(keyed))
    named = proj.student[proj.student < proj.shared]
    assert named.unique().numel() == named.numel()  # a bijection on the keyed entries


def test_no_shared_string_is_refused():
    class Alien:  # a tokenizer whose every token is special and unlike the student's
        all_special_ids = [0, 1]
        bos_token_id = eos_token_id = unk_token_id = pad_token_id = None
        backend_tokenizer = None

        def __len__(self):
            return 2

        def convert_ids_to_tokens(self, ids):
            return [f"<alien{i}>" for i in ids]

    with pytest.raises(KvdistillError, match="(?s)share no token string.*logit_kd.weight: 0"):
        shared_vocabulary(tokenizer("gpt2-tokenizer"), Alien(), 50257, 2, teacher_name="alien")
