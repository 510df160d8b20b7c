"""The finiteness checks every received model and merge goes through, on the tensors that
take their numpy view (strided, requiring grad) and the ones that do not (other dtypes)."""

from __future__ import annotations

import math

import pytest
import torch

from p2pfl.numerics import all_finite, finite_rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_all_finite_finds_one_bad_element_in_a_strided_view(dtype: torch.dtype) -> None:
    matrix = torch.zeros(5, 8, dtype=dtype)
    column = matrix[:, 3]  # stride 8: not contiguous
    assert not column.is_contiguous() and all_finite(column)
    for bad in (math.nan, math.inf, -math.inf):
        matrix[4, 3] = bad
        assert not all_finite(column)
        assert all_finite(matrix[:, 2])
        matrix[4, 3] = 0.0


def test_all_finite_reads_a_tensor_that_requires_grad() -> None:
    leaf = torch.ones(6, requires_grad=True)
    assert all_finite(leaf)
    assert not all_finite(leaf * torch.tensor([1.0, 1.0, math.inf, 1.0, 1.0, 1.0]))


def test_finite_rows_of_a_transposed_matrix() -> None:
    matrix = torch.zeros(4, 3)
    matrix[2, 1] = math.nan
    assert finite_rows(matrix.t()).tolist() == [True, False, True]
    assert finite_rows(matrix).tolist() == [True, True, False, True]
