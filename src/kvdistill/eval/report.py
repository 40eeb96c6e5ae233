"""One page for a set of runs: comparison table, `kvdistill eval` results, training and held-out curves,
routing weights, layer maps, token alignment.

Plots compare like with like: the training CE of every run on one axis (never a distilled total against a
CE-only total), held-out CE against held-out CE, the KV error of one teacher against the same teacher's.
`DEFINITIONS`, printed on the page, says what each K/V figure is.

Reads the run directories written by `kvdistill train` (eval/runs.py); builds the page model of
eval/page.py, one section after another, and writes it as markdown (or a self-contained HTML page)
with PNG plots in `<out stem>_files/` next to it.

Notation: L_s/L_t student/teacher layers, T_s/T_t student/teacher tokens of the alignment sample.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from kvdistill.errors import KvdistillError
from kvdistill.eval.page import Page, fmt_value, render_html, render_md
from kvdistill.eval.plots import as_matrix, heatmap, line_axes, tick
from kvdistill.eval.runs import Run, finite, load_runs, teacher_names

log = logging.getLogger(__name__)

MAX_TOKENS = 40  # tokens shown per side of the alignment heatmap

DEFINITIONS = (
    "What the K/V figures are. **KV loss** (`loss/kv/<teacher>`, training curves): the training term on "
    "training "
    "batches, as configured (losses.kv: kind, normalisation, key/value weights). **KV error** "
    "(`eval/kv_error/"
    "<teacher>`, held-out): per sample the mean squared error of the student's K/V mapped by the run's "
    "trained maps "
    "into the teacher's geometry, divided by the variance of that sample's teacher K/V values, averaged over "
    "keys "
    "and values, samples and mapped layers: 0 is a perfect match, 1 is no better than the sample's mean "
    "value. "
    "**KV probe 1-R²** (`kvdistill eval`, held-out): a ridge map fitted afresh from the student's K/V to the "
    "teacher's on other records, scored as 1 - R² per feature; it needs no trained maps, so it compares a "
    "CE-only student with a distilled one. The three are on different scales and are never plotted together."
)


# ---------------------------------------------------------------- sections


def _ppl_key(item: tuple[int, Run]) -> tuple:
    i, r = item
    ppl = r.final("eval/ppl")
    return (0, ppl, i) if finite(ppl) else (1, 0.0, i)


def _comparison(page: Page, runs: list[Run], teachers: list[str]) -> None:
    page.heading("Runs")
    header = ["run", "steps", "tokens", "elapsed (s)", "final train CE", "eval CE", "eval ppl"]
    header += [f"eval KV error {t}" for t in teachers]
    rows = []
    for r in runs:
        steps = r.summary.get("steps", r.final_train("step"))
        tokens = r.summary.get("tokens", r.final_train("tokens"))
        elapsed = r.summary.get("elapsed_s", r.final_train("elapsed_s"))
        row = [
            r.name,
            steps,
            tokens,
            elapsed,
            r.final_train("loss/ce"),
            r.final("eval/ce"),
            r.final("eval/ppl"),
        ]
        row += [r.final(f"eval/kv_error/{t}") for t in teachers]
        rows.append(row)
    page.table(header, rows)
    if any(finite(r.final("eval/ppl")) for r in runs):
        page.para("Best first by held-out perplexity.")
    page.para(DEFINITIONS)


def _evaluations(page: Page, runs: list[Run]) -> None:
    """The newest `kvdistill eval` of each run that has one (RUN/eval.json)."""
    have = [r for r in runs if r.eval_file]
    if not have:
        return
    probes = list(dict.fromkeys(t for r in have for t in (r.eval_file.get("probe_kv_error") or {})))
    header = ["run", "step", "samples", "held-out CE", "held-out ppl", "exact match"]
    header += [f"KV probe 1-R² {t}" for t in probes]
    rows = []
    for r in have:
        ev = r.eval_file
        ppl = ev.get("perplexity") or {}
        em = (ev.get("exact_match") or {}).get("exact_match")
        probe = ev.get("probe_kv_error") or {}
        rows.append(
            [r.name, ev.get("step"), ev.get("samples"), ppl.get("ce"), ppl.get("ppl"), em]
            + [(probe.get(t) or {}).get("mean") for t in probes]
        )
    page.heading("Evaluation (kvdistill eval)")
    page.table(header, rows)
    data = {json.dumps(r.eval_file.get("data"), sort_keys=True) for r in have}
    page.para(
        "From each run's eval.json (the newest `kvdistill eval RUN`)"
        + ("; the runs were evaluated on different data, so compare with care." if len(data) > 1 else ".")
    )


def _loss_curves(page: Page, runs: list[Run]) -> None:
    page.heading("Loss curves")
    for i, r in enumerate(runs):
        keys = [k for k in r.train_keys("loss") if r.series(k)[0].size]
        if not keys:
            continue
        fig = Figure(figsize=(8, 4.5))
        ax = line_axes(fig, title=f"{r.name}: loss terms", xlabel="step", ylabel="loss")
        positive = True
        for k in keys:
            steps, vals = r.series(k)
            positive &= bool((vals > 0).all())
            style = {"color": "black", "linewidth": 2.2} if k == "loss" else {"linewidth": 1.2}
            ax.plot(steps, vals, label=k, **style)
        if positive:
            ax.set_yscale("log")
        ax.legend(fontsize=7, ncol=2)
        page.figure(
            fig,
            f"loss_{i}_{r.name}",
            f"{r.name}: every loss term vs step" + (" (log scale)" if positive else ""),
        )
    with_ce = [r for r in runs if r.series("loss/ce")[0].size]
    if len(with_ce) > 1:  # the CE of every run: the one training term that means the same in all of them
        fig = Figure(figsize=(8, 4.5))
        ax = line_axes(fig, title="training CE, all runs", xlabel="step", ylabel="CE (nats/token)")
        for r in with_ce:
            ax.plot(*r.series("loss/ce"), label=r.name)
        ax.legend(fontsize=8)
        page.figure(fig, "loss_ce_all_runs", "Training CE (loss/ce) of every run, on training batches")


def _heldout_curves(page: Page, runs: list[Run], teachers: list[str]) -> None:
    """Held-out CE against the step for every run that evaluated during training; the KV error per teacher."""
    with_ce = [r for r in runs if r.eval_series("eval/ce")[0].size]
    if not with_ce:
        return
    page.heading("Held-out curves")
    fig = Figure(figsize=(8, 4.5))
    ax = line_axes(fig, title="held-out CE, all runs", xlabel="step", ylabel="CE (nats/token)")
    for r in with_ce:
        ax.plot(*r.eval_series("eval/ce"), marker="o", label=r.name)
    ax.legend(fontsize=8)
    page.figure(fig, "heldout_ce", "Held-out CE against the step (train.eval_every and the end of training)")
    for t in teachers:
        key = f"eval/kv_error/{t}"
        have = [r for r in runs if r.eval_series(key)[0].size]
        if not have:
            continue
        fig = Figure(figsize=(8, 4))
        ax = line_axes(fig, title=f"held-out KV error: {t}", xlabel="step", ylabel="KV error")
        for r in have:
            ax.plot(*r.eval_series(key), marker="o", label=r.name)
        ax.legend(fontsize=8)
        page.figure(
            fig, f"heldout_kv_error_{t}", f"{t}: held-out KV error (the run's trained maps) against the step"
        )


def _routing(page: Page, runs: list[Run], teachers: list[str]) -> None:
    have = [(i, r) for i, r in enumerate(runs) if any(r.series(k)[0].size for k in r.train_keys("weight/"))]
    if not have:
        return
    page.heading("Routing weights over teachers")
    rows = []
    for i, r in have:
        fig = Figure(figsize=(8, 3.5))
        ax = line_axes(fig, title=f"{r.name}: teacher weights", xlabel="step", ylabel="weight")
        means = {}
        for k in r.train_keys("weight/"):
            steps, vals = r.series(k)
            if steps.size:
                ax.plot(steps, vals, label=k.removeprefix("weight/"))
                means[k.removeprefix("weight/")] = float(vals.mean())
        ax.legend(fontsize=8)
        page.figure(fig, f"weights_{i}_{r.name}", f"{r.name}: routing weight of each teacher vs step")
        rows.append([r.name] + [means.get(t) for t in teachers])
    page.table(["run"] + [f"mean weight {t}" for t in teachers], rows, title="Mean routing weights")


def _layer_maps(page: Page, runs: list[Run]) -> None:
    seen: dict[str, dict] = {}  # identical plans across runs (same student and teacher) get one figure
    for r in runs:
        for t in (r.plan or {}).get("teachers", []):
            if not isinstance(t, dict):
                continue
            lm, proj = t.get("layer_map") or {}, t.get("projector") or {}
            matrix = as_matrix(lm.get("matrix"))
            if matrix is None:
                continue
            key = json.dumps([t.get("teacher"), lm.get("matrix"), proj.get("kind"), proj.get("params_total")])
            seen.setdefault(key, {"plan": t, "matrix": matrix, "runs": []})["runs"].append(r.name)
    if not seen:
        return
    page.heading("Layer maps")
    for entry in seen.values():
        t, matrix = entry["plan"], entry["matrix"]  # (L_s, L_t)
        name = str(t.get("teacher", "teacher"))
        lm, proj = t.get("layer_map") or {}, t.get("projector") or {}
        fig = Figure(figsize=(max(4.0, 0.25 * matrix.shape[1] + 2.5), max(3.0, 0.25 * matrix.shape[0] + 1.5)))
        heatmap(
            fig,
            matrix,
            xlabel=f"{name} layer (L_t={matrix.shape[1]})",
            ylabel=f"student layer (L_s={matrix.shape[0]})",
            title=f"layer map: {name}",
        )
        params = proj.get("params_total")
        caption = (
            f"{name}: layer map ({lm.get('strategy', '?')}), projector {proj.get('kind', '?')}, "
            f"{fmt_value(params)} params, source {t.get('source', '?')}; runs: {', '.join(entry['runs'])}"
        )
        page.figure(fig, f"layermap_{name}", caption)


def _alignments(page: Page, runs: list[Run]) -> None:
    seen: dict[str, dict] = {}
    for r in runs:
        sample = r.sample or {}
        s_tok = list((sample.get("student") or {}).get("tokens") or [])
        for name, t in (sample.get("teachers") or {}).items():
            if not isinstance(t, dict):
                continue
            A = as_matrix(t.get("alignment"))  # (T_s, T_t)
            if A is None:
                continue
            t_tok = list(t.get("tokens") or [])
            key = json.dumps([name, s_tok, t_tok, t.get("alignment")])
            seen.setdefault(key, {"name": name, "A": A, "s": s_tok, "t": t_tok, "runs": []})["runs"].append(
                r.name
            )
    if not seen:
        return
    page.heading("Token alignment (one sample)")
    for entry in seen.values():
        A = entry["A"][:MAX_TOKENS, :MAX_TOKENS]  # (T_s, T_t), truncated
        T_s, T_t = A.shape
        s_tok, t_tok = [str(x) for x in entry["s"]], [str(x) for x in entry["t"]]
        yticks = [tick(x) for x in s_tok[:T_s]] if len(s_tok) >= T_s else None
        xticks = [tick(x) for x in t_tok[:T_t]] if len(t_tok) >= T_t else None
        fig = Figure(figsize=(max(5.0, 0.2 * T_t + 2.5), max(4.0, 0.2 * T_s + 1.5)))
        heatmap(
            fig,
            A,
            xlabel=f"{entry['name']} tokens",
            ylabel="student tokens",
            title=f"token alignment: student ← {entry['name']}",
            xticks=xticks,
            yticks=yticks,
        )
        cut = " (first 40 tokens each side)" if entry["A"].shape[0] > T_s or entry["A"].shape[1] > T_t else ""
        page.figure(
            fig,
            f"align_{entry['name']}",
            f"{entry['name']}: student × teacher token alignment{cut}; runs: {', '.join(entry['runs'])}",
        )


def _kv_error_layers(page: Page, runs: list[Run], teachers: list[str]) -> None:
    per_teacher = []
    for t in teachers:
        lines = []
        for r in runs:
            vals = r.final(f"eval/kv_error_layers/{t}")
            if isinstance(vals, list) and vals:
                ys = np.asarray([v if finite(v) else np.nan for v in vals], dtype=float)
                if np.isfinite(ys).any():
                    lines.append((r.name, ys))
        if lines:
            per_teacher.append((t, lines))
    if not per_teacher:
        return
    page.heading("Eval KV error per student layer")
    for t, lines in per_teacher:
        fig = Figure(figsize=(7, 3.5))
        ax = line_axes(fig, title=f"eval kv error per layer: {t}", xlabel="student layer", ylabel="kv error")
        for name, ys in lines:
            ax.plot(np.arange(ys.size), ys, marker="o", label=name)  # nan layers leave a gap
        ax.legend(fontsize=8)
        page.figure(fig, f"kv_error_layers_{t}", f"{t}: held-out KV error of each student layer, per run")


# ---------------------------------------------------------------- entry point
PAGE_MARKER = "<!-- written by kvdistill report: rerunning the report replaces this file -->"
FILES_MARKER = ".kvdistill-report"  # in <out stem>_files/: the folder is the report's own


def _check_own(out: Path, files_dir: Path) -> None:
    """Refuse to replace a page or a figure folder that no kvdistill report wrote (the user's own files)."""
    fix = "give --out a new file name (the page's figures go to <name>_files/ next to it), or move that aside"
    if out.is_symlink() or (out.exists() and not out.is_file()):
        raise KvdistillError(
            f"report --out {out} is {'a symlink' if out.is_symlink() else 'a directory'}, "
            "not a page the report wrote",
            fix,
        )
    if out.is_file():
        try:
            with open(out, "rb") as f:
                head = f.read(200).decode("utf-8", "replace")
        except OSError as err:
            raise KvdistillError(f"report --out {out} cannot be read ({err.strerror})", fix) from None
        if PAGE_MARKER not in head:
            raise KvdistillError(
                f"report --out {out} exists and was not written by kvdistill report: it would be overwritten",
                fix,
            )
    if os.path.lexists(files_dir):
        if files_dir.is_symlink() or not files_dir.is_dir() or not (files_dir / FILES_MARKER).is_file():
            raise KvdistillError(
                f"the report's figure folder {files_dir} already exists and was not written by "
                "kvdistill report: replacing it would delete its files",
                fix,
            )
        if any(p.is_dir() and not p.is_symlink() for p in files_dir.iterdir()):
            raise KvdistillError(
                f"the report's figure folder {files_dir} holds folders the report did not write", fix
            )


def write_report(
    run_dirs: list[Path | str],
    out: Path | str,
    *,
    title: str = "kvdistill report",
    fmt: str = "md",
    extra_tables: list[tuple[str, list[str], list[list]]] | None = None,
) -> Path:
    """Write one page about `run_dirs` to `out` (markdown or HTML), its PNGs in `<out stem>_files/`.

    Runs are listed best first by eval perplexity (runs without one last, in the given order).
    `extra_tables` are (title, header, rows) rendered at the top. Returns `out`.
    """
    if fmt not in ("md", "html"):
        raise KvdistillError(f"report format {fmt!r} is not supported", "use fmt='md' or fmt='html'")
    runs = load_runs(run_dirs)
    runs = [r for _, r in sorted(enumerate(runs), key=_ppl_key)]
    teachers = teacher_names(runs)

    out = Path(out)
    files_dir = out.parent / f"{out.stem}_files"
    _check_own(out, files_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(
        tempfile.mkdtemp(prefix=f".{out.stem}_files.", dir=out.parent)
    )  # a new name: nothing replaced
    (tmp_dir / FILES_MARKER).write_text("figures of a kvdistill report; rerunning the report replaces them\n")
    tmp_out = tmp_dir / f".{out.name}.tmp"
    try:
        page = Page(title=title, files_dir=tmp_dir)
        for t_title, header, rows in extra_tables or []:
            page.table(list(header), [list(r) for r in rows], title=t_title)
        _comparison(page, runs, teachers)
        _evaluations(page, runs)
        _loss_curves(page, runs)
        _heldout_curves(page, runs, teachers)
        _routing(page, runs, teachers)
        _layer_maps(page, runs)
        _alignments(page, runs)
        _kv_error_layers(page, runs, teachers)
        render = render_md if fmt == "md" else render_html
        text = render(page, files_dir.name)
        text = (
            PAGE_MARKER + "\n" + text
            if fmt == "md"
            else text.replace("<!DOCTYPE html>", "<!DOCTYPE html>\n" + PAGE_MARKER, 1)
        )
        tmp_out.write_text(text)
        _check_own(out, files_dir)  # again, just before replacing
        os.replace(tmp_out, out)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    # swap in the new figures (a folder this report wrote, checked above); the page links them by name
    if files_dir.is_dir():
        shutil.rmtree(files_dir)
    tmp_dir.rename(files_dir)
    log.info("wrote %s with %d figures", out, len(page.images))
    return out
