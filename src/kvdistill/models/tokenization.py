"""Tokenizing texts for K/V capture, with UTF-8 byte spans for token alignment, and decoding what a model
added.

Notation: B batch, T time (tokens).
"""

from __future__ import annotations

import numpy as np
import torch

from kvdistill.align.bytes import byte_spans
from kvdistill.errors import KvdistillError
from kvdistill.models.chat import ChatText, render, shared_spans


def tokenize(
    tokenizer,
    texts: list[str],
    *,
    max_length: int | None = None,
    padding_side: str = "right",
    max_positions: int | None = None,
    add_special_tokens: bool = True,
):
    """Tokenize a batch with token spans; every text must yield at least one non-special token.
    `add_special_tokens=False`: no BOS/EOS framing (a part that continues a sequence, e.g. a latent student's
    answer).

    Returns a BatchEncoding with input_ids, attention_mask (B, T) and offset_mapping (B, T, 2), where the
    spans are UTF-8 byte offsets [start, end) into each text (`kvdistill.align.bytes.byte_spans` of the
    tokenizer's character offsets: exact where one character is split into several tokens; equal to them on
    ASCII text, except that a '▁' Llama-2 prepends onto the text's first character covers no byte). Special
    tokens have empty spans; padding rows are (0, 0). A conversation (`kvdistill.models.chat.ChatText`) is
    tokenized in this tokenizer's own chat template, its spans mapped into the conversation's shared text
    (template markup: empty spans).
    """
    if isinstance(texts, str):
        texts = [texts]
    if not texts:
        raise KvdistillError("no texts given", "pass a non-empty list of strings")
    if not getattr(tokenizer, "is_fast", False):
        raise KvdistillError(
            f"tokenizer {type(tokenizer).__name__} is not a fast tokenizer",
            "character offsets need a fast (Rust) tokenizer; load it with use_fast=True",
        )
    renderings = _chat_renderings(tokenizer, texts)
    shared_texts, texts = (
        texts,
        [r.text if r is not None else t for r, t in zip(renderings, texts, strict=True)],
    )
    old_side = tokenizer.padding_side
    tokenizer.padding_side = padding_side
    try:
        if any(r is not None for r in renderings):  # a rendered chat template carries its own special tokens
            if not all(r is not None for r in renderings):
                raise KvdistillError(
                    "a batch mixes chat (messages) records with plain texts",
                    "give every record of a dataset the same format",
                )
            add_special_tokens = False
        enc = tokenizer(
            list(texts),
            return_offsets_mapping=True,
            padding=True,
            truncation=max_length is not None,
            max_length=max_length,
            add_special_tokens=add_special_tokens,
        )
    finally:
        tokenizer.padding_side = old_side
    # lists -> int64 tensors through numpy (torch.tensor walks nested lists several times slower, holding the
    # GIL that a tokenize thread shares with the thread launching the teacher's kernels)
    for key in list(enc.keys()):
        enc[key] = torch.from_numpy(np.asarray(enc[key], dtype=np.int64))
    offsets = enc["offset_mapping"]  # (B, T, 2) characters
    if offsets.dim() != 3:  # every text empty and no BOS: the tokenizer returns (B, 0)
        offsets = offsets.reshape(len(texts), -1, 2)
    offsets = byte_spans(tokenizer, texts, enc["input_ids"], offsets)  # (B, T, 2) UTF-8 bytes
    if renderings[0] is not None:  # bytes of each model's rendering -> bytes of the shared text (models.chat)
        real = enc["attention_mask"].bool()  # (B, T)
        for b, r in enumerate(renderings):
            offsets[b, real[b]] = shared_spans(offsets[b, real[b]], r.pieces)
    enc["offset_mapping"] = offsets
    # special tokens written out in the text ("<|endoftext|>") have a span but are no content; <unk> stands
    # for text
    framing = {getattr(tokenizer, f"{n}_token_id", None) for n in ("bos", "eos", "pad", "cls", "sep")}
    special = [i for i in tokenizer.all_special_ids if i != tokenizer.unk_token_id or i in framing]
    content = (offsets[..., 1] > offsets[..., 0]) & enc["attention_mask"].bool()  # (B, T)
    if special:
        content &= ~torch.isin(enc["input_ids"], torch.tensor(special, dtype=enc["input_ids"].dtype))
    empty = [i for i in range(len(texts)) if not content[i].any()]
    if empty:
        shown = ", ".join(f"#{i} {shared_texts[i][:40]!r}" for i in empty[:5])
        raise KvdistillError(
            f"text(s) {shown} tokenize to nothing but special tokens",
            "drop empty or whitespace-only samples from the data",
        )
    lengths = enc["attention_mask"].sum(1)
    if max_positions is not None and int(lengths.max()) > max_positions:
        i = int(lengths.argmax())
        raise KvdistillError(
            f"text #{i} is {int(lengths[i])} tokens, longer than the model's maximum of {max_positions} "
            "positions",
            f"set data.max_length (or --max-length) to at most {max_positions} to truncate",
        )
    return enc


def token_counts(tokenizer, texts: list[str], *, chunk: int = 512) -> list[int]:
    """How many tokens each text is for this tokenizer before any truncation, as `tokenize` would make them (a
    conversation in the tokenizer's chat template)."""
    counts = []
    for lo in range(0, len(texts), chunk):
        part = texts[lo : lo + chunk]
        renderings = _chat_renderings(tokenizer, part)
        plain = [t for t, r in zip(part, renderings, strict=True) if r is None]
        chats = [r.text for r in renderings if r is not None]
        ids_plain = iter(tokenizer(plain, add_special_tokens=True)["input_ids"] if plain else [])
        ids_chat = iter(tokenizer(chats, add_special_tokens=False)["input_ids"] if chats else [])
        counts += [len(next(ids_plain) if r is None else next(ids_chat)) for r in renderings]
    return counts


def _chat_renderings(tokenizer, texts) -> list:
    """Per text: its rendering in `tokenizer`'s chat template when it is a conversation
    (`models.chat.ChatText`), else None."""
    return [render(tokenizer, t) if isinstance(t, ChatText) else None for t in texts]


def continuation(tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text `new_ids` add after `prompt_ids`: decode(prompt + new) minus decode(prompt).

    SentencePiece decoders treat the first token of a sequence specially (a leading '▁' is dropped), so the
    new ids are decoded in the context of the prompt rather than alone. (For the four zoo tokenizers both
    agree on arithmetic answers, also on transformers 5.17.) Falls back to the ids alone when the prompt's
    text is not a prefix of the whole (a tokenizer whose decoding is not prefix-stable)."""
    whole = tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=True)
    head = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    if whole.startswith(head):
        return whole[len(head) :]
    return tokenizer.decode(new_ids, skip_special_tokens=True)
