"""One page for a set of runs: comparison table, loss curves, routing weights, layer maps, token alignment.

Reads the run directory written by `kvdistill train` (see docs/architecture.md, "Run directory"):
metrics.jsonl is required; config.yaml, summary.json, plan.json and alignment_sample.json are optional.
The page is markdown (or a self-contained HTML page) with PNG plots in `<out stem>_files/` next to it.

Notation: L_s/L_t student/teacher layers, T_s/T_t student/teacher tokens of the alignment sample.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import yaml
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from kvdistill.errors import KvdistillError

log = logging.getLogger(__name__)

MAX_TOKENS = 40  # tokens shown per side of the alignment heatmap
_MISSING = "—"


@dataclass
class Run:
    """What the report needs from one run directory."""

    path: Path
    name: str
    train: list[dict]  # metrics.jsonl lines without "split": "eval", in file order
    evals: list[dict]  # eval lines
    summary: dict = field(default_factory=dict)
    plan: dict | None = None
    sample: dict | None = None

    def final(self, key: str) -> Any:
        """`key` from summary.json, else from the last eval line that has it."""
        if key in self.summary:
            return self.summary[key]
        for row in reversed(self.evals):
            if key in row:
                return row[key]
        return None

    def final_train(self, key: str) -> Any:
        for row in reversed(self.train):
            if key in row:
                return row[key]
        return None

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of a train key, finite points only."""
        pts = [(r["step"], r[key]) for r in self.train if "step" in r and _finite(r.get(key))]
        if not pts:
            return np.zeros(0), np.zeros(0)
        steps, vals = zip(*pts, strict=True)
        return np.asarray(steps, dtype=float), np.asarray(vals, dtype=float)

    def train_keys(self, prefix: str) -> list[str]:
        keys: dict[str, None] = {}
        for row in self.train:
            for k in row:
                if k.startswith(prefix) and isinstance(row[k], (int, float)):
                    keys[k] = None
        return list(keys)


# ---------------------------------------------------------------- reading


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        log.warning("skipping unreadable %s: %s", path, err)
        return None


def _read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    train, evals = [], []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)  # json accepts NaN / Infinity, which the trainer may write
        except json.JSONDecodeError:
            log.warning("%s:%d is not JSON (a run cut off mid-write?); skipped", path, i)
            continue
        if isinstance(row, dict):
            (evals if row.get("split") == "eval" else train).append(row)
    return train, evals


def _run_name(path: Path) -> str:
    cfg_path = path / "config.yaml"
    if cfg_path.is_file():
        try:
            cfg = yaml.safe_load(cfg_path.read_text())
        except yaml.YAMLError as err:
            log.warning("skipping unreadable %s: %s", cfg_path, err)
            cfg = None
        if isinstance(cfg, dict) and cfg.get("name"):
            return str(cfg["name"])
    return path.resolve().name


def load_runs(run_dirs: list[Path | str]) -> list[Run]:
    """Read every run directory; a missing directory or metrics.jsonl is an error naming all of them."""
    if not run_dirs:
        raise KvdistillError("no run directories given", "pass one or more directories written by `kvdistill train`")
    paths = [Path(d) for d in run_dirs]
    problems = []
    for p in paths:
        if not p.is_dir():
            problems.append(f"{p}: no such directory")
        elif not (p / "metrics.jsonl").is_file():
            problems.append(f"{p}: no metrics.jsonl (not a run directory, or training never logged a step)")
    if problems:
        raise KvdistillError("cannot report on " + "; ".join(problems),
                             "pass directories written by `kvdistill train CONFIG --out DIR`")
    runs = []
    for p in paths:
        train, evals = _read_metrics(p / "metrics.jsonl")
        summary = _read_json(p / "summary.json")
        plan = _read_json(p / "plan.json")
        sample = _read_json(p / "alignment_sample.json")
        runs.append(Run(path=p, name=_run_name(p), train=train, evals=evals,
                        summary=summary if isinstance(summary, dict) else {},
                        plan=plan if isinstance(plan, dict) else None,
                        sample=sample if isinstance(sample, dict) else None))
    # two runs with the same config name: tell them apart by directory
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.name] = counts.get(r.name, 0) + 1
    for r in runs:
        if counts[r.name] > 1:
            r.name = f"{r.name} ({r.path})"
    return runs


