"""The report page: comparison table numbers, ordering, figures that exist and are PNGs, tolerance, errors."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from kvdistill.errors import KvdistillError
from kvdistill.eval.page import fmt_value
from kvdistill.eval.report import write_report

TEACHERS = ("smollm2", "gemma3")
STEPS = 20
PNG = b"\x89PNG\r\n\x1a\n"


def _plan() -> dict:
    student = {"name": "student", "model_type": "gpt2", "num_layers": 4, "num_kv_heads": 2, "head_dim": 32}
    teachers = []
    for name, L_t in zip(TEACHERS, (30, 18), strict=True):
        matrix = [[0.0] * L_t for _ in range(4)]  # (L_s, L_t)
        for s in range(4):
            matrix[s][round((s + 1) * L_t / 4) - 1] = 1.0
        teachers.append(
            {
                "teacher": name,
                "geometry": {
                    "name": name,
                    "model_type": "llama",
                    "num_layers": L_t,
                    "num_kv_heads": 3,
                    "head_dim": 64,
                },
                "layer_map": {"strategy": "ratio", "matrix": matrix, "mapped_student_layers": 4},
                "projector": {
                    "kind": "linear_per_head",
                    "params_total": 12288 if name == "smollm2" else 8192,
                },
                "source": "online" if name == "smollm2" else "cache",
            }
        )
    return {"student": student, "teachers": teachers}


def _sample() -> dict:
    s_tok = [
        "Q",
        ":",
        "Ġ$",
        "5",
        "Ġapples",
        "Ċ",
    ] * 8  # 48 tokens: truncated to 40, `$` must not break mathtext
    out = {"text": "Q: $5 apples\n" * 8, "student": {"tokens": s_tok}, "teachers": {}}
    for name, n in zip(TEACHERS, (50, 44), strict=True):
        alignment = [
            [1.0 if abs(i * n / 48 - j) < 1 else 0.0 for j in range(n)] for i in range(48)
        ]  # (T_s, T_t)
        out["teachers"][name] = {"tokens": [f"▁t{j}" for j in range(n)], "alignment": alignment}
    return out


def make_run(
    path: Path, name: str, *, final_loss: float, summary: dict | None, optional: bool = True
) -> Path:
    """A run directory as the trainer writes it: 20 steps, 2 teachers, an eval line every 10 steps."""
    path.mkdir(parents=True)
    lines = []
    for step in range(1, STEPS + 1):
        loss = final_loss + 0.1 * (STEPS - step)
        row = {
            "step": step,
            "lr": 1e-3,
            "loss": loss,
            "loss/ce": 0.6 * loss,
            "loss/kd": 0.1 * loss,
            "loss/entropy": 0.01,
            "tokens": 256.0 * step,
            "tokens_per_s": 900.0,
            "elapsed_s": 0.6 * step,
            "grad_norm": 1.5,
        }
        for k, t in enumerate(TEACHERS):
            row[f"loss/kv/{t}"] = 0.2 * loss / (k + 1)
            row[f"loss/cosine/{t}"] = 0.05 * loss
            row[f"weight/{t}"] = 0.5 + (0.01 * step if k == 0 else -0.01 * step)
        if step == 5:
            row["loss/kd"] = float("nan")  # skipped in plots
        lines.append(row)
        if step % 10 == 0:
            lines.append(
                {
                    "step": step,
                    "split": "eval",
                    "eval/ce": 3.5,
                    "eval/ppl": 33.1,
                    **{f"eval/kv_error/{t}": 0.9 for t in TEACHERS},
                }
            )
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if optional:
        (path / "config.yaml").write_text(f"name: {name}\nstudent:\n  model: tiny\n")
        (path / "plan.json").write_text(json.dumps(_plan()))
        (path / "alignment_sample.json").write_text(json.dumps(_sample()))
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary))
    return path


def _summary(ppl: float, kv: tuple[float, float], layers: bool = True) -> dict:
    out = {"steps": STEPS, "tokens": 5120, "elapsed_s": 12.3, "eval/ce": math.log(ppl), "eval/ppl": ppl}
    for t, v in zip(TEACHERS, kv, strict=True):
        out[f"eval/kv_error/{t}"] = v
        if layers:
            out[f"eval/kv_error_layers/{t}"] = [v + 0.1, v, float("nan"), v - 0.1]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("runs")
    # given worst first: the page must put `kd` (lower ppl) first
    ce = make_run(root / "ce", "ce-only", final_loss=2.625, summary=_summary(30.25, (0.95, float("nan"))))
    kd = make_run(root / "kd", "kd", final_loss=1.875, summary=_summary(20.5, (0.8125, 0.734)))
    return [ce, kd]


@pytest.fixture(scope="module")
def md_report(runs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out") / "report.md"
    extra = [("Before / after (held-out)", ["model", "ppl"], [["init", "99.0"], ["KV distilled", 20.5]])]
    assert write_report(runs, out, title="test report", extra_tables=extra) == out
    return out


@pytest.fixture(scope="module")
def html_report(runs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out") / "page.html"
    assert write_report([str(r) for r in runs], out, fmt="html") == out
    return out


def _table_rows(text: str) -> dict[str, list[str]]:
    """First markdown table starting with `| run |`: run name -> cells."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| run | steps"))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells
    return rows


