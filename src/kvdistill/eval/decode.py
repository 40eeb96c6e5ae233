"""The one greedy decoder of held-out answers, and how an answer is read from what it generated; exact match
by greedy decoding in each of the three ways a student answers. `kvdistill eval`, the experiment runner, the
quickstart and training's held-out evaluations (`train.eval_exact_match`) all call these.

Notation: B batch, P prompt columns (left-padded), N new tokens, M latent slots, Q answer-prompt tokens.

The three ways (`exact_match`, `cot_exact_match`, `latent_exact_match`):
- **text**: the record's text before its answer (a conversation: its messages before the answer in the model's
  chat template with the generation prompt), then greedy decoding; the answer is the first generated line,
  read as "Answer: <line>". The prompt is `text[:answer_start]` without trailing whitespace: a training text
  reads "Answer: 42", which BPE tokenizers split as "Answer", ":", " 42", and a prompt ending in a bare space
  would ask for a token the model never saw there.
- **CoT**: the question and the template's cot label ('Reasoning:'), then greedy decoding of the reasoning and
the
  answer; the answer is read after the last answer marker ('Answer:').
- **latent** (`kvdistill.student.latent`): the question, the M latents, the template's answer prompt
('Answer:'),
  then greedy decoding; the answer is the first generated line.

Every way decodes the new tokens in the context of the prompt (`kvdistill.models.capture.continuation`: a
SentencePiece decoder drops the leading '▁' of a sequence's first token, so new ids decoded alone can lose a
space or join words). Prompts are left-padded into batches; positions come from the attention mask, so a batch
generates what each prompt generates alone. `gen_tokens` counts the tokens a sample needs: up to the end of
its answer line (for CoT its first newline after the answer marker), or all it generated when no line ends;
`latency_s` is a batch's wall time over its size, `latent_passes` the backbone passes spent on latents. Text
and CoT batches stop once every row's answer line has ended (`AnswerEnd`), not at max_new_tokens: what is read
is the same, the time is what answering took.
Records without an answer (text mode: or without `answer_start`) are not scored; `exact_match` is None when
none are left.

The swap probe (`latent_swap_exact_match`) answers each question in latent mode from another question's
latents: whether a latent student's answers read its latents at all, or come from the question as a direct
answer would.
"""

from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from kvdistill.data.answers import exact_match as same
from kvdistill.data.answers import extract_answer
from kvdistill.data.segments import segments
from kvdistill.models.capture import tokenize
from kvdistill.models.chat import ChatText, render
from kvdistill.models.tokenization import continuation

__all__ = [
    "AnswerEnd",
    "batches",
    "chunks",
    "cot_exact_match",
    "exact_match",
    "latent_exact_match",
    "latent_swap_exact_match",
    "pad_id",
    "read_answer",
]


SAMPLES = 8
"""Scored rows a result keeps whole (`samples`: what was generated, the answer read, the gold one)."""


def pad_id(tokenizer) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its eos (`load_tokenizer` sets a pad token,
    so the eos is for tokenizers built elsewhere)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def chunks(items: list, size: int):
    """Consecutive slices of `items` of at most `size`."""
    for i in range(0, len(items), size):
        yield items[i : i + size]


def batches(items, size, desc: str | None = None):
    """`chunks(items, size)` with a progress bar named `desc` on stderr where it is a terminal (None: no
    bar)."""
    return tqdm(
        chunks(items, size),
        total=math.ceil(len(items) / size),
        desc=desc,
        disable=True if not desc else None,
        leave=False,
        dynamic_ncols=True,
    )


def _answered(text: str, *, after_marker: bool) -> bool:
    """Whether `text` (new text after a prompt) holds its answer line: a line break after some text (with
    `after_marker`: in what follows the last 'answer:')."""
    tail = text
    if after_marker:
        marker = text.lower().rfind("answer:")
        if marker < 0:
            return False
        tail = text[marker + len("answer:") :]
    return "\n" in tail.lstrip(" ") and bool(tail.strip())


