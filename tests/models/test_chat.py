"""Conversations in each model's own chat template, aligned on their shared contents
(kvdistill.models.chat)."""

from __future__ import annotations

import pickle

import pytest

from kvdistill.align.tokens import token_alignment
from kvdistill.errors import KvdistillError
from kvdistill.models.chat import ChatText, render
from kvdistill.models.load import load_tokenizer
from kvdistill.models.tokenization import token_counts, tokenize

MESSAGES = [
    {"role": "user", "content": "What is 3 + 4? Über-easy."},
    {"role": "assistant", "content": "3 + 4 = 7. The answer is 7."},
]
# a second format, unlike SmolLM2's ChatML: no special tokens, contents followed by the template's own text
PLAIN = (
    "{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}### assistant:\n{% endif %}"
)


@pytest.fixture(scope="module")
def smol():
    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def plain():
    tok = load_tokenizer("gpt2-tokenizer")
    tok.chat_template = PLAIN
    return tok


def test_shared_text_and_pickling():
    chat = ChatText(MESSAGES)
    assert chat == "user: What is 3 + 4? Über-easy.\nassistant: 3 + 4 = 7. The answer is 7.\n"
    assert chat.starts == (6, 43) and chat[43:].startswith("3 + 4 = 7.")
    back = pickle.loads(pickle.dumps(chat))
    assert isinstance(back, ChatText) and back == chat and back.messages == chat.messages


@pytest.mark.parametrize("name", ["smol", "plain"])
def test_every_content_token_maps_to_the_same_bytes_of_the_shared_text(name, request):
    tok = request.getfixturevalue(name)
    chat = ChatText(MESSAGES)
    rendering = render(tok, chat)
    enc = tokenize(tok, [chat])
    ids, spans = enc["input_ids"][0].tolist(), enc["offset_mapping"][0].tolist()
    shared = chat.encode()
    rendered = rendering.text.encode()
    content_bytes = b""
    for (a, b), piece in zip(spans, tok.convert_ids_to_tokens(ids), strict=True):
        if b > a:
            content_bytes += shared[a:b]
            # the token's own bytes in the rendering contain exactly these shared bytes
            assert shared[a:b] in rendered, piece
    # every content byte is covered once, in order; the markup ('<|im_start|>user', '### user:') by none
    assert content_bytes.decode() == "".join(m["content"] for m in MESSAGES)
    assert b"###" not in content_bytes and b"im_start" not in content_bytes


def test_two_templates_align_on_the_contents_only(smol, plain):
    chat = ChatText(MESSAGES)
    s, t = tokenize(plain, [chat]), tokenize(smol, [chat])
    A = token_alignment(s["offset_mapping"][0], t["offset_mapping"][0]).to_dense()  # (T_s, T_t)
    s_tokens = plain.convert_ids_to_tokens(s["input_ids"][0].tolist())
    t_tokens = smol.convert_ids_to_tokens(t["input_ids"][0].tolist())
    aligned = [(s_tokens[i], t_tokens[int(A[i].argmax())]) for i in range(len(s_tokens)) if A[i].sum() > 0]
    assert ("What", "What") in aligned and ("Ġanswer", "Ġanswer") in aligned
    assert all("#" not in a and "im_" not in b for a, b in aligned)
    # every content token of the student finds its teacher token, by bytes ('Ü' is split differently)
    assert len(aligned) == sum(1 for a, b in s["offset_mapping"][0].tolist() if b > a) == 22
    assert ("Ġ3", "Ġ") in aligned and ("ĠÃľ", "ĠÃ") in aligned


def test_prompt_rendering_and_token_counts(smol, plain):
    chat = ChatText(MESSAGES)
    prompt = render(plain, chat, prompt_only=True).text
    assert prompt == "### user:\nWhat is 3 + 4? Über-easy.\n\n### assistant:\n"
    assert token_counts(plain, [chat, "plain text"]) == [len(plain(render(plain, chat).text)["input_ids"]), 2]
    assert token_counts(smol, [chat])[0] == tokenize(smol, [chat])["input_ids"].shape[1]


def test_a_template_that_rewrites_contents_or_no_template_is_refused(plain):
    upper = load_tokenizer("gpt2-tokenizer")
    upper.chat_template = "{% for m in messages %}{{ m['content'] | upper }}\n{% endfor %}"
    with pytest.raises(KvdistillError, match="changes or drops message contents"):
        tokenize(upper, [ChatText(MESSAGES)])
    bare = load_tokenizer("gpt2-tokenizer")
    with pytest.raises(KvdistillError, match="has no chat template") as err:
        tokenize(bare, [ChatText(MESSAGES)])
    assert "chat template" in err.value.fix
    with pytest.raises(KvdistillError, match="mixes chat"):
        tokenize(plain, [ChatText(MESSAGES), "plain"])


def test_a_trimming_template_is_located_by_the_stripped_contents(plain):
    trim = load_tokenizer("gpt2-tokenizer")
    trim.chat_template = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] | trim }}\n{% endfor %}"
    chat = ChatText(
        [{"role": "user", "content": "  padded question  "}, {"role": "assistant", "content": "ok"}]
    )
    enc = tokenize(trim, [chat])
    shared = chat.encode()
    got = b"".join(shared[a:b] for a, b in enc["offset_mapping"][0].tolist() if b > a)
    assert got == b"padded questionok"
