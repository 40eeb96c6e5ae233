"""Held-out evaluations during training: the objective's figures, exact match where asked, the best student
kept."""

from __future__ import annotations

import time

from kvdistill.atomic import write_json_atomic
from kvdistill.train.run import Run


def evaluate(run: Run, step: int, bar=None) -> dict:
    """Held-out figures of the student after `step` (CE / ppl, per-layer K/V errors, and exact match where
    train.eval_exact_match asks), logged as an eval row with the time so far; train.early_stopping takes them
    and, on a new best, the student is saved to DIR/best/student. Its time counts to `eval_s`, not to
    `train_s`. With a progress `bar` (main process), the figures are printed above it as one line."""
    t0 = time.time()
    cfg = run.cfg
    ev = run.inner.evaluate(run.eval_records)
    if cfg.train.eval_exact_match:
        from kvdistill.eval.decode import cot_exact_match, exact_match, latent_exact_match

        student, tok, bs = run.inner.student, run.inner.tokenizer, max(cfg.train.batch_size, 256)
        was = student.training
        student.eval()
        try:
            if cfg.student.latent is not None:  # a latent student answers in latent mode
                em = latent_exact_match(
                    student,
                    tok,
                    run.eval_records,
                    cfg.data.template,
                    max_new_tokens=cfg.train.eval_max_new_tokens,
                    batch_size=bs,
                )
                ev["eval/gen_tokens"] = em["gen_tokens"]
            elif cfg.train.eval_cot:
                em = cot_exact_match(
                    student,
                    tok,
                    run.eval_records,
                    cfg.data.template,
                    max_new_tokens=cfg.train.eval_max_new_tokens,
                    batch_size=bs,
                )
            else:
                em = exact_match(
                    student,
                    tok,
                    run.eval_records,
                    max_new_tokens=cfg.train.eval_max_new_tokens,
                    batch_size=bs,
                )
        finally:
            student.train(was)
        ev["eval/exact_match"] = em["exact_match"]
    if run.selection is not None and run.selection.update(step, ev) and run.main:
        save_best(run, step)
    run.eval_s += time.time() - t0
    elapsed = time.time() - run.t0
    row = {"step": step, "split": "eval", **ev, "elapsed_s": elapsed, "train_s": elapsed - run.eval_s}
    run.log.write(row)
    run.last_eval = (step, ev)
    if bar is not None and run.main:
        shown = [f"held-out CE {ev['eval/ce']:.4f}"] if "eval/ce" in ev else []
        if "eval/exact_match" in ev and ev["eval/exact_match"] is not None:
            shown.append(f"exact match {ev['eval/exact_match']:.3f}")
        kv = ", ".join(
            f"{k.removeprefix('eval/kv_error/')} {v:.4f}"
            for k, v in ev.items()
            if k.startswith("eval/kv_error/")
        )
        bar.write(f"step {step}: " + "; ".join(shown + ([f"KV error {kv}"] if kv else [])))
    return ev


def save_best(run: Run, step: int) -> None:
    """The student of `step` as DIR/best/student (replacing the previous best: written aside, then renamed)
    and DIR/best.json {step, metric, value}."""
    import shutil

    best, tmp = run.out_dir / "best", run.out_dir / "best.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    run.inner.save_student(tmp / "student")
    shutil.rmtree(best, ignore_errors=True)
    tmp.rename(best)
    sel = run.selection
    write_json_atomic(run.out_dir / "best.json", {"step": step, "metric": sel.metric, "value": sel.best})