def test_comparison_table_numbers_and_order(md_report):
    text = md_report.read_text()
    marker, text = text.split("\n", 1)
    assert marker.startswith("<!-- written by kvdistill report") and text.startswith("# test report\n")
    header = text.splitlines()[
        [i for i, x in enumerate(text.splitlines()) if x.startswith("| run | steps")][0]
    ]
    assert header == (
        "| run | steps | tokens | elapsed (s) | final train CE | eval CE | eval ppl "
        "| eval KV error smollm2 | eval KV error gemma3 |"
    )
    rows = _table_rows(text)
    assert list(rows) == ["kd", "ce-only"]  # best first by eval ppl
    assert rows["kd"] == [
        "kd",
        "20",
        "5120",
        "12.3",
        "1.125",
        f"{math.log(20.5):.4g}",
        "20.5",
        "0.8125",
        "0.734",
    ]
    assert rows["ce-only"] == [
        "ce-only",
        "20",
        "5120",
        "12.3",
        "1.575",
        f"{math.log(30.25):.4g}",
        "30.25",
        "0.95",
        "nan",
    ]
    assert "**KV error**" in text and "**KV probe 1-R²**" in text and "**KV loss**" in text  # the definitions
    assert text.index("| kd |") < text.index("| ce-only |")


def test_extra_tables_at_top_and_mean_weights(md_report):
    text = md_report.read_text()
    assert "**Before / after (held-out)**" in text
    assert "| KV distilled | 20.5 |" in text
    assert text.index("Before / after") < text.index("## Runs")
    assert "| run | mean weight smollm2 | mean weight gemma3 |" in text
    # weight/smollm2 = 0.5 + 0.01 * step over steps 1..20: mean 0.605; gemma3 mirrors it: 0.395
    assert "| kd | 0.605 | 0.395 |" in text


def test_every_referenced_png_exists(md_report):
    text = md_report.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links and all(link.startswith("report_files/") for link in links)
    for link in links:
        assert (md_report.parent / link).read_bytes().startswith(PNG), link
    files = sorted(
        p.name for p in (md_report.parent / "report_files").iterdir() if p.name != ".kvdistill-report"
    )
    assert files == sorted(Path(link).name for link in links)  # nothing stray (but the folder's marker)
    # per run: loss terms, routing weights; plus the overlay; per teacher: layer map, alignment, kv error by
    # layer
    assert len([f for f in files if f.startswith("layermap_")]) == len(TEACHERS)
    assert len([f for f in files if f.startswith("align_")]) == len(TEACHERS)
    assert len([f for f in files if f.startswith("kv_error_layers_")]) == len(TEACHERS)
    assert len([f for f in files if f.startswith("weights_")]) == 2
    assert len([f for f in files if f.startswith("loss_")]) == 3  # each run's terms; the CE of all runs
    assert (
        "loss_ce_all_runs.png" in files and "loss_all_runs.png" not in files
    )  # no distilled vs CE-only total
    assert "heldout_ce.png" in files  # held-out CE against the step, every run
    assert len([f for f in files if f.startswith("heldout_kv_error_")]) == len(TEACHERS)
    assert "projector linear_per_head, 12288 params" in text
    assert not list(md_report.parent.glob(".*tmp"))


