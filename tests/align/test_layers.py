"""Layer maps: golden matrices per strategy, row sums, explicit-map errors, describe and mix helpers."""

from __future__ import annotations

import json

import pytest
import torch

from kvdistill.align.layers import apply_layer_map, describe_layer_map, layer_map, mix_layers
from kvdistill.errors import KvdistillError


def rows_of(matrix: torch.Tensor) -> list[dict[int, float]]:
    """{teacher: weight} per student row, non-zero weights only, rounded for golden comparisons."""
    return [{j: round(w, 6) for j, w in enumerate(row) if w != 0} for row in matrix.tolist()]


def block(layers, weight: float) -> dict[int, float]:
    return {j: round(weight, 6) for j in layers}


# ---------------------------------------------------------------------------------------------- golden maps
GOLDEN = {
    # (L_s, L_t, strategy, interpolate): rows
    (4, 30, "ratio", True): [{0: 1.0}, {9: 0.333333, 10: 0.666667}, {19: 0.666667, 20: 0.333333}, {29: 1.0}],
    (4, 30, "ratio", False): [{0: 1.0}, {10: 1.0}, {19: 1.0}, {29: 1.0}],
    (4, 18, "ratio", True): [{0: 1.0}, {5: 0.333333, 6: 0.666667}, {11: 0.666667, 12: 0.333333}, {17: 1.0}],
    (4, 18, "ratio", False): [{0: 1.0}, {6: 1.0}, {11: 1.0}, {17: 1.0}],
    (6, 2, "ratio", True): [
        {0: 1.0},
        {0: 0.8, 1: 0.2},
        {0: 0.6, 1: 0.4},
        {0: 0.4, 1: 0.6},
        {0: 0.2, 1: 0.8},
        {1: 1.0},
    ],
    (6, 2, "ratio", False): [{0: 1.0}] * 3 + [{1: 1.0}] * 3,
    (1, 5, "ratio", True): [{4: 1.0}],
    (4, 30, "uniform", True): [
        {**block(range(7), 1 / 7.5), 7: round(0.5 / 7.5, 6)},
        {7: round(0.5 / 7.5, 6), **block(range(8, 15), 1 / 7.5)},
        {**block(range(15, 22), 1 / 7.5), 22: round(0.5 / 7.5, 6)},
        {22: round(0.5 / 7.5, 6), **block(range(23, 30), 1 / 7.5)},
    ],
    (4, 30, "uniform", False): [
        block(range(0, 7), 1 / 7),
        block(range(7, 15), 1 / 8),
        block(range(15, 22), 1 / 7),
        block(range(22, 30), 1 / 8),
    ],
    (4, 12, "uniform", True): [block(range(3 * i, 3 * i + 3), 1 / 3) for i in range(4)],
    (4, 18, "uniform", False): [
        block(range(0, 4), 1 / 4),
        block(range(4, 9), 1 / 5),
        block(range(9, 13), 1 / 4),
        block(range(13, 18), 1 / 5),
    ],
    (6, 2, "uniform", True): [{0: 1.0}] * 3 + [{1: 1.0}] * 3,
    (6, 2, "uniform", False): [{0: 1.0}] * 3 + [{1: 1.0}] * 3,
    (4, 12, "skip", True): [{2: 1.0}, {5: 1.0}, {8: 1.0}, {11: 1.0}],
    (4, 30, "skip", True): [{7: 1.0}, {14: 1.0}, {22: 1.0}, {29: 1.0}],
    (4, 18, "skip", True): [{4: 1.0}, {8: 1.0}, {13: 1.0}, {17: 1.0}],
    (6, 2, "skip", True): [{0: 1.0}] * 3 + [{1: 1.0}] * 3,
}


@pytest.mark.parametrize("key", list(GOLDEN), ids=lambda k: "-".join(map(str, k)))
def test_golden_layer_maps(key):
    L_s, L_t, strategy, interpolate = key
    matrix = layer_map(L_s, L_t, strategy=strategy, interpolate=interpolate)
    assert matrix.shape == (L_s, L_t) and matrix.dtype == torch.float32
    assert rows_of(matrix) == GOLDEN[key]


@pytest.mark.parametrize("strategy", ["ratio", "uniform", "skip"])
@pytest.mark.parametrize("interpolate", [True, False])
def test_equal_depth_is_identity(strategy, interpolate):
    assert torch.equal(layer_map(3, 3, strategy=strategy, interpolate=interpolate), torch.eye(3))


@pytest.mark.parametrize("strategy", ["ratio", "uniform", "skip"])
@pytest.mark.parametrize("interpolate", [True, False])
def test_rows_sum_to_one_for_many_shapes(strategy, interpolate):
    for L_s in range(1, 13):
        for L_t in range(1, 37, 5):
            matrix = layer_map(L_s, L_t, strategy=strategy, interpolate=interpolate)
            torch.testing.assert_close(matrix.sum(dim=1), torch.ones(L_s), atol=1e-6, rtol=0)
            assert (matrix >= 0).all()


