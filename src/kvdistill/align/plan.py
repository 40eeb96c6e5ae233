"""The alignment plan between a student and one teacher: what `kvdistill inspect` shows before any training.

Built from configs alone (no weights): layer map, head/dim projector and its parameter count, KV bytes per
token of each side. The same dictionary lands in a run's plan.json.
"""

from __future__ import annotations

from typing import Any, Protocol

from kvdistill.align.heads import projector_param_count, resolve_kind
from kvdistill.align.layers import describe_layer_map, layer_map


class KVGeometry(Protocol):
    """What a plan reads of a model's geometry (`kvdistill.models.geometry.KVGeometry` has it; align sits
    below models and does not import it)."""

    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int

    def kv_bytes_per_token(self, bytes_per_element: int) -> int: ...


def alignment_plan(
    student: KVGeometry,
    teacher: KVGeometry,
    *,
    strategy: str = "ratio",
    explicit: list | None = None,
    interpolate: bool = True,
    projector: str = "auto",
    bytes_per_element: int = 2,
) -> dict[str, Any]:
    """Plan for distilling `teacher` into `student`: layer map (L_s, L_t), projector kind and size, KV
    bytes."""
    matrix = layer_map(
        student.num_layers, teacher.num_layers, strategy=strategy, explicit=explicit, interpolate=interpolate
    )  # (L_s, L_t)
    kind = resolve_kind(student, teacher, projector)  # auto: identity for equal (H_kv, D), else per_head
    # keys and values each get a projector per mapped student layer
    mapped_layers = int((matrix.sum(dim=1) > 0).sum())
    per_layer = projector_param_count(student, teacher, kind)
    return {
        "student": student.name,
        "teacher": teacher.name,
        "layer_map": {
            "strategy": strategy,
            "matrix": [[round(float(x), 6) for x in row] for row in matrix],
            "pairs": describe_layer_map(matrix),
            "mapped_student_layers": mapped_layers,
        },
        "projector": {
            "kind": kind,
            "from": {"num_kv_heads": student.num_kv_heads, "head_dim": student.head_dim},
            "to": {"num_kv_heads": teacher.num_kv_heads, "head_dim": teacher.head_dim},
            "params_per_layer_kv": 2 * per_layer,
            "params_total": 2 * per_layer * mapped_layers,
        },
        "kv_bytes_per_token": {
            "student": student.kv_bytes_per_token(bytes_per_element),
            "teacher": teacher.kv_bytes_per_token(bytes_per_element),
        },
    }
