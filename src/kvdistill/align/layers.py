"""Layer maps: which teacher layers supervise each student layer.

Notation: L_s student layers, L_t teacher layers, B batch, H KV heads, T time, D head dim.

A layer map is a dense float32 matrix W of shape (L_s, L_t). Row i holds the weights of the teacher layers
whose K/V supervise student layer i: the row sums to 1, or to 0 when student layer i is not supervised at all.
The target of student layer i is the weighted mix Σ_j W[i, j] · KV_t[j] (`mix_layers`), or equivalently the
weighted sum of per-layer losses. Weights are computed with exact fractions, so golden values in tests are
exact.

Strategies (worked examples in `layer_map`):
    ratio     student layer i sits at relative depth i / (L_s - 1); it takes the teacher position at the same
              relative depth, linearly interpolated between its two neighbouring layers (or the nearest one).
    uniform   the teacher stack is cut into L_s equal blocks; student layer i takes the mean of block i.
    skip      the teacher stack is cut into L_s equal blocks; student layer i takes the last layer of block i.
    explicit  a user-given list: one entry per student layer, an int teacher index, -1 for "unsupervised",
              or a list of teacher indices to average.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from kvdistill.errors import KvdistillError

STRATEGIES = ("ratio", "uniform", "skip", "explicit")


def layer_map(
    L_s: int, L_t: int, strategy: str = "ratio", explicit: list | None = None, interpolate: bool = True
) -> torch.Tensor:
    """Layer map (L_s, L_t) float32 from student layer i (rows) to teacher layer j (columns).

    Rows sum to 1, or to 0 for a student layer that is not supervised (only `explicit` can leave one out).

    ratio: student layer i ↦ teacher position p = i · (L_t - 1) / (L_s - 1) (L_s == 1: the last teacher
    layer),
        so first maps to first and last to last. interpolate=True splits the weight linearly between floor(p)
        and ceil(p); interpolate=False puts it all on the nearest layer (halves round up).
        Example L_s=4, L_t=30: p = 0, 9.667, 19.333, 29 →
            row 0: {0: 1}   row 1: {9: 1/3, 10: 2/3}   row 2: {19: 2/3, 20: 1/3}   row 3: {29: 1}
        (nearest: 0, 10, 19, 29). L_s=6, L_t=2: p = 0, .2, .4, .6, .8, 1 → row 1: {0: .8, 1: .2}, ...
    uniform: teacher layer j occupies the unit interval [j, j + 1); student layer i owns the block
        [i · L_t / L_s, (i + 1) · L_t / L_s) and takes the mean of the teacher layers in it.
        interpolate=True weighs each teacher layer by its overlap with the block (a layer cut by a block edge
        counts fractionally); interpolate=False gives each teacher layer wholly to the block holding its
        centre j + 1/2 (a student block that holds no centre, when L_s > L_t, takes the layer holding its own
        centre). Example L_s=4, L_t=30 (blocks of 7.5 layers): row 0 = layers 0..6 with weight 1/7.5 and layer
        7 with 0.5/7.5; row 1 = layer 7 (0.5/7.5) and 8..14 (1/7.5). Without interpolation: 0..6, 7..14,
        15..21, 22..29, each a plain mean. L_s=6, L_t=2: rows 0-2 → {0: 1}, rows 3-5 → {1: 1}.
    skip: student layer i ↦ the last teacher layer of block i, i.e. ceil((i + 1) · L_t / L_s) - 1. When L_s
        divides L_t this is (i + 1) · L_t // L_s - 1, every k-th teacher layer with k = L_t / L_s.
        Example L_s=4, L_t=12: 2, 5, 8, 11. L_s=4, L_t=30: 7, 14, 22, 29. L_s=6, L_t=2: 0, 0, 0, 1, 1, 1.
    explicit: a list of L_s entries. An int j maps student layer i to teacher layer j; -1 (or an empty list)
        leaves student layer i unsupervised (a zero row); a list of ints is averaged.
        Example L_s=3, L_t=8, explicit=[0, [3, 4], -1] → row 0 {0: 1}, row 1 {3: .5, 4: .5}, row 2 zeros.
    """
    if not isinstance(L_s, int) or not isinstance(L_t, int) or L_s < 1 or L_t < 1:
        raise KvdistillError(
            f"layer_map needs positive layer counts, got L_s={L_s!r}, L_t={L_t!r}",
            "pass the num_layers of the student and the teacher geometries",
        )
    if strategy not in STRATEGIES:
        raise KvdistillError(
            f"layer map strategy '{strategy}' is unknown", f"use one of {', '.join(STRATEGIES)}"
        )
    if strategy == "explicit":
        rows = _explicit_rows(L_s, L_t, explicit)
    elif explicit is not None:
        raise KvdistillError(
            f"layer map strategy '{strategy}' was given an explicit list {explicit!r}",
            "set strategy 'explicit' to use the list, or drop layer_map.explicit",
        )
    elif strategy == "ratio":
        rows = [_ratio_row(i, L_s, L_t, interpolate) for i in range(L_s)]
    elif strategy == "uniform":
        rows = [_uniform_row(i, L_s, L_t, interpolate) for i in range(L_s)]
    else:
        rows = [{math.ceil(Fraction((i + 1) * L_t, L_s)) - 1: Fraction(1)} for i in range(L_s)]
    matrix = torch.zeros(L_s, L_t, dtype=torch.float64)
    for i, row in enumerate(rows):
        for j, w in row.items():
            matrix[i, j] += float(w)
    return matrix.float()


def _ratio_row(i: int, L_s: int, L_t: int, interpolate: bool) -> dict[int, Fraction]:
    p = Fraction(L_t - 1) if L_s == 1 else Fraction(i * (L_t - 1), L_s - 1)  # teacher position
    lo = math.floor(p)
    frac = p - lo
    if frac == 0:
        return {lo: Fraction(1)}
    if not interpolate:
        return {lo + 1 if frac >= Fraction(1, 2) else lo: Fraction(1)}
    return {lo: 1 - frac, lo + 1: frac}


def _uniform_row(i: int, L_s: int, L_t: int, interpolate: bool) -> dict[int, Fraction]:
    a, b = Fraction(i * L_t, L_s), Fraction((i + 1) * L_t, L_s)  # block of student layer i, in teacher layers
    if interpolate:
        overlap = {j: min(b, j + 1) - max(a, j) for j in range(math.floor(a), math.ceil(b))}
    else:
        # teacher layers whose centre j + 1/2 lies in [a, b): j in [ceil(a - 1/2), ceil(b - 1/2))
        members = range(math.ceil(a - Fraction(1, 2)), math.ceil(b - Fraction(1, 2)))
        if len(members) == 0:  # L_s > L_t: a block narrower than one layer holds no centre
            members = range(math.floor((a + b) / 2), math.floor((a + b) / 2) + 1)
        overlap = {j: Fraction(1) for j in members}
    total = sum(overlap.values())
    return {j: w / total for j, w in overlap.items() if w > 0}


def _explicit_rows(L_s: int, L_t: int, explicit: list | None) -> list[dict[int, Fraction]]:
    if explicit is None:
        raise KvdistillError(
            "layer map strategy 'explicit' needs a list of teacher layers",
            f"set layer_map.explicit to {L_s} entries (a teacher layer, a list of them, or -1)",
        )
    if not isinstance(explicit, (list, tuple)) or len(explicit) != L_s:
        got = f"{len(explicit)} entries" if isinstance(explicit, (list, tuple)) else repr(explicit)
        raise KvdistillError(
            f"explicit layer map has {got} but the student has {L_s} layers",
            f"give one entry per student layer ({L_s}); use -1 for a layer left unsupervised",
        )
    rows, bad = [], []
    for i, entry in enumerate(explicit):
        layers = [entry] if isinstance(entry, int) and not isinstance(entry, bool) else entry
        if not isinstance(layers, (list, tuple)) or not all(
            isinstance(j, int) and not isinstance(j, bool) for j in layers
        ):
            bad.append(f"entry {i} = {entry!r} is not an int or a list of ints")
            rows.append({})
            continue
        if list(layers) == [-1] or len(layers) == 0:
            rows.append({})
            continue
        out = [j for j in layers if not 0 <= j < L_t]
        if out:
            bad.append(f"entry {i} = {entry!r} names teacher layer(s) {out} outside 0..{L_t - 1}")
        row: dict[int, Fraction] = {}
        for j in layers:
            row[j] = row.get(j, Fraction(0)) + Fraction(1, len(layers))
        rows.append(row)
    if bad:
        raise KvdistillError(
            "explicit layer map is invalid: " + "; ".join(bad),
            f"teacher layers run 0..{L_t - 1}; use -1 alone to leave a student layer unsupervised",
        )
    return rows


def describe_layer_map(matrix: torch.Tensor, digits: int = 6) -> list[dict]:
    """JSON-friendly pairs of a layer map (L_s, L_t): [{"student": i, "teacher": [[j, w], ...]}, ...].

    Only non-zero weights are listed, rounded to `digits`; an unsupervised student layer has "teacher": [].
    Example: layer_map(2, 3) → [{"student": 0, "teacher": [[0, 1.0]]}, {"student": 1, "teacher": [[2, 1.0]]}].
    """
    if matrix.dim() != 2:
        raise KvdistillError(
            f"a layer map is (L_s, L_t); got a tensor of shape {tuple(matrix.shape)}",
            "build it with layer_map(L_s, L_t, ...)",
        )
    out = []
    for i, row in enumerate(matrix.tolist()):
        out.append({"student": i, "teacher": [[j, round(w, digits)] for j, w in enumerate(row) if w != 0]})
    return out


def mix_layers(layers: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor | None:
    """Σ_j weights[j] · layers[j] over the layers with a non-zero weight (the others are never touched).

    layers: L_t tensors of one shape, e.g. teacher K or V (B, H, T, D); entries with zero weight may be None
        (e.g. layers a cache did not keep). weights: (L_t,), one row of a layer map.
    Returns a tensor of that shape (float32 or wider), or None when every weight is zero (an unsupervised
    row).
    """
    if weights.dim() != 1 or weights.shape[0] != len(layers):
        raise KvdistillError(
            f"mix_layers got {len(layers)} layers but weights of shape {tuple(weights.shape)}",
            "pass one row of the layer map: weights (L_t,) for L_t teacher layers",
        )
    mixed = None
    for j in weights.nonzero().flatten().tolist():
        if layers[j] is None:
            raise KvdistillError(
                f"teacher layer {j} has weight {float(weights[j]):.4g} but was not provided",
                "keep that layer in the cache, or change the layer map",
            )
        term = float(weights[j]) * layers[j].float()  # (B, H, T, D)
        mixed = term if mixed is None else mixed + term
    return mixed


def apply_layer_map(teacher_layers: list[torch.Tensor], row: torch.Tensor) -> torch.Tensor | None:
    """The target of one student layer: teacher K or V (B, H_t, T, D_t) per layer, mixed by a layer-map
    row."""
    return mix_layers(teacher_layers, row)
