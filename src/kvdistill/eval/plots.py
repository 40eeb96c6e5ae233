"""Matplotlib helpers for the report: line axes, heatmaps, and turning stored JSON into plottable arrays.

Figures are built with `matplotlib.figure.Figure` directly (no pyplot state), so the report runs
headless and leaves no open figures behind.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def line_axes(fig: Figure, *, title: str, xlabel: str, ylabel: str) -> Axes:
    """One axes on `fig` with labels, integer x ticks and a light grid."""
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    return ax


def heatmap(
    fig: Figure,
    matrix: np.ndarray,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    xticks: list[str] | None = None,
    yticks: list[str] | None = None,
) -> None:
    """`matrix` (rows, cols) as an image with a colour bar; nan cells masked; tick labels if given."""
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


def as_matrix(rows: Any) -> np.ndarray | None:
    """A 2-D float array from nested lists, or None if the rows are ragged, empty or not numbers."""
    try:
        m = np.asarray(rows, dtype=float)
    except (TypeError, ValueError):
        return None
    return m if m.ndim == 2 and m.size else None


def tick(token: str) -> str:
    """A token as a tick label: visible spaces/newlines, no mathtext, short."""
    t = token.replace("Ġ", "␣").replace("▁", "␣").replace("Ċ", "⏎").replace("\n", "⏎").replace("$", r"\$")
    return t if len(t) <= 12 else t[:11] + "…"