def read_answer(
    tokenizer, prompt_ids: list[int], new_ids: list[int], *, after_marker: bool
) -> tuple[str, int]:
    """(text, tokens needed): the text `new_ids` add after `prompt_ids`, and how many of them reach the end of
    the answer line (the first line with text; `after_marker`: the first line with text after the last
    'answer:')."""
    for n in range(1, len(new_ids) + 1):
        text = continuation(tokenizer, prompt_ids, new_ids[:n])
        if _answered(text, after_marker=after_marker):
            return text, n
    return continuation(tokenizer, prompt_ids, new_ids), len(new_ids)


class AnswerEnd:
    """A stopping criterion of `generate` (called as transformers' StoppingCriteria are): it ends each row of
    a batched `generate` once its new tokens hold the answer line (`read_answer`'s rule), so a batch stops
    when every row has answered instead of at max_new_tokens. What `read_answer` reads from a row is
    unchanged: it stops at the first point the rule holds, and this stops a row only where the rule
    holds, at or after that point (rows are independent: a finished row is fed padding, the others go on).

    prompts: each row's prompt ids without padding; width: P, the padded prompt columns; drop: ids that are
    not text (padding, end of sequence). The rule is checked only where the newest token's own text holds a
    line break (memoised per id), the only tokens that end a line. `ended` maps each row that stopped to the
    new tokens it had then (what follows is padding)."""

    def __init__(self, tokenizer, prompts: list[list[int]], width: int, *, after_marker: bool, drop=()):
        self.tokenizer, self.prompts, self.width = tokenizer, prompts, width
        self.after_marker, self.drop = after_marker, set(drop)
        self._breaks: dict[int, bool] = {}
        self.ended: dict[int, int] = {}

    @classmethod
    def of_batch(cls, tokenizer, ids: torch.Tensor, mask: torch.Tensor, *, after_marker: bool, drop=()):
        """The criterion of a left-padded batch `ids` / `mask` (B, P): each row's prompt is its ids where the
        mask is set (`prompts`, what the callers decode continuations against too)."""
        prompts = [ids[b][mask[b].bool()].tolist() for b in range(ids.shape[0])]  # without padding
        return cls(tokenizer, prompts, ids.shape[1], after_marker=after_marker, drop=drop)

    def _breaks_line(self, token: int) -> bool:
        if token not in self._breaks:
            self._breaks[token] = token not in self.drop and "\n" in self.tokenizer.decode([token])
        return self._breaks[token]

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        new = input_ids[:, self.width :]  # (B, n)
        done = [False] * new.shape[0]
        for b, token in enumerate(new[:, -1].tolist()):
            if self._breaks_line(token):
                row = [t for t in new[b].tolist() if t not in self.drop]
                text = continuation(self.tokenizer, self.prompts[b], row)
                done[b] = _answered(text, after_marker=self.after_marker)
                if done[b]:
                    self.ended.setdefault(b, new.shape[1])
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)  # (B,)


def _greedy(
    model,
    ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    max_new_tokens: int,
    pad: int,
    stop: AnswerEnd | None = None,
) -> tuple[torch.Tensor, float]:
    """(new ids (B, N), seconds): `model.generate` without sampling from left-padded prompts ids / mask (B,
    P); with `stop`, N ends when every row has answered (rows that answered earlier are padded)."""
    from transformers import StoppingCriteriaList

    t0 = time.perf_counter()
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
        stopping_criteria=StoppingCriteriaList([stop]) if stop is not None else None,
    )  # (B, P + N)
    if ids.is_cuda:
        torch.cuda.synchronize()
    return out[:, ids.shape[1] :], time.perf_counter() - t0


def _row(
    tokenizer, record: dict, prompt_ids: list[int], new_ids: list[int], *, after_marker: bool, drop: tuple
) -> dict:
    """One scored answer: what was generated (in the prompt's context), the answer read from it, the gold
    one."""
    new = [t for t in new_ids if t not in drop]
    text, n = read_answer(tokenizer, prompt_ids, new, after_marker=after_marker)
    if after_marker:
        pred = extract_answer(text) if "answer" in text.lower() else None
    else:
        pred = extract_answer("Answer: " + text.strip().split("\n")[0])
    return {
        "id": record["id"],
        "generated": text,
        "pred": pred,
        "gold": record["answer"],
        "correct": bool(same(pred, record["answer"])),
        "tokens": n,
    }


