"""The (student layer i, teacher layer j, weight w) pairs of one teacher's layer map, as the batched losses
use them.

Notation: L_s student layers, L_t teacher layers, P pairs (an interpolated student layer gives one pair per
teacher layer it reads), L mapped student layers.
"""

from __future__ import annotations

import torch

from kvdistill.align.layers import layer_map


class LayerPairs:
    """One teacher's layer map flattened in map order.

    matrix (L_s, L_t): the layer map (rows sum to 1 or 0). i, j, w: per pair. layers: the mapped student
    layers (each once, ascending); at: per pair, the position of its i in `layers`. rows: {i: [(j, w), ...]}.
    coef (P, 2): w·keys_weight, w·values_weight; weight (P,): w; both on `device`.
    """

    def __init__(self, matrix: torch.Tensor, *, keys_weight: float, values_weight: float, device):
        self.matrix = matrix
        self.rows = {
            i: [(j, float(matrix[i, j])) for j in matrix[i].nonzero().flatten().tolist()]
            for i in range(matrix.shape[0])
            if matrix[i].sum() > 0
        }
        flat = [(i, j, w) for i, row in self.rows.items() for j, w in row]
        self.i, self.j, self.w = ([p[k] for p in flat] for k in range(3))
        self.layers = list(self.rows)
        self.at = [self.layers.index(x) for x in self.i]
        self.coef = torch.tensor(
            [[x * keys_weight, x * values_weight] for x in self.w], dtype=torch.float32, device=device
        )  # (P, 2)
        self.weight = torch.tensor(self.w, dtype=torch.float32, device=device)  # (P,)

    @classmethod
    def of(cls, student_layers: int, teacher_layers: int, layer_map_cfg, kv_cfg, device) -> LayerPairs:
        matrix = layer_map(
            student_layers,
            teacher_layers,
            strategy=layer_map_cfg.strategy,
            explicit=layer_map_cfg.explicit,
            interpolate=layer_map_cfg.interpolate,
        )  # (L_s, L_t)
        return cls(matrix, keys_weight=kv_cfg.keys, values_weight=kv_cfg.values, device=device)

    @property
    def teacher_layers(self) -> list[int]:
        return sorted(set(self.j))

    def layer_positions(self, pos: list[int], device) -> torch.Tensor | None:
        """Position in `layers` of the student layer of each pair in `pos`, None when that is 0..L-1
        (identity)."""
        at = [self.at[p] for p in pos]
        return None if at == list(range(len(self.layers))) else torch.tensor(at, device=device)
