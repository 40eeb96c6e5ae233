"""Conversations (`messages`) that every model reads in its own chat template, aligned on their shared
contents.

A chat record's text is a `ChatText`: a str whose value is the *shared text* of the conversation,

    "user: What is 3 + 4?\\nassistant: 3 + 4 = 7.\\n"        one "role: content" line per message

and which carries the messages. No model reads the shared text itself: `kvdistill.models.capture.tokenize`
renders the messages with each tokenizer's own chat template (`apply_chat_template`; the student in its
format, every teacher in its own), tokenizes that rendering, and maps each token's UTF-8 byte span back into
the shared text:

- the contents are located in the rendering exactly: the template is rendered once with a marker in place of
  each content, and the rendering with the real contents must equal that skeleton with the contents put back
  (verbatim, or stripped of surrounding whitespace for templates that trim); a template that changes a content
  in any other way is refused, naming the model;
- a token inside a content gets the same bytes of that content in the shared text (clipped to the content
where
  it also covers template markup, e.g. a BPE token merging '?' and the template's line break);
- a token of template markup ('<|im_start|>user\\n', '<start_of_turn>model\\n') gets an empty span, like BOS:
it
  aligns with nothing and carries no K/V target, while the student still learns it through CE.

So two models that frame the same conversation differently are aligned on exactly the bytes they share, the
contents, by the same byte-overlap alignment as plain text (`kvdistill.align.tokens`).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvdistill.errors import KvdistillError

_MARK = "\ue000{}\ue001"  # private-use characters: no template adds or changes them


class ChatText(str):
    """The shared text of a conversation (a str: spans, answer offsets and cache ids refer to it) with its
    `messages` ([{"role": ..., "content": ...}, ...]) and `starts`: the character offset of each content in
    it."""

    messages: tuple
    starts: tuple

    def __new__(cls, messages) -> ChatText:
        messages = tuple({"role": str(m["role"]), "content": str(m["content"])} for m in messages)
        text, starts = "", []
        for m in messages:
            text += f"{m['role']}: "
            starts.append(len(text))
            text += m["content"] + "\n"
        self = super().__new__(cls, text)
        self.messages, self.starts = messages, tuple(starts)
        return self

    def __reduce__(self):  # pickled for DataLoader workers: rebuilt from the messages
        return (ChatText, ([dict(m) for m in self.messages],))


@dataclass(frozen=True)
class Rendering:
    """One model's rendering of a conversation: `text` and, per content, (byte offset in `text`, byte offset
    in the shared text, length in bytes)."""

    text: str
    pieces: tuple[tuple[int, int, int], ...]


def _nbytes(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _apply(tokenizer, messages, *, add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise KvdistillError(
            f"the tokenizer '{getattr(tokenizer, 'name_or_path', '?')}' has no chat template, so it cannot "
            "read "
            "data in the messages format",
            "give every model a tokenizer with a chat template (an instruct model), or use text or "
            "question/answer data (data.text_field / data.template)",
        )
    try:
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as err:  # jinja raises its own errors (e.g. "roles must alternate")
        raise KvdistillError(
            f"the chat template of '{getattr(tokenizer, 'name_or_path', '?')}' refuses a conversation: "
            f"{type(err).__name__}: {err}",
            "check the messages' roles and order (many templates need user/assistant turns alternating)",
        ) from None


def render(tokenizer, chat: ChatText, *, prompt_only: bool = False) -> Rendering:
    """`chat` in `tokenizer`'s chat template, each content located (see the module docstring).

    prompt_only: the messages before the last one, with the template's generation prompt (what a model is
    given to produce the last, assistant, message)."""
    messages = chat.messages[:-1] if prompt_only else chat.messages
    marked = [{**m, "content": _MARK.format(i)} for i, m in enumerate(messages)]
    skeleton = _apply(tokenizer, marked, add_generation_prompt=prompt_only)
    text = _apply(tokenizer, messages, add_generation_prompt=prompt_only)
    for strip in (False, True):
        pieces, rebuilt, at = [], "", 0
        for i, m in enumerate(messages):
            mark = _MARK.format(i)
            where = skeleton.find(mark, at)
            if where < 0:
                break
            content = m["content"]
            lead = len(content) - len(content.lstrip()) if strip else 0
            kept = content.strip() if strip else content
            rebuilt += skeleton[at:where]
            shared = chat.starts[i] + lead
            pieces.append((_nbytes(rebuilt), _nbytes(chat[:shared]), _nbytes(kept)))
            rebuilt += kept
            at = where + len(mark)
        else:
            rebuilt += skeleton[at:]
            if rebuilt == text and len(pieces) == len(messages):
                return Rendering(text, tuple(pieces))
    raise KvdistillError(
        f"the chat template of '{getattr(tokenizer, 'name_or_path', '?')}' changes or drops message contents "
        "(the "
        "rendering is not the template's frame around the contents as given), so its tokens cannot be "
        "aligned on "
        "the shared contents",
        "use another model for this data, or give the data as text or question/answer fields instead of "
        "messages",
    )


def shared_spans(spans, pieces: tuple[tuple[int, int, int], ...]):
    """Byte spans (T, 2) of tokens in a rendering -> byte spans in the shared text (int64 tensor (T, 2)): a
    token overlapping a content gets that overlap's bytes in the shared text; any other token an empty span at
    the shared offset reached so far (spans stay in order)."""
    import torch

    spans = torch.as_tensor(spans, dtype=torch.long)
    out = torch.zeros_like(spans)
    if not pieces or spans.numel() == 0:
        return out
    rendered = torch.tensor([p[0] for p in pieces])  # (P,) content starts in the rendering
    shared = torch.tensor([p[1] for p in pieces])  # (P,) content starts in the shared text
    length = torch.tensor([p[2] for p in pieces])  # (P,)
    s, e = spans[:, :1], spans[:, 1:]  # (T, 1) each
    lo = torch.maximum(s, rendered)  # (T, P) overlap with each content
    hi = torch.minimum(e, rendered + length)
    hit = (hi > lo) & (e > s)  # (T, P)
    inside = hit.any(1)  # (T,)
    first = hit.float().argmax(1)  # (T,) the first content a token overlaps
    last = (
        hit.shape[1] - 1 - hit.flip(1).float().argmax(1)
    )  # (T,) the last one (a token over two: their hull)
    t = torch.arange(spans.shape[0])
    out[:, 0] = shared[first] + lo[t, first] - rendered[first]
    out[:, 1] = shared[last] + hi[t, last] - rendered[last]
    # markup: an empty span where the shared text has got to (the end of the last content before it)
    ends = torch.where(inside, out[:, 1], 0)
    reached = torch.cummax(ends, 0).values
    markup = ~inside
    out[markup, 0] = out[markup, 1] = reached[markup]
    return out