def _teachers(runs: list[Run]) -> list[str]:
    """Union of teacher names over all runs, in first-seen order."""
    names: dict[str, None] = {}
    for r in runs:
        for t in (r.plan or {}).get("teachers", []):
            if isinstance(t, dict) and t.get("teacher"):
                names[str(t["teacher"])] = None
        keys = list(r.summary) + [k for row in r.evals for k in row] + [k for row in r.train for k in row]
        for k in keys:
            if k.startswith("eval/kv_error/") or k.startswith("weight/"):
                names[k.split("/", 1)[1].removeprefix("kv_error/")] = None
    return list(names)


# ---------------------------------------------------------------- formatting


def fmt_value(v: Any) -> str:
    """A number for a table: ints as is, floats to 4 significant digits, nan/inf spelled out."""
    if v is None:
        return _MISSING
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if abs(v) >= 1000:
            return f"{v:.0f}"
        return f"{v:.4g}"
    return str(v)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def _tick(token: str) -> str:
    """A token as a tick label: visible spaces/newlines, no mathtext, short."""
    t = token.replace("Ġ", "␣").replace("▁", "␣").replace("Ċ", "⏎").replace("\n", "⏎").replace("$", r"\$")
    return t if len(t) <= 12 else t[:11] + "…"


# ---------------------------------------------------------------- page model


@dataclass
class _Page:
    """Blocks in order: ("h", level, text), ("p", text), ("table", title, header, rows), ("img", file, caption)."""

    title: str
    files_dir: Path
    blocks: list[tuple] = field(default_factory=list)
    images: list[str] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("h", level, text))

    def para(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, header: list[str], rows: list[list], title: str | None = None) -> None:
        self.blocks.append(("table", title, [str(h) for h in header], [[fmt_value(c) for c in r] for r in rows]))

    def figure(self, fig: Figure, stem: str, caption: str) -> None:
        name = _slug(stem) + ".png"
        if name in self.images:  # keep file names unique
            name = f"{_slug(stem)}_{len(self.images)}.png"
        fig.savefig(self.files_dir / name, dpi=100, bbox_inches="tight")
        self.images.append(name)
        self.blocks.append(("img", name, caption))


def _md_cell(text: str) -> str:
    return text.replace("|", r"\|").replace("\n", " ")


def _render_md(page: _Page, link_dir: str) -> str:
    out = [f"# {page.title}", ""]
    for b in page.blocks:
        if b[0] == "h":
            out += ["#" * b[1] + " " + b[2], ""]
        elif b[0] == "p":
            out += [b[1], ""]
        elif b[0] == "table":
            _, title, header, rows = b
            if title:
                out += [f"**{title}**", ""]
            out.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
            out.append("|" + "---|" * len(header))
            out += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
            out.append("")
        elif b[0] == "img":
            _, name, caption = b
            out += [f"![{_md_cell(caption)}]({quote(link_dir)}/{quote(name)})", "", f"*{caption}*", ""]
    return "\n".join(out)


