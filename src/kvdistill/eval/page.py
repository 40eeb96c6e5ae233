"""The report page model and its renderers: value formatting, blocks, markdown and self-contained HTML.

A `Page` is a list of blocks (headings, paragraphs, tables, figures); figures are saved as PNGs in
`files_dir` as they are added, and the renderers link to them through `link_dir`.
"""

from __future__ import annotations

import hashlib
import html
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from matplotlib.figure import Figure

MISSING = "—"  # a table cell with no value


def fmt_value(v: Any) -> str:
    """A number for a table: ints as is, floats to 4 significant digits, nan/inf spelled out."""
    if v is None:
        return MISSING
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
    """A file name stem from `text`: safe characters only, at most 80 (a long name cut, with a hash of it)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_.") or "x"
    if len(slug) > 80:
        slug = slug[:63] + "_" + hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()[:16]
    return slug


@dataclass
class Page:
    """Blocks in order: ("h", level, text), ("p", text), ("table", title, header, rows), ("img", file,
    caption)."""

    title: str
    files_dir: Path
    blocks: list[tuple] = field(default_factory=list)
    images: list[str] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("h", level, text))

    def para(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, header: list[str], rows: list[list], title: str | None = None) -> None:
        self.blocks.append(
            ("table", title, [str(h) for h in header], [[fmt_value(c) for c in r] for r in rows])
        )

    def figure(self, fig: Figure, stem: str, caption: str) -> None:
        name = _slug(stem) + ".png"
        if name in self.images:  # keep file names unique
            name = f"{_slug(stem)}_{len(self.images)}.png"
        fig.savefig(self.files_dir / name, dpi=100, bbox_inches="tight")
        self.images.append(name)
        self.blocks.append(("img", name, caption))


def _md_cell(text: str) -> str:
    return text.replace("|", r"\|").replace("\n", " ")


def render_md(page: Page, link_dir: str) -> str:
    """The page as markdown; images link to `link_dir/<file>`."""
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


def render_html(page: Page, link_dir: str) -> str:
    """The page as one HTML document with inline CSS; images link to `link_dir/<file>`."""
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8">',
        f"<title>{e(page.title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}"
        "img{max-width:100%}figcaption{font-style:italic;color:#444}</style>",
        "</head><body>",
        f"<h1>{e(page.title)}</h1>",
    ]
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
            out.append(
                f'<figure><img src="{e(link_dir)}/{e(name)}" alt="{e(caption)}">'
                f"<figcaption>{e(caption)}</figcaption></figure>"
            )
    out.append("</body></html>")
    return "\n".join(out) + "\n"
