"""On-policy distillation (GKD, Agarwal et al. 2024): with probability λ a step's batches are the student's
own samples, and the teachers score that text.

Per optimizer step s (GKD draws per batch; here the batch is the optimizer step's, so every micro-batch and
process of one step agree, and accumulation or DDP layouts make the same choice):

    on(s)   = u(s) < λ,  u(s) ~ U[0, 1) from a generator seeded by (train.seed, s)
    prompt  = the record's text up to the end of its {question} line (`data.template.question_prompt`)
    text'   = prompt + the student's continuation: sampled at `temperature` / `top_p`, at most
            `max_new_tokens`, up to the end of its answer line (what follows the last 'Answer:' up to a line
            break, as greedy decoding reads an answer: `eval.decode.AnswerEnd` stops a row there, so a batch
            ends when every row has answered) or its end-of-sequence token, batched (left-padded prompts)
            under torch.no_grad in eval mode, seeded by (train.seed, s, sample ids)

On an on-policy step the student's K/V and logits and every teacher's (each retokenised by its own tokenizer,
and aligned on UTF-8 bytes as always) come from text', so the K/V, logit and other teacher terms apply to the
student's own text: the whole of it, prompt included, as off-policy they apply to the whole data text (the
prompt is common to both; what on-policy changes is the continuation). CE stays on the data text (a second
forward of the student on it): a student's CE on its own samples would teach it its own mistakes, while the
data text is the supervised signal GKD mixes in.

The random numbers are a pure function of (train.seed, step, sample ids): `torch.random.fork_rng` keeps the
global generators untouched, so an off-policy step runs exactly as without on-policy (λ = 0 is the off-policy
run bit for bit), and a resumed run draws what the uninterrupted one drew (the checkpoint's step restores the
sampling state). The sampled text depends on the micro-batch (generation is batched), so, unlike the
off-policy step, an on-policy step's update depends on how its samples are split into micro-batches and
processes.
"""

from __future__ import annotations

import hashlib
import time

import torch

from kvdistill.data.template import question_prompt
from kvdistill.eval.decode import AnswerEnd, pad_id
from kvdistill.models.tokenization import continuation
from kvdistill.student import unwrap_student

METRICS = ("on_policy/sampled", "on_policy/new_tokens", "on_policy/generate_s")


def _seed(*parts) -> int:
    """A 63-bit seed from the parts (stable across processes and Python runs, unlike hash())."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class OnPolicy:
    """The on-policy side of `TextObjective`: which steps sample (`chosen`) and the samples (`sample`).

    cfg: `train.on_policy`; seed: train.seed; template: data.template (the prompt); tokenizer: the
    student's."""

    def __init__(self, cfg, *, seed: int, template: str, tokenizer):
        self.cfg, self.seed, self.template, self.tokenizer = cfg, seed, template, tokenizer

    def chosen(self, step: int) -> bool:
        """Whether optimizer step `step` (0-based) is on-policy: u(step) < λ."""
        u = torch.rand((), generator=torch.Generator().manual_seed(_seed(self.seed, "on-policy step", step)))
        return bool(u < self.cfg.lam)

    @torch.no_grad()
    def sample(
        self, student: torch.nn.Module, records: list[dict], step: int
    ) -> tuple[list[dict], dict[str, float]]:
        """(records whose text is prompt + the student's sampled continuation, generation metrics). The new
        records keep id and question; answer fields are dropped (the student's text has none of the
        data's)."""
        model = unwrap_student(student)
        device = next(model.parameters()).device
        tok = self.tokenizer
        prompts = [question_prompt(r, self.template) for r in records]
        pad = pad_id(tok)
        side, tok.padding_side = tok.padding_side, "left"
        try:
            enc = tok(prompts, return_tensors="pt", padding=True)
        finally:
            tok.padding_side = side
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)  # (B, T_p) left-padded
        stop = AnswerEnd.of_batch(tok, ids, mask, after_marker=True, drop=(pad, tok.eos_token_id))
        from transformers import GenerationConfig, StoppingCriteriaList

        gen = GenerationConfig(
            do_sample=True,
            temperature=self.cfg.temperature,
            top_p=self.cfg.top_p,
            top_k=0,
            max_new_tokens=self.cfg.max_new_tokens,
            pad_token_id=pad,
            eos_token_id=tok.eos_token_id,
        )
        was = model.training
        model.eval()
        t0 = time.perf_counter()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                seed = _seed(self.seed, "on-policy sample", step, *(r["id"] for r in records))
                torch.manual_seed(seed)
                out = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    generation_config=gen,
                    stopping_criteria=StoppingCriteriaList([stop]),
                )  # (B, T_p + new)
            new = out[:, ids.shape[1] :].tolist()
        finally:
            model.train(was)
        sampled, count = [], 0
        for b, (r, prompt) in enumerate(zip(records, prompts, strict=True)):
            row = new[b]
            if b in stop.ended:  # to the end of its answer line, where `stop` ended it (padding follows)
                row = row[: stop.ended[b]]
            elif tok.eos_token_id in row:  # the end-of-sequence token is generated, then padding
                row = row[: row.index(tok.eos_token_id) + 1]
            count += len(row)
            text = prompt + continuation(tok, stop.prompts[b], row)
            sampled.append(
                {
                    "id": r["id"],
                    "text": text,
                    "question": r["question"],
                    "cot": None,
                    "answer": None,
                    "answer_start": None,
                }
            )
        metrics = {
            "on_policy/sampled": 1.0,
            "on_policy/new_tokens": float(count),
            "on_policy/generate_s": time.perf_counter() - t0,
        }
        return sampled, metrics