def _result(rows: list[dict], seconds: float) -> dict:
    n = len(rows)
    hits = sum(r["correct"] for r in rows)
    return {
        "exact_match": hits / n if n else None,
        "correct": hits,
        "n": n,
        "samples": rows[:SAMPLES],
        "per_item": [int(r["correct"]) for r in rows],  # 0/1 per scored record, in order (paired statistics)
        "gen_tokens": sum(r["tokens"] for r in rows) / n if n else None,
        "latency_s": seconds / n if n else None,
    }


@torch.no_grad()
def exact_match(
    model,
    tokenizer,
    records: list[dict],
    *,
    max_new_tokens: int = 16,
    batch_size: int = 8,
    progress: bool = False,
) -> dict:
    """Text mode (module docstring): {exact_match, correct, n, samples, per_item, gen_tokens, latency_s}."""
    device = next(model.parameters()).device
    usable = [r for r in records if r.get("answer") is not None and r.get("answer_start") is not None]
    pad = pad_id(tokenizer)
    rows, seconds = [], 0.0
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for batch in batches(usable, batch_size, "exact match" if progress else None):
            chat = isinstance(batch[0]["text"], ChatText)  # the conversation before its answer, in this
            prompts = [
                render(tokenizer, r["text"], prompt_only=True).text
                if chat  # model's chat template
                else r["text"][: r["answer_start"]].rstrip()
                for r in batch
            ]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not chat)
            ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)  # (B, P) left-padded
            stop = AnswerEnd.of_batch(tokenizer, ids, mask, after_marker=False)
            new, took = _greedy(model, ids, mask, max_new_tokens=max_new_tokens, pad=pad, stop=stop)
            seconds += took
            for b, r in enumerate(batch):
                rows.append(_row(tokenizer, r, stop.prompts[b], new[b].tolist(), after_marker=False, drop=()))
    finally:
        tokenizer.padding_side = old_side
    return _result(rows, seconds)


@torch.no_grad()
def cot_exact_match(
    model, tokenizer, records: list[dict], template: str, *, max_new_tokens: int = 96, batch_size: int = 32
) -> dict:
    """CoT mode (module docstring) of a text model on template-mode records."""
    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    usable = [(r, segments(r, template)) for r in records if r.get("answer")]
    rows, seconds = [], 0.0
    for batch in chunks(usable, batch_size):
        enc = tokenize(tokenizer, [s.cot_prompt for _, s in batch], padding_side="left")
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)  # (B, P) left-padded
        drop = (pad, tokenizer.eos_token_id)
        stop = AnswerEnd.of_batch(tokenizer, ids, mask, after_marker=True, drop=drop)
        new, took = _greedy(model, ids, mask, max_new_tokens=max_new_tokens, pad=pad, stop=stop)
        seconds += took
        for b, (r, _) in enumerate(batch):
            rows.append(
                _row(
                    tokenizer,
                    r,
                    stop.prompts[b],
                    new[b].tolist(),
                    after_marker=True,
                    drop=drop,
                )
            )
    return _result(rows, seconds)


