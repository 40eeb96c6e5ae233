"""Held-out evaluation of a saved latent-reasoning student: latent-mode exact match (with generated tokens, latency
and latent passes per answer) and answer CE after the latents, computed on the records given. `kvdistill eval` on a
latent run and the experiment runner both call `evaluate_latent`.
"""

from __future__ import annotations

import math
from pathlib import Path

from kvdistill.objectives.kava import latent_answer_ce
from kvdistill.student.answer import latent_exact_match
from kvdistill.student.latent import load_latent_student

FIELDS = ("exact_match", "per_item", "samples", "gen_tokens", "latency_s", "latent_passes", "latent_tokens", "correct",
          "n")


def evaluate_latent(student_dir: str | Path, records: list[dict], template: str, *, max_new_tokens: int,
                    batch_size: int, device: str, em: bool = True) -> dict:
    """{ce, ppl, tokens (answer tokens counted)} and, with `em`, {exact_match, per_item, samples, gen_tokens,
    latency_s, latent_passes, latent_tokens, correct, n} of the latent student saved in `student_dir` on `records`
    (template mode)."""
    student, tok = load_latent_student(student_dir, device=device)
    out = {}
    if em:
        got = latent_exact_match(student, tok, records, template, max_new_tokens=max_new_tokens, batch_size=batch_size)
        out = {k: got[k] for k in FIELDS}
    ce, tokens = latent_answer_ce(student, tok, records, template, batch_size=batch_size)
    del student
    return {"ce": ce, "ppl": math.exp(min(ce, 50.0)), "tokens": tokens, **out}
