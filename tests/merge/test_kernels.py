"""Sorting-network order statistics: exact against torch.sort, blockwise, never mutating."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfl.merge import kernels
from p2pfl.merge.kernels import (
    MAX_NETWORK_ROWS,
    batcher_network,
    coordinate_median,
    middle_program,
    order_statistics,
    selection_network,
    sort_rows,
    sorted_program,
    trimmed_mean,
)

SPECIAL = torch.tensor(
    [0.0, -0.0, 1.0, -1.0, 0.5, 3.0e38, -3.0e38, 1e-45, -1e-45, math.inf, -math.inf]
)


@st.composite
def stacks(draw: st.DrawFn, max_rows: int = MAX_NETWORK_ROWS + 2) -> torch.Tensor:
    """An ``[n, P]`` float32 stack mixing ±0, huge and tiny values, infinities, many ties
    (small integers) and spread-out values; Hypothesis draws the shape, mix and seed."""
    n = draw(st.integers(1, max_rows))
    size = draw(st.integers(1, 8))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    kind = torch.randint(0, 3, (n, size), generator=generator)
    special = SPECIAL[torch.randint(0, len(SPECIAL), (n, size), generator=generator)]
    ties = torch.randint(-3, 4, (n, size), generator=generator).float()
    spread = torch.randn(n, size, generator=generator) * 1e6
    return torch.where(kind == 0, special, torch.where(kind == 1, ties, spread))


def method_for(stack: torch.Tensor) -> kernels.Method:
    return "network" if stack.shape[0] <= MAX_NETWORK_ROWS else "auto"


def reference_median(stack: torch.Tensor) -> torch.Tensor:
    ordered = torch.sort(stack, dim=0).values
    n = stack.shape[0]
    low, high = ordered[(n - 1) // 2], ordered[n // 2]
    return ((low.double() + high.double()) / 2).to(stack.dtype)


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal values (``-0.0 == 0.0``, NaN matching NaN), same shape and dtype."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    same = (actual == expected) | (torch.isnan(actual) & torch.isnan(expected))
    assert bool(same.all()), (actual, expected)


@settings(deadline=None)
@given(stack=stacks(), block=st.integers(1, 5), data=st.data())
def test_sort_median_and_order_statistics_equal_torch_sort(
    stack: torch.Tensor, block: int, data: st.DataObject
) -> None:
    n = stack.shape[0]
    ranks = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=3))
    method = method_for(stack)
    before = stack.clone()
    ordered = torch.sort(stack, dim=0).values
    assert_same(sort_rows(stack, method=method, block=block), ordered)
    assert_same(stack, before)  # inputs are only read
    assert_same(order_statistics(stack, ranks, method=method, block=block), ordered[ranks])
    assert_same(coordinate_median(stack, method=method, block=block), reference_median(stack))


@settings(deadline=None)
@given(stack=stacks(), block=st.integers(1, 5), data=st.data())
def test_trimmed_mean_matches_sorted_reference(
    stack: torch.Tensor, block: int, data: st.DataObject
) -> None:
    n = stack.shape[0]
    b = data.draw(st.integers(0, (n - 1) // 2))
    kept = torch.sort(stack, dim=0).values[b : n - b].double()
    expected = kept.sum(dim=0) / (n - 2 * b)
    result = trimmed_mean(stack, b, method=method_for(stack), block=block).double()
    # float64 sums in another order differ by rounding relative to the largest kept value
    finite = torch.isfinite(expected)
    assert_same(result[~finite], expected[~finite].float().double())
    scale = kept.abs().amax(dim=0)[finite]
    error = (result[finite] - expected[finite]).abs()
    assert bool((error <= 1e-6 * expected[finite].abs() + 1e-12 * scale + 1e-45).all())


@pytest.mark.parametrize("n", [3, 8, 16, 17, 32])
def test_auto_path_on_wide_inputs_with_ties(n: int) -> None:
    generator = torch.Generator().manual_seed(n)
    stack = torch.randn(n, 5000, generator=generator)
    stack[:, :1000] = torch.randint(-2, 3, (n, 1000), generator=generator).float()
    stack[0, :10] = -0.0
    rows = list(stack.unbind(0))  # a sequence of views works as well as a stack
    assert_same(sort_rows(rows), torch.sort(stack, dim=0).values)
    assert_same(coordinate_median(rows), reference_median(stack))
    ordered = torch.sort(stack, dim=0).values
    expected = (ordered[2 : n - 2].double().mean(dim=0)).float() if n > 4 else None
    if expected is not None:
        torch.testing.assert_close(trimmed_mean(rows, 2), expected, rtol=1e-6, atol=1e-7)


def test_float64_and_fallback_dtypes() -> None:
    stack = torch.randn(6, 3000, dtype=torch.float64)
    assert_same(sort_rows(stack), torch.sort(stack, dim=0).values)
    assert coordinate_median(stack).dtype == torch.float64
    half = stack.to(torch.bfloat16)  # numpy has no bfloat16: torch.sort path
    assert_same(sort_rows(half), torch.sort(half, dim=0).values)


def test_networks_sort_every_zero_one_input() -> None:
    # 0-1 principle: a comparator network sorts everything iff it sorts all 0-1 inputs
    for n in range(1, 13):
        patterns = torch.tensor(
            [[(bits >> i) & 1 for bits in range(2**n)] for i in range(n)], dtype=torch.float32
        )
        result = sort_rows(patterns, method="network")
        assert_same(result, torch.sort(patterns, dim=0).values)


def test_pruning_saves_work() -> None:
    full = 2 * len(batcher_network(16))
    median_cost = sum(a + b for _, _, a, b in sorted_program(16, frozenset({7, 8})))
    trim_cost = sum(a + b for _, _, a, b in middle_program(16, 1))
    assert median_cost < full and trim_cost < median_cost
    assert len(selection_network(8, 2)) == 7 + 6 + 5 + 4


def test_errors() -> None:
    with pytest.raises(ValueError, match="n=4, b=2"):
        trimmed_mean(torch.zeros(4, 3), 2)
    with pytest.raises(ValueError):
        sort_rows(torch.zeros(MAX_NETWORK_ROWS + 1, 3), method="network")
    with pytest.raises(ValueError):
        sort_rows([torch.zeros(3), torch.zeros(4)])
    with pytest.raises(ValueError):
        order_statistics(torch.zeros(3, 3), [3])
    with pytest.raises(ValueError):
        coordinate_median([])