def _latent_rows(
    student, tokenizer, items: list[tuple], *, max_new_tokens: int, batch_size: int
) -> tuple[list[dict], float]:
    """(rows, seconds) of latent-mode answers to `items` [(record, segments, donor)]: donor None answers from
    the record's own latents, a donor (record, segments) from the latents of the donor's question (its row
    gets `donor`, the donor's id, and `follows`, whether it answered the donor's answer); the rows that become
    samples (the groups that hold the first `SAMPLES` rows) also get `latent_reads`, the latents they answered
    from read as tokens (`LatentStudent.read_latents`). Records sharing an answer prompt decode together; rows
    come in that order (the same for the same items)."""
    device = student.head.init.device
    eos = tokenizer.eos_token_id
    rows, seconds = [], 0.0
    for batch in chunks(items, batch_size):
        groups: dict[str, list] = {}
        for item in batch:
            groups.setdefault(item[1].answer_prompt, []).append(item)
        for prompt, group in groups.items():
            pre = tokenize(tokenizer, [s.prefix for _, s, _ in group], padding_side="left")  # (B, P)
            p_ids = tokenize(tokenizer, [prompt] * len(group), add_special_tokens=False)[
                "input_ids"
            ]  # (B, Q)
            given = None
            if group[0][2] is not None:  # the donors' questions' latents (B, M, d)
                donors = tokenize(tokenizer, [d[1].prefix for _, _, d in group], padding_side="left")
                given = student.latents(donors["input_ids"].to(device), donors["attention_mask"].to(device))
            out = student.generate(
                pre["input_ids"].to(device),
                pre["attention_mask"].to(device),
                p_ids.to(device),
                max_new_tokens=max_new_tokens,
                eos_id=eos,
                latents=given,
            )
            seconds += out["seconds"]
            reads = None
            if len(rows) < SAMPLES:  # only the rows that become samples: one more pass, outside the timing
                reads = student.read_latents(
                    pre["input_ids"].to(device), pre["attention_mask"].to(device), out["latents"]
                ).tolist()  # (B, M)
            for b, (r, _, donor) in enumerate(group):
                # the context the answer is decoded in: the question's tokens and the answer prompt's (the
                # latents between them are no tokens)
                context = pre["input_ids"][b][pre["attention_mask"][b].bool()].tolist() + p_ids[b].tolist()
                row = _row(tokenizer, r, context, out["tokens"][b].tolist(), after_marker=False, drop=(eos,))
                if reads is not None:
                    row["latent_reads"] = [tokenizer.decode([t]) for t in reads[b]]
                if donor is not None:
                    row["donor"] = donor[0]["id"]
                    row["follows"] = bool(same(row["pred"], donor[0]["answer"]))
                rows.append(row)
    return rows, seconds


def _usable(records: list[dict], template: str) -> list[tuple]:
    return [(r, segments(r, template)) for r in records if r.get("answer")]


@torch.no_grad()
def latent_exact_match(
    student, tokenizer, records: list[dict], template: str, *, max_new_tokens: int = 16, batch_size: int = 32
) -> dict:
    """Latent mode (module docstring) of a `LatentStudent` on template-mode records; also `latent_passes` and
    `latent_tokens` (M) per answer, and in each sample its latents read as tokens (`latent_reads`)."""
    items = [(r, s, None) for r, s in _usable(records, template)]
    rows, seconds = _latent_rows(
        student, tokenizer, items, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    out = _result(rows, seconds)
    out["latent_passes"] = student.iterations + 1 if student.tokens else 0
    out["latent_tokens"] = student.tokens
    return out


def swap_donors(usable: list[tuple]) -> list[int] | None:
    """For each (record, segments) of `usable` the index of its donor in the swap probe: the next record after
    it (cyclically) with the same answer prompt and another answer. None when some record has none (every
    record of its answer prompt has the same answer)."""
    n, donors = len(usable), []
    for i, (r, s) in enumerate(usable):
        after = ((i + k) % n for k in range(1, n))  # the records after i, cyclically
        j = next(
            (
                j
                for j in after
                if usable[j][1].answer_prompt == s.answer_prompt
                and not same(usable[j][0]["answer"], r["answer"])
            ),
            None,
        )
        if j is None:
            return None
        donors.append(j)
    return donors


@torch.no_grad()
def latent_swap_exact_match(
    student, tokenizer, records: list[dict], template: str, *, max_new_tokens: int = 16, batch_size: int = 32
) -> dict | None:
    """The swap probe: do a latent student's answers read its latents? Each record is answered, as in
    `latent_exact_match`, from its own question and answer prompt but with the latents of another record's
    question (its donor, `swap_donors`: one with another answer). An answer that ignores the latents is
    unchanged (exact_match as without the swap); one read from them follows the donor (`follows`: the
    fraction answering the donor's answer). {exact_match, correct, n, per_item (in `latent_exact_match`'s
    order, so the two pair), follows, samples (with each row's donor id)}; None when the student has no
    latents or no donors exist."""
    usable = _usable(records, template)
    donors = swap_donors(usable) if student.tokens else None
    if not donors:
        return None
    items = [(r, s, usable[j]) for (r, s), j in zip(usable, donors, strict=True)]
    rows, _ = _latent_rows(student, tokenizer, items, max_new_tokens=max_new_tokens, batch_size=batch_size)
    out = {k: v for k, v in _result(rows, 0.0).items() if k not in ("gen_tokens", "latency_s")}
    out["follows"] = sum(r["follows"] for r in rows) / len(rows)
    return out
