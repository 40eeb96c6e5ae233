"""The prompt template that turns a (question, cot, answer) triple into a training text, and the record it
makes.

A record: {"id": str, "text": str, "question", "cot", "answer": str|None, "answer_start": int|None}, where
text[answer_start:] starts with the answer.
"""

from __future__ import annotations

import difflib
import re

from kvdistill.errors import KvdistillError

PLACEHOLDERS = ("question", "cot", "answer")
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def check_template(template: str) -> None:
    """Raise if `template` uses a placeholder other than {question}, {cot}, {answer}, or lacks {question}."""
    unknown = sorted({m for m in _PLACEHOLDER.findall(template) if m not in PLACEHOLDERS})
    if unknown:
        hints = [
            f"'{{{u}}}' (did you mean '{{{c[0]}}}'?)"
            if (c := difflib.get_close_matches(u, PLACEHOLDERS, 1))
            else f"'{{{u}}}'"
            for u in unknown
        ]
        raise KvdistillError(
            f"data.template uses unknown placeholder(s) {', '.join(hints)}",
            "use only {question}, {cot} and {answer}",
        )
    if "{question}" not in template:
        raise KvdistillError(
            f"data.template {template!r} has no {{question}} placeholder",
            "e.g. 'Question: {question}\\nReasoning: {cot}\\nAnswer: {answer}'",
        )


def render_template(
    template: str, question: str, cot: str | None, answer: str | None
) -> tuple[str, int | None]:
    """Fill `template`; returns (text, answer_start) with text[answer_start:] starting with the answer.

    Placeholders are replaced in one pass, so braces inside the values are kept as they are. A line holding
    `{cot}` and no other placeholder is dropped when `cot` is None or blank; `answer_start` is where the last
    `{answer}` lands (None when the template has none, or `answer` is None).
    """
    if not cot or not cot.strip():
        cot = None
        lines = template.split("\n")
        kept = [ln for ln in lines if "{cot}" not in ln or set(_PLACEHOLDER.findall(ln)) - {"cot"}]
        template = "\n".join(kept)
    values = {"question": question, "cot": cot or "", "answer": answer if answer is not None else ""}
    pieces: list[str] = []
    answer_start = None
    pos = length = 0
    for m in _PLACEHOLDER.finditer(template):
        if m.group(1) not in values:
            continue
        pieces.append(template[pos : m.start()])
        length += m.start() - pos
        if m.group(1) == "answer" and answer is not None:
            answer_start = length
        value = values[m.group(1)]
        pieces.append(value)
        length += len(value)
        pos = m.end()
    pieces.append(template[pos:])
    return "".join(pieces), answer_start


def make_record(id: str, question: str, cot: str | None, answer: str | None, template: str) -> dict:
    """A template-mode record."""
    text, answer_start = render_template(template, question, cot, answer)
    return {
        "id": id,
        "text": text,
        "answer_start": answer_start,
        "question": question,
        "cot": cot if cot and cot.strip() else None,
        "answer": answer,
    }


# ---------------------------------------------------------------------------------------------- splitting


def question_prompt(record: dict, template: str) -> str:
    """The start of a template-mode record's text up to the end of its {question} line (with the line break):
    what an on-policy student continues. Refused, naming the record, without a question, with another field on
    or before the question's line, or when the text is not the template's rendering."""
    if not record.get("question") or type(record["text"]) is not str:  # a conversation's text is a ChatText
        raise KvdistillError(
            f"record '{record.get('id')}' has no question"
            + (
                " (it is a conversation, rendered in each model's chat template)"
                if record.get("question")
                else ""
            )
            + ": on-policy distillation continues a template-mode record's question",
            "use template-mode data (data.question_field, data.cot_field, data.answer_field) or a generator",
        )
    lines = template.split("\n")
    at = next(n for n, line in enumerate(lines) if "{question}" in line)
    head = "\n".join(lines[: at + 1]) + ("\n" if at + 1 < len(lines) else "")
    others = sorted(set(_PLACEHOLDER.findall(head)) - {"question"})
    if others:
        raise KvdistillError(
            f"data.template {template!r} puts {others} on or before the {{question}} line, so the prompt "
            "would hold "
            "part of what the student is to generate",
            "put the question on a line of its own, first",
        )
    prompt, _ = render_template(head, record["question"], None, None)
    if not record["text"].startswith(prompt):
        raise KvdistillError(
            f"record '{record.get('id')}': its text does not start with its question as "
            f"data.template renders it ({prompt!r})",
            "build the records with the run's data.template (template mode)",
        )
    return prompt
