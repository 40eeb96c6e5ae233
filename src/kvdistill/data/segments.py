"""A (question, cot, answer) record cut where a latent-reasoning student puts its latent tokens.

With the default template 'Question: {question}\\nReasoning: {cot}\\nAnswer: {answer}' a record's text is

    prefix            'Question: What is 3 + 4?\\n'              read by both modes
    cot line          'Reasoning: 3 + 4 = 7.\\n'                 teacher (CoT) mode only
    suffix            'Answer: 7'                                after the latents in student mode

so the teacher reads `text` = prefix + cot line + suffix and the student reads prefix, M latent tokens,
suffix. `answer_prompt` is the suffix up to the answer ('Answer:'), what latent-mode generation is given after
the latents; `cot_prompt` is the prefix plus the cot line's label ('Question: ...\\nReasoning:'), what CoT
generation is given.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvdistill.data.template import render_template
from kvdistill.errors import KvdistillError


@dataclass(frozen=True)
class Segments:
    """Character offsets into `text`: prefix = text[:cot_line], the cot value text[cot_start:cot_end], suffix
    = text[suffix_start:] whose answer starts at text[answer_start:]."""

    text: str
    cot_line: int
    cot_start: int
    cot_end: int
    suffix_start: int
    answer_start: int

    @property
    def prefix(self) -> str:
        return self.text[: self.cot_line]

    @property
    def suffix(self) -> str:
        return self.text[self.suffix_start :]

    @property
    def answer_prompt(self) -> str:
        """The suffix up to the answer, without trailing whitespace ('Answer:')."""
        return self.text[self.suffix_start : self.answer_start].rstrip()

    @property
    def cot_prompt(self) -> str:
        """The prefix and the cot line's label ('Question: ...\\nReasoning:')."""
        return self.text[: self.cot_start].rstrip()

    def byte(self, char_offset: int) -> int:
        """A character offset as a UTF-8 byte offset (token spans are byte spans)."""
        return len(self.text[:char_offset].encode("utf-8", "surrogatepass"))


def _template_lines(template: str) -> tuple[str, str, str]:
    lines = template.split("\n")
    at = [n for n, line in enumerate(lines) if "{cot}" in line]
    problems = []
    if len(at) != 1:
        problems.append(f"it has {len(at)} lines with {{cot}}, the latent student needs exactly one")
    else:
        before, after = "\n".join(lines[: at[0]]), "\n".join(lines[at[0] + 1 :])
        if "{question}" not in before:
            problems.append("{question} must come on a line before the {cot} line")
        if "{answer}" not in after:
            problems.append("{answer} must come on a line after the {cot} line")
        if lines[at[0]].count("{") != 1:
            problems.append("the {cot} line may hold no other placeholder")
    if problems:
        raise KvdistillError(
            f"data.template {template!r} cannot host latent tokens: {'; '.join(problems)}",
            "use a template like 'Question: {question}\\nReasoning: {cot}\\nAnswer: {answer}'",
        )
    return before, lines[at[0]], after


def segments(record: dict, template: str) -> Segments:
    """Cut a template-mode record (question, cot, answer) for the latent student; refused, naming the record,
    when it lacks one of them or its text is not the template's rendering."""
    missing = [k for k in ("question", "cot", "answer") if not record.get(k)]
    if missing:
        raise KvdistillError(
            f"record '{record.get('id')}' has no {', '.join(missing)}: the latent student reads a question, "
            "learns from its chain of thought and is scored on its answer",
            "use template-mode data with question, cot and answer fields (data.question_field, "
            "data.cot_field, "
            "data.answer_field) or a generator (data.source: arithmetic or gsm_symbolic)",
        )
    before, cot_line, after = _template_lines(template)
    prefix, _ = render_template(before + "\n", record["question"], None, None)
    label, _ = render_template(cot_line.split("{cot}")[0], record["question"], None, None)
    line, _ = render_template(cot_line, record["question"], record["cot"], None)
    suffix, answer_at = render_template(after, record["question"], None, record["answer"])
    text = prefix + line + "\n" + suffix
    if text != record["text"]:
        raise KvdistillError(
            f"record '{record.get('id')}': its text is not data.template rendered with its fields",
            "build the records with the run's data.template (template mode)",
        )
    cot_start = len(prefix) + len(label)
    suffix_start = len(prefix) + len(line) + 1
    return Segments(
        text=text,
        cot_line=len(prefix),
        cot_start=cot_start,
        cot_end=cot_start + len(record["cot"]),
        suffix_start=suffix_start,
        answer_start=suffix_start + answer_at,
    )
