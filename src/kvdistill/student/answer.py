"""How a student answers, scored by exact match: a latent-reasoning student (question -> latents -> answer) and CoT
decoding of a text model (question -> generated reasoning -> answer), with what each costs: generated tokens and
latency per answer. Training's held-out evaluations (`train.eval_exact_match`) and the experiment runner's
(`kvdistill.eval.latent`) both call these.

Latent mode: the prefix (question), the M latents (T Jacobi passes + the answer pass), the template's answer prompt
('Answer:'), then greedy decoding; the answer is read from the first generated line. CoT mode: the prefix and the
cot label ('Reasoning:'), then greedy decoding of reasoning and answer; the answer is read after the answer marker.
`gen_tokens` counts the tokens a sample needs: up to the end of its answer line (its first newline after the
answer marker for CoT), or all it generated when no line ends. `latency_s` is the batch's wall time over its size
(batched greedy decoding on the evaluation device), `latent_passes` the backbone passes spent on latents.
"""

from __future__ import annotations

import time

import torch

from kvdistill.data.answers import exact_match as same
from kvdistill.data.answers import extract_answer
from kvdistill.data.segments import segments
from kvdistill.models.capture import tokenize


def chunks(items: list, size: int):
    """Consecutive slices of `items` of at most `size`."""
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _needed(tokenizer, ids: list[int], *, after_marker: bool) -> tuple[str, int]:
    """(text, tokens needed): the decoded text and how many tokens reach the end of the answer line."""
    text = ""
    for n in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:n], skip_special_tokens=True)
        tail = text
        if after_marker:
            marker = text.lower().rfind("answer:")
            if marker < 0:
                continue
            tail = text[marker + len("answer:") :]
        if "\n" in tail.lstrip(" ") and tail.strip():
            return text, n
    return tokenizer.decode(ids, skip_special_tokens=True), len(ids)


def _result(rows: list[dict], seconds: float) -> dict:
    n = len(rows)
    hits = sum(r["correct"] for r in rows)
    return {"exact_match": hits / n if n else None, "correct": hits, "n": n, "samples": rows[:8],
            "per_item": [int(r["correct"]) for r in rows],
            "gen_tokens": sum(r["tokens"] for r in rows) / n if n else None,
            "latency_s": seconds / n if n else None}


@torch.no_grad()
def latent_exact_match(student, tokenizer, records: list[dict], template: str, *, max_new_tokens: int = 16,
                       batch_size: int = 32) -> dict:
    """Greedy latent-mode answers of `student` (a `LatentStudent`) for template-mode records; per record 0/1 in
    `per_item`, and the mean generated tokens, latency and latent passes per answer."""
    device = student.head.init.device
    eos = tokenizer.eos_token_id
    usable = [(r, segments(r, template)) for r in records if r.get("answer")]
    rows, seconds = [], 0.0
    for batch in chunks(usable, batch_size):
        groups: dict[str, list] = {}  # records sharing an answer prompt decode together
        for r, s in batch:
            groups.setdefault(s.answer_prompt, []).append((r, s))
        for prompt, items in groups.items():
            pre = tokenize(tokenizer, [s.prefix for _, s in items], padding_side="left")
            p_ids = tokenize(tokenizer, [prompt] * len(items), add_special_tokens=False)["input_ids"]
            out = student.generate(pre["input_ids"].to(device), pre["attention_mask"].to(device), p_ids.to(device),
                                   max_new_tokens=max_new_tokens, eos_id=eos)
            seconds += out["seconds"]
            for b, (r, _) in enumerate(items):
                ids = [t for t in out["tokens"][b].tolist() if t != eos]
                text, n = _needed(tokenizer, ids, after_marker=False)
                pred = extract_answer("Answer: " + text.strip().split("\n")[0])
                rows.append({"id": r["id"], "generated": text, "pred": pred, "gold": r["answer"],
                             "correct": bool(same(pred, r["answer"])), "tokens": n})
    out = _result(rows, seconds)
    out["latent_passes"] = student.iterations + 1 if student.tokens else 0
    out["latent_tokens"] = student.tokens
    return out


@torch.no_grad()
def cot_exact_match(model, tokenizer, records: list[dict], template: str, *, max_new_tokens: int = 96,
                    batch_size: int = 32) -> dict:
    """Greedy CoT decoding of a text model from the question and the cot label; the answer after 'Answer:'."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    usable = [(r, segments(r, template)) for r in records if r.get("answer")]
    rows, seconds = [], 0.0
    for batch in chunks(usable, batch_size):
        enc = tokenize(tokenizer, [s.cot_prompt for _, s in batch], padding_side="left")
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad)
        if ids.is_cuda:
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
        for b, (r, _) in enumerate(batch):
            new = [t for t in out[b, ids.shape[1] :].tolist() if t not in (pad, tokenizer.eos_token_id)]
            text, n = _needed(tokenizer, new, after_marker=True)
            pred = extract_answer(text) if "answer" in text.lower() else None
            rows.append({"id": r["id"], "generated": text, "pred": pred, "gold": r["answer"],
                         "correct": bool(same(pred, r["answer"])), "tokens": n})
    return _result(rows, seconds)
