"""Evaluate a student on held-out records: the one evaluation path of `kvdistill eval`, the experiment runner
and the quickstart.

`evaluate_saved` loads any saved student (a text student, or a latent student: its directory holds
latent.json) and gives the same figures for every caller; `evaluate_student` is its text-student part for a
model in memory (the quickstart's untrained initial student). A result:

    {"mode": "text" | "latent",
     "perplexity": {"ce", "ppl", "tokens"},     the held-out CE (`kvdistill.eval.heldout`): text students over
                                                every next token, latent students over the answer after the
                                                latents
     "exact_match": {...},                      with `em`: greedy decoding (`kvdistill.eval.decode`), text /
                                                CoT / latent mode; exact_match, correct, n, per_item, samples,
                                                gen_tokens, latency_s (latent: latent_passes, latent_tokens)
     "latent_swap": {...},                      latent students with latents, with `em`: the swap probe
                                                (`latent_swap_exact_match`: each question answered from
                                                another one's latents): exact_match, per_item, follows,
                                                samples
     "probe_kv_error": {TEACHER: {"mean", "layers"}}}   text students against teachers given: the KV probe
                                                        1 - R²
"""

from __future__ import annotations

from pathlib import Path

from kvdistill.device import default_device
from kvdistill.errors import KvdistillError
from kvdistill.eval.decode import (
    cot_exact_match,
    exact_match,
    latent_exact_match,
    latent_swap_exact_match,
)
from kvdistill.eval.heldout import latent_answer_ce, perplexity

__all__ = ["evaluate_saved", "evaluate_student"]


def evaluate_student(
    model,
    tokenizer,
    teachers: dict,
    fit_records,
    eval_records,
    *,
    max_length: int,
    em: bool = True,
    cot: bool = False,
    template: str | None = None,
    batch_size: int = 8,
    teacher_cache=None,
    max_new_tokens: int = 16,
    progress: bool = False,
) -> dict:
    """A text student in memory (module docstring); `teachers` {name: (model, tokenizer)} for the KV probe
    (fitted on `fit_records`), `cot`: exact match by CoT decoding (needs the data's `template`).
    `teacher_cache` (a `kvdistill.eval.metrics.TeacherRowsCache`): pass the same one when evaluating several
    students against the same teachers and records, and each teacher's K/V are captured once for all of them.
    `progress`: bars."""
    from kvdistill.eval.metrics import probe_kv_error

    model.eval()
    out = {
        "mode": "text",
        "perplexity": perplexity(
            model, tokenizer, eval_records, max_length=max_length, batch_size=batch_size, progress=progress
        ),
    }
    if em and cot:
        out["exact_match"] = cot_exact_match(
            model, tokenizer, eval_records, template, max_new_tokens=max_new_tokens, batch_size=batch_size
        )
    elif em:
        out["exact_match"] = exact_match(
            model,
            tokenizer,
            eval_records,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            progress=progress,
        )
    out["probe_kv_error"] = {}
    for name, (t_model, t_tok) in teachers.items():
        layers = probe_kv_error(
            model,
            tokenizer,
            t_model,
            t_tok,
            fit_records,
            eval_records,
            max_length=max_length,
            batch_size=batch_size,
            cache=teacher_cache,
            progress=name if progress else None,
        )
        out["probe_kv_error"][name] = {"mean": sum(layers) / len(layers), "layers": layers}
    return out


def evaluate_saved(
    student: str | Path,
    eval_records: list[dict],
    *,
    template: str,
    max_length: int,
    em: bool = True,
    cot: bool = False,
    max_new_tokens: int = 16,
    max_cot_tokens: int = 96,
    batch_size: int = 8,
    device: str | None = None,
    teachers: dict | None = None,
    fit_records=(),
    teacher_cache=None,
    progress: bool = False,
) -> dict:
    """The saved student `student` (a directory `load_model` reads, or a latent student's) on `eval_records`
    (module docstring) on `device` (default: `kvdistill.device.default_device`). A latent student answers in
    latent mode with `max_new_tokens` and has no KV probe (`teachers` refused); a text student answers
    directly with `max_new_tokens` or, with `cot`, by CoT decoding with `max_cot_tokens`."""
    from kvdistill.models.load import load_model
    from kvdistill.student.latent import is_latent_student, load_latent_student

    device = default_device(device)
    if is_latent_student(student):
        if teachers:
            raise KvdistillError(
                f"teachers {list(teachers)}: the KV probe error is measured for text students; a "
                "latent student's K/V error against its targets is training's eval/latent_kv",
                "drop --teacher for a latent student",
            )
        model, tok = load_latent_student(student, device=device)
        model.eval()
        out = {"mode": "latent"}
        if em:
            out["exact_match"] = latent_exact_match(
                model, tok, eval_records, template, max_new_tokens=max_new_tokens, batch_size=batch_size
            )
            swap = latent_swap_exact_match(
                model, tok, eval_records, template, max_new_tokens=max_new_tokens, batch_size=batch_size
            )
            if swap is not None:
                out["latent_swap"] = swap
        out["perplexity"] = latent_answer_ce(model, tok, eval_records, template, batch_size=batch_size)
        out["probe_kv_error"] = {}
        return out
    model, tok = load_model(
        str(student), device=device, attn_implementation="sdpa"
    )  # eval reads no attention maps
    positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions < max_length:
        raise KvdistillError(
            f"max_length {max_length} is longer than the student's {positions} positions",
            f"pass --max-length {positions} or less",
        )
    return evaluate_student(
        model,
        tok,
        teachers or {},
        fit_records,
        eval_records,
        max_length=max_length,
        em=em,
        cot=cot,
        template=template,
        batch_size=batch_size,
        teacher_cache=teacher_cache,
        max_new_tokens=max_cot_tokens if cot else max_new_tokens,
        progress=progress,
    )