def _render_html(page: _Page, link_dir: str) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\">", f"<title>{e(page.title)}</title>",
           "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
           "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
           "text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}"
           "img{max-width:100%}figcaption{font-style:italic;color:#444}</style>",
           "</head><body>", f"<h1>{e(page.title)}</h1>"]
    for b in page.blocks:
        if b[0] == "h":
            out.append(f"<h{b[1]}>{e(b[2])}</h{b[1]}>")
        elif b[0] == "p":
            out.append(f"<p>{e(b[1])}</p>")
        elif b[0] == "table":
            _, title, header, rows = b
            out.append("<table>")
            if title:
                out.append(f"<caption><b>{e(title)}</b></caption>")
            out.append("<tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows]
            out.append("</table>")
        elif b[0] == "img":
            _, name, caption = b
            out.append(f"<figure><img src=\"{e(link_dir)}/{e(name)}\" alt=\"{e(caption)}\">"
                       f"<figcaption>{e(caption)}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- sections


def _ppl_key(item: tuple[int, Run]) -> tuple:
    i, r = item
    ppl = r.final("eval/ppl")
    return (0, ppl, i) if _finite(ppl) else (1, 0.0, i)


def _comparison(page: _Page, runs: list[Run], teachers: list[str]) -> None:
    page.heading("Runs")
    header = ["run", "steps", "tokens", "elapsed (s)", "final train loss", "eval ce", "eval ppl"]
    header += [f"eval kv error {t}" for t in teachers]
    rows = []
    for r in runs:
        steps = r.summary.get("steps", r.final_train("step"))
        tokens = r.summary.get("tokens", r.final_train("tokens"))
        elapsed = r.summary.get("elapsed_s", r.final_train("elapsed_s"))
        row = [r.name, steps, tokens, elapsed, r.final_train("loss"), r.final("eval/ce"), r.final("eval/ppl")]
        row += [r.final(f"eval/kv_error/{t}") for t in teachers]
        rows.append(row)
    page.table(header, rows)
    if any(_finite(r.final("eval/ppl")) for r in runs):
        page.para("Best first by held-out perplexity.")


def _loss_curves(page: _Page, runs: list[Run]) -> None:
    page.heading("Loss curves")
    for i, r in enumerate(runs):
        keys = [k for k in r.train_keys("loss") if r.series(k)[0].size]
        if not keys:
            continue
        fig = Figure(figsize=(8, 4.5))
        ax = _line_axes(fig, title=f"{r.name}: loss terms", xlabel="step", ylabel="loss")
        positive = True
        for k in keys:
            steps, vals = r.series(k)
            positive &= bool((vals > 0).all())
            style = {"color": "black", "linewidth": 2.2} if k == "loss" else {"linewidth": 1.2}
            ax.plot(steps, vals, label=k, **style)
        if positive:
            ax.set_yscale("log")
        ax.legend(fontsize=7, ncol=2)
        page.figure(fig, f"loss_{i}_{r.name}", f"{r.name}: every loss term vs step"
                    + (" (log scale)" if positive else ""))
    with_total = [r for r in runs if r.series("loss")[0].size]
    if with_total:
        fig = Figure(figsize=(8, 4.5))
        ax = _line_axes(fig, title="total loss, all runs", xlabel="step", ylabel="total loss")
        positive = True
        for r in with_total:
            steps, vals = r.series("loss")
            positive &= bool((vals > 0).all())
            ax.plot(steps, vals, label=r.name)
        if positive:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
        page.figure(fig, "loss_all_runs", "Total training loss of every run")


def _routing(page: _Page, runs: list[Run], teachers: list[str]) -> None:
    have = [(i, r) for i, r in enumerate(runs) if any(r.series(k)[0].size for k in r.train_keys("weight/"))]
    if not have:
        return
    page.heading("Routing weights over teachers")
    rows = []
    for i, r in have:
        fig = Figure(figsize=(8, 3.5))
        ax = _line_axes(fig, title=f"{r.name}: teacher weights", xlabel="step", ylabel="weight")
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


def _line_axes(fig: Figure, *, title: str, xlabel: str, ylabel: str):
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    return ax


def _heatmap(fig: Figure, matrix: np.ndarray, *, xlabel: str, ylabel: str, title: str,
             xticks: list[str] | None = None, yticks: list[str] | None = None) -> None:
    ax = fig.add_subplot()
    shown = np.ma.masked_invalid(matrix)
    im = ax.imshow(shown, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if xticks is not None:
        ax.set_xticks(range(len(xticks)), xticks, rotation=90, fontsize=7)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if yticks is not None:
        ax.set_yticks(range(len(yticks)), yticks, fontsize=7)
    else:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _as_matrix(rows: Any) -> np.ndarray | None:
    """A 2-D float array from nested lists, or None if the rows are ragged, empty or not numbers."""
    try:
        m = np.asarray(rows, dtype=float)
    except (TypeError, ValueError):
        return None
    return m if m.ndim == 2 and m.size else None


def _layer_maps(page: _Page, runs: list[Run]) -> None:
    seen: dict[str, dict] = {}  # identical plans across runs (same student and teacher) get one figure
    for r in runs:
        for t in (r.plan or {}).get("teachers", []):
            if not isinstance(t, dict):
                continue
            lm, proj = t.get("layer_map") or {}, t.get("projector") or {}
            matrix = _as_matrix(lm.get("matrix"))
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
        _heatmap(fig, matrix, xlabel=f"{name} layer (L_t={matrix.shape[1]})",
                 ylabel=f"student layer (L_s={matrix.shape[0]})", title=f"layer map: {name}")
        params = proj.get("params_total")
        caption = (f"{name}: layer map ({lm.get('strategy', '?')}), projector {proj.get('kind', '?')}, "
                   f"{fmt_value(params)} params, source {t.get('source', '?')}; runs: {', '.join(entry['runs'])}")
        page.figure(fig, f"layermap_{name}", caption)


def _alignments(page: _Page, runs: list[Run]) -> None:
    seen: dict[str, dict] = {}
    for r in runs:
        sample = r.sample or {}
        s_tok = list((sample.get("student") or {}).get("tokens") or [])
        for name, t in (sample.get("teachers") or {}).items():
            if not isinstance(t, dict):
                continue
            A = _as_matrix(t.get("alignment"))  # (T_s, T_t)
            if A is None:
                continue
            t_tok = list(t.get("tokens") or [])
            key = json.dumps([name, s_tok, t_tok, t.get("alignment")])
            seen.setdefault(key, {"name": name, "A": A, "s": s_tok, "t": t_tok, "runs": []})["runs"].append(r.name)
    if not seen:
        return
    page.heading("Token alignment (one sample)")
    for entry in seen.values():
        A = entry["A"][:MAX_TOKENS, :MAX_TOKENS]  # (T_s, T_t), truncated
        T_s, T_t = A.shape
        s_tok, t_tok = [str(x) for x in entry["s"]], [str(x) for x in entry["t"]]
        yticks = [_tick(x) for x in s_tok[:T_s]] if len(s_tok) >= T_s else None
        xticks = [_tick(x) for x in t_tok[:T_t]] if len(t_tok) >= T_t else None
        fig = Figure(figsize=(max(5.0, 0.2 * T_t + 2.5), max(4.0, 0.2 * T_s + 1.5)))
        _heatmap(fig, A, xlabel=f"{entry['name']} tokens", ylabel="student tokens",
                 title=f"token alignment: student ← {entry['name']}", xticks=xticks, yticks=yticks)
        cut = " (first 40 tokens each side)" if entry["A"].shape[0] > T_s or entry["A"].shape[1] > T_t else ""
        page.figure(fig, f"align_{entry['name']}",
                    f"{entry['name']}: student × teacher token alignment{cut}; runs: {', '.join(entry['runs'])}")


def _kv_error_layers(page: _Page, runs: list[Run], teachers: list[str]) -> None:
    per_teacher = []
    for t in teachers:
        lines = []
        for r in runs:
            vals = r.final(f"eval/kv_error_layers/{t}")
            if isinstance(vals, list) and vals:
                ys = np.asarray([v if _finite(v) else np.nan for v in vals], dtype=float)
                if np.isfinite(ys).any():
                    lines.append((r.name, ys))
        if lines:
            per_teacher.append((t, lines))
    if not per_teacher:
        return
    page.heading("Eval KV error per student layer")
    for t, lines in per_teacher:
        fig = Figure(figsize=(7, 3.5))
        ax = _line_axes(fig, title=f"eval kv error per layer: {t}", xlabel="student layer", ylabel="kv error")
        for name, ys in lines:
            ax.plot(np.arange(ys.size), ys, marker="o", label=name)  # nan layers leave a gap
        ax.legend(fontsize=8)
        page.figure(fig, f"kv_error_layers_{t}", f"{t}: held-out KV error of each student layer, per run")


# ---------------------------------------------------------------- entry point


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
    teachers = _teachers(runs)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    files_dir = out.parent / f"{out.stem}_files"
    tmp_dir = out.parent / f".{out.stem}_files.tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir()
    tmp_out = out.parent / f".{out.name}.tmp"
    try:
        page = _Page(title=title, files_dir=tmp_dir)
        for t_title, header, rows in extra_tables or []:
            page.table(list(header), [list(r) for r in rows], title=t_title)
        _comparison(page, runs, teachers)
        _loss_curves(page, runs)
        _routing(page, runs, teachers)
        _layer_maps(page, runs)
        _alignments(page, runs)
        _kv_error_layers(page, runs, teachers)
        render = _render_md if fmt == "md" else _render_html
        text = render(page, files_dir.name)
        tmp_out.write_text(text)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_out.unlink(missing_ok=True)
        raise
    # swap in the new page and its figures together; nothing half-written is left behind
    shutil.rmtree(files_dir, ignore_errors=True)
    tmp_dir.rename(files_dir)
    os.replace(tmp_out, out)
    log.info("wrote %s with %d figures", out, len(page.images))
    return out