def test_html_page(html_report):
    text = html_report.read_text()
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert "<td>kd</td><td>20</td><td>5120</td><td>12.3</td><td>1.125</td>" in text
    assert text.index("<td>kd</td>") < text.index("<td>ce-only</td>")
    srcs = re.findall(r'<img src="([^"]+)"', text)
    assert len(srcs) == 3 + 2 + 3 * len(TEACHERS) + 1 + len(TEACHERS)
    for src in srcs:
        assert src.startswith("page_files/")
        assert (html_report.parent / src).read_bytes().startswith(PNG)
    assert "http" not in text  # no external assets


def test_missing_optional_files(tmp_path):
    bare = make_run(tmp_path / "bare-run", "unused", final_loss=1.0, summary=None, optional=False)
    summed = make_run(
        tmp_path / "summed",
        "unused",
        final_loss=1.0,
        summary=_summary(30.25, (0.9, 0.8), False),
        optional=False,
    )
    out = write_report([bare, summed], tmp_path / "r.md")
    text = out.read_text()
    rows = _table_rows(text)
    assert list(rows) == ["summed", "bare-run"]  # a run without summary has the eval line's ppl (33.1)
    assert rows["bare-run"][:7] == ["bare-run", "20", "5120", "12", "0.6", "3.5", "33.1"]
    # a run with only train lines: no eval figures, dashes in the table, placed after runs with a ppl
    only_train = tmp_path / "only-train"
    only_train.mkdir()
    (only_train / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n{truncated\n")
    text = write_report([only_train, bare], tmp_path / "r2.md").read_text()
    assert list(_table_rows(text)) == ["bare-run", "only-train"]
    assert _table_rows(text)["only-train"][5:7] == ["—", "—"]
    assert "layermap_" not in text and "align_" not in text


def test_rewrite_replaces_old_figures(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for run in (a, b):
        run.mkdir()
        (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    out = tmp_path / "report.md"
    write_report([a, b], out)
    (out.parent / "report_files" / "stale.png").write_bytes(PNG)
    write_report([a], out)
    assert not (out.parent / "report_files" / "stale.png").exists()
    assert "| b |" not in out.read_text()
    assert not list(tmp_path.glob(".*tmp"))


def test_missing_dir_and_metrics_errors(tmp_path, runs):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(KvdistillError) as err:
        write_report([runs[0], tmp_path / "nope", empty], tmp_path / "r.md")
    assert "nope" in err.value.problem and "no such directory" in err.value.problem
    assert "empty" in err.value.problem and "metrics.jsonl" in err.value.problem
    assert err.value.fix
    assert not (tmp_path / "r.md").exists() and not (tmp_path / "r_files").exists()
    with pytest.raises(KvdistillError, match="format"):
        write_report(runs, tmp_path / "r.pdf", fmt="pdf")
    with pytest.raises(KvdistillError, match="no run directories"):
        write_report([], tmp_path / "r.md")


@pytest.mark.parametrize(
    "value,text",
    [
        (None, "—"),
        (20, "20"),
        (3.0, "3"),
        (1.875, "1.875"),
        (0.123456, "0.1235"),
        (12345.6, "12346"),
        (float("nan"), "nan"),
        (float("inf"), "inf"),
        (float("-inf"), "-inf"),
        ("ratio", "ratio"),
    ],
)
def test_fmt_value(value, text):
    assert fmt_value(value) == text


def _report_cli(capsys, *args) -> tuple[int, str]:
    """(exit code, stderr on one line) of `kvdistill report ARGS` in this process."""
    import sys

    from kvdistill.cli import main

    argv, sys.argv = sys.argv, ["kvdistill", "report", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    finally:
        sys.argv = argv
    return code, "".join(capsys.readouterr().err.split())  # whitespace dropped: rich wraps long paths


@pytest.mark.parametrize("case", ["figure folder", "page", "figure folder is a file"])
def test_the_report_never_replaces_what_it_did_not_write(tmp_path, runs, capsys, tree, case):
    """`report --out notes/thesis.md` deleted an existing notes/thesis_files/ with everything in it."""
    notes = tmp_path / "notes"
    notes.mkdir()
    if case == "figure folder":
        (notes / "thesis_files").mkdir()
        (notes / "thesis_files" / "figure1.png").write_bytes(PNG)
        (notes / "thesis_files" / "draft.tex").write_text("\\section{mine}\n")
        expected = (
            f"the report's figure folder {notes / 'thesis_files'} already exists and was not written by"
        )
    elif case == "page":
        (notes / "thesis.md").write_text("# my thesis\n")
        expected = f"report --out {notes / 'thesis.md'} exists and was not written by kvdistill report"
    else:
        (notes / "thesis_files").write_text("a file of mine\n")
        expected = f"the report's figure folder {notes / 'thesis_files'} already exists"
    before = tree.snap(tmp_path)
    code, err = _report_cli(capsys, *runs, "--out", notes / "thesis.md")
    assert code == 2, err
    assert "".join(expected.split()) in err and "fix:give--outanewfilename" in err
    assert tree.snap(tmp_path) == before


def test_the_report_replaces_its_own_page_and_figures(tmp_path, runs, tree):
    out = tmp_path / "notes" / "report.md"
    write_report(runs, out)
    assert out.read_text().startswith("<!-- written by kvdistill report")
    assert (tmp_path / "notes" / "report_files" / ".kvdistill-report").is_file()
    before = tree.snap(tmp_path)
    write_report(runs[:1], out)  # its own page and folder: replaced, nothing else touched
    diff = tree.changes(before, tree.snap(tmp_path))
    assert all(p.startswith("notes/report") for p in diff["added"] + diff["removed"] + diff["changed"]), diff
    assert "notes/report.md" in diff["changed"]


def test_a_long_teacher_name_gets_a_short_figure_name(tmp_path):
    from kvdistill.eval.page import _slug

    long = "teacher_" + "x" * 300
    assert len(_slug(long)) == 80 and _slug(long) != _slug(long + "y") and _slug("..") == "x"


def test_eval_json_is_shown(tmp_path):
    a = make_run(tmp_path / "a", "a", final_loss=1.0, summary=None)
    b = make_run(tmp_path / "b", "b", final_loss=1.5, summary=None)
    (a / "eval.json").write_text(
        json.dumps(
            {
                "written_by": "kvdistill eval",
                "step": 20,
                "samples": 8,
                "data": {"source": "gsm_symbolic"},
                "perplexity": {"ce": 2.5, "ppl": 12.18, "tokens": 300},
                "exact_match": {"exact_match": 0.25, "n": 8},
                "probe_kv_error": {"smollm2": {"mean": 0.75, "layers": [0.7, 0.8]}},
            }
        )
    )
    (b / "eval.json").write_text(
        json.dumps({"ppl": 3.0, "per_item": [1, 0]})
    )  # an experiment's record: not ours
    text = write_report([a, b], tmp_path / "r.md").read_text()
    assert "## Evaluation (kvdistill eval)" in text
    assert (
        "| run | step | samples | held-out CE | held-out ppl | exact match | KV probe 1-R² smollm2 |" in text
    )
    assert "| a | 20 | 8 | 2.5 | 12.18 | 0.25 | 0.75 |" in text
    assert "| b | 20 | 8 |" not in text