def test_uniform_blocks_are_a_partition_when_depths_divide():
    """Every teacher layer is used by exactly one student block, with the block's 1/k weight."""
    matrix = layer_map(3, 12, strategy="uniform")
    assert torch.equal((matrix > 0).sum(dim=0), torch.ones(12, dtype=torch.long))
    torch.testing.assert_close(matrix.sum(dim=0), torch.full((12,), 0.25))


def test_ratio_interpolation_reproduces_fractional_position():
    """Σ_j W[i, j] · j == i · (L_t - 1) / (L_s - 1): the interpolated depth is exactly the ratio position."""
    L_s, L_t = 7, 30
    matrix = layer_map(L_s, L_t, strategy="ratio")
    depth = matrix.double() @ torch.arange(L_t, dtype=torch.float64)
    torch.testing.assert_close(depth, torch.arange(L_s, dtype=torch.float64) * (L_t - 1) / (L_s - 1))


# ---------------------------------------------------------------------------------------------- explicit
def test_explicit_ints_lists_and_unsupervised():
    matrix = layer_map(4, 8, strategy="explicit", explicit=[0, [3, 4], -1, [7, 7, 5]])
    assert rows_of(matrix) == [{0: 1.0}, {3: 0.5, 4: 0.5}, {}, {5: 0.333333, 7: 0.666667}]
    assert matrix.sum(dim=1).tolist() == pytest.approx([1, 1, 0, 1])


def test_explicit_wrong_length_quotes_counts():
    with pytest.raises(KvdistillError, match=r"has 2 entries but the student has 3 layers") as info:
        layer_map(3, 8, strategy="explicit", explicit=[0, 1])
    assert "use -1" in info.value.fix


def test_explicit_out_of_range_lists_every_bad_entry():
    with pytest.raises(KvdistillError) as info:
        layer_map(3, 8, strategy="explicit", explicit=[8, [2, -3], "x"])
    message = str(info.value)
    assert "entry 0 = 8 names teacher layer(s) [8] outside 0..7" in message
    assert "entry 1 = [2, -3] names teacher layer(s) [-3]" in message
    assert "entry 2 = 'x' is not an int" in message


def test_explicit_missing_or_misplaced_list():
    with pytest.raises(KvdistillError, match="needs a list"):
        layer_map(3, 8, strategy="explicit")
    with pytest.raises(KvdistillError, match="was given an explicit list"):
        layer_map(3, 8, strategy="ratio", explicit=[0, 1, 2])


def test_unknown_strategy_and_bad_sizes():
    with pytest.raises(KvdistillError, match="strategy 'nearest' is unknown"):
        layer_map(3, 8, strategy="nearest")
    with pytest.raises(KvdistillError, match="L_s=0"):
        layer_map(0, 8)


# ---------------------------------------------------------------------------------------------- helpers
def test_describe_layer_map_is_json_friendly():
    matrix = layer_map(3, 8, strategy="explicit", explicit=[[0, 1], -1, 7])
    pairs = describe_layer_map(matrix)
    assert pairs == [
        {"student": 0, "teacher": [[0, 0.5], [1, 0.5]]},
        {"student": 1, "teacher": []},
        {"student": 2, "teacher": [[7, 1.0]]},
    ]
    assert json.loads(json.dumps(pairs)) == pairs


def test_mix_layers_matches_matrix_product_and_skips_zero_weights():
    torch.manual_seed(0)
    L_s, L_t = 4, 9
    teacher = torch.randn(L_t, 2, 3, 5, 4)  # (L_t, B, H, T, D)
    matrix = layer_map(L_s, L_t, strategy="uniform")
    reference = torch.einsum("ij,jbhtd->ibhtd", matrix, teacher)  # (L_s, B, H, T, D)
    for i in range(L_s):
        # layers the row does not use may be absent (a cache that kept only some layers)
        layers = [teacher[j] if matrix[i, j] > 0 else None for j in range(L_t)]
        torch.testing.assert_close(mix_layers(layers, matrix[i]), reference[i])
        torch.testing.assert_close(apply_layer_map(layers, matrix[i]), reference[i])


def test_mix_layers_unsupervised_row_and_errors():
    layers = [torch.ones(1, 1, 2, 2)] * 3
    assert mix_layers(layers, torch.zeros(3)) is None
    with pytest.raises(KvdistillError, match="3 layers but weights of shape"):
        mix_layers(layers, torch.ones(4))
    with pytest.raises(KvdistillError, match="teacher layer 1 has weight 0.5 but was not provided"):
        mix_layers([layers[0], None, layers[2]], torch.tensor([0.5, 0.5, 0.0]))
