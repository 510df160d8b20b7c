"""The averaging merge rules: values, order invariance, bounds, NaN handling, purity."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfl.errors import ConfigError
from p2pfl.merge import MERGE_RULES, MergeContext, make_merge_rule

RULES = ["mean", "weighted"]
NAN = math.nan


def merge(
    name: str,
    own: list[float],
    received: list[list[float]],
    weights: list[float],
    own_weight: float = 1.0,
) -> torch.Tensor:
    rule = make_merge_rule(name)
    size = len(own)
    return rule(
        torch.tensor(own),
        torch.tensor(received, dtype=torch.float32).reshape(len(received), size),
        torch.tensor(weights, dtype=torch.float32),
        MergeContext(own_weight=own_weight),
    )


def test_registered_on_import() -> None:
    assert {"mean", "weighted"} <= set(MERGE_RULES)
    for name in RULES:
        assert make_merge_rule(name).name == name
    with pytest.raises(ConfigError):
        make_merge_rule("no-such-rule")
    with pytest.raises(ConfigError):
        make_merge_rule("mean", beta=0.5)


def test_mean_counts_own_once_and_ignores_weights() -> None:
    result = merge("mean", [1.0, 2.0], [[3.0, 4.0], [5.0, 9.0]], [100.0, 0.0], own_weight=7.0)
    torch.testing.assert_close(result, torch.tensor([3.0, 5.0]))


def test_weighted_by_samples() -> None:
    result = merge("weighted", [0.0, 10.0], [[4.0, 0.0], [8.0, 2.0]], [1.0, 2.0], own_weight=1.0)
    torch.testing.assert_close(result, torch.tensor([5.0, 3.5]))  # (0+4+16)/4, (10+0+4)/4


def test_weighted_all_zero_weights_falls_back_to_mean() -> None:
    result = merge("weighted", [0.0], [[3.0], [6.0]], [0.0, 0.0], own_weight=0.0)
    torch.testing.assert_close(result, torch.tensor([3.0]))


def test_weighted_zero_own_weight_follows_the_received() -> None:
    result = merge("weighted", [100.0], [[2.0], [4.0]], [1.0, 1.0], own_weight=0.0)
    torch.testing.assert_close(result, torch.tensor([3.0]))


@pytest.mark.parametrize("name", RULES)
def test_nothing_received_returns_a_copy_of_own(name: str) -> None:
    own = torch.tensor([1.0, -2.0])
    result = make_merge_rule(name)(own, torch.empty(0, 2), torch.empty(0), MergeContext())
    torch.testing.assert_close(result, own)
    assert result.data_ptr() != own.data_ptr()


@pytest.mark.parametrize("name", RULES)
def test_non_finite_rows_are_excluded(name: str) -> None:
    result = merge(name, [1.0, 1.0], [[NAN, 5.0], [3.0, 3.0], [math.inf, 0.0]], [1.0, 1.0, 1.0])
    torch.testing.assert_close(result, torch.tensor([2.0, 2.0]))


@pytest.mark.parametrize("name", RULES)
def test_non_finite_own_uses_the_received(name: str) -> None:
    result = merge(name, [NAN, 0.0], [[2.0, 2.0], [4.0, 6.0]], [1.0, 1.0], own_weight=5.0)
    torch.testing.assert_close(result, torch.tensor([3.0, 4.0]))


@pytest.mark.parametrize("name", RULES)
def test_nothing_finite_returns_own(name: str) -> None:
    own = torch.tensor([NAN, 1.0])
    result = make_merge_rule(name)(own, torch.full((2, 2), NAN), torch.ones(2), MergeContext())
    torch.testing.assert_close(result, own, equal_nan=True)
    assert result.data_ptr() != own.data_ptr()


@pytest.mark.parametrize("name", RULES)
def test_huge_finite_values_do_not_overflow(name: str) -> None:
    big = 3.0e38
    result = merge(name, [big], [[big], [big]], [1.0, 1.0])
    assert bool(torch.isfinite(result).all())
    torch.testing.assert_close(result, torch.tensor([big]))


def test_weighted_excludes_negative_or_non_finite_weights() -> None:
    result = merge("weighted", [0.0], [[10.0], [20.0], [4.0]], [-1.0, NAN, 1.0])
    torch.testing.assert_close(result, torch.tensor([2.0]))


@pytest.mark.parametrize("name", RULES)
def test_dtype_and_shape_are_preserved(name: str) -> None:
    own = torch.zeros(2, 3, dtype=torch.float64)
    received = torch.ones(2, 2, 3, dtype=torch.float32)
    result = make_merge_rule(name)(own, received, torch.ones(2), MergeContext())
    assert result.dtype == torch.float64 and result.shape == (2, 3)
    torch.testing.assert_close(result, torch.full((2, 3), 2 / 3, dtype=torch.float64))


@pytest.mark.parametrize("name", RULES)
def test_shape_mismatch_raises(name: str) -> None:
    rule = make_merge_rule(name)
    with pytest.raises(ValueError):
        rule(torch.zeros(3), torch.zeros(2, 4), torch.ones(2), MergeContext())
    with pytest.raises(ValueError):
        rule(torch.zeros(3), torch.zeros(2, 3), torch.ones(3), MergeContext())


def budget(fast: int) -> int:
    """``fast`` examples in the quick tiers; more when the loaded profile asks (nightly)."""
    profile = settings().max_examples
    return profile if profile > 200 else fast


finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)
maybe_bad = st.one_of(finite, finite, finite, st.sampled_from([NAN, math.inf, -math.inf]))


@st.composite
def merge_inputs(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    size = draw(st.integers(1, 6))
    k = draw(st.integers(0, 5))
    own = torch.tensor(draw(st.lists(maybe_bad, min_size=size, max_size=size)), dtype=torch.float32)
    rows = [draw(st.lists(maybe_bad, min_size=size, max_size=size)) for _ in range(k)]
    received = torch.tensor(rows, dtype=torch.float32).reshape(k, size)
    weights = torch.tensor(
        draw(st.lists(st.integers(0, 1000), min_size=k, max_size=k)), dtype=torch.float32
    )
    own_weight = float(draw(st.integers(0, 1000)))
    return own, received, weights, own_weight


@pytest.mark.parametrize("name", RULES)
@settings(max_examples=budget(100), deadline=None)
@given(inputs=merge_inputs(), data=st.data())
def test_properties(
    name: str, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, float], data: st.DataObject
) -> None:
    own, received, weights, own_weight = inputs
    copies = (own.clone(), received.clone(), weights.clone())
    rule = make_merge_rule(name)
    result = rule(own, received, weights, MergeContext(own_weight=own_weight))

    # pure: inputs untouched, output a fresh tensor of own's shape and dtype
    for before, after in zip(copies, (own, received, weights), strict=True):
        torch.testing.assert_close(after, before, equal_nan=True)
    assert result.shape == own.shape and result.dtype == own.dtype
    assert result.data_ptr() != own.data_ptr()

    # bounded by the finite inputs (or own itself when nothing is finite)
    finite_rows = [row for row in [own, *received] if bool(torch.isfinite(row).all())]
    if finite_rows:
        stacked = torch.stack(finite_rows)
        slack = 1e-3
        assert bool((result >= stacked.min(0).values - slack).all())
        assert bool((result <= stacked.max(0).values + slack).all())
    else:
        torch.testing.assert_close(result, own, equal_nan=True)

    # invariant to the order of the received rows (weights permuted alongside)
    order = torch.tensor(data.draw(st.permutations(range(received.shape[0]))), dtype=torch.long)
    shuffled = rule(own, received[order], weights[order], MergeContext(own_weight=own_weight))
    torch.testing.assert_close(shuffled, result, equal_nan=True, rtol=1e-5, atol=1e-3)


def _weighted_reference(
    own: torch.Tensor, received: torch.Tensor, weights: torch.Tensor, own_weight: float
) -> torch.Tensor:
    """The weighted mean as plain tensor ops (its form before the weights went through Python
    floats): the rule must give these very bits, or simulations change their metrics."""
    keep = torch.isfinite(received).all(dim=1) & torch.isfinite(weights) & (weights >= 0)
    rows, row_weights = received[keep], weights.to(torch.float64)[keep]
    total = own_weight + float(row_weights.sum())
    if total <= 0.0:
        return torch.full_like(own, float("nan"))  # the plain-mean fallback: not compared
    merged = (row_weights / total).to(own.dtype) @ rows
    return merged + own * (own_weight / total) if own_weight > 0.0 else merged


@settings(max_examples=200, deadline=None)
@given(
    k=st.integers(1, 8),
    integral=st.booleans(),
    seed=st.integers(0, 2**16),
    own_weight=st.sampled_from([0.0, 1.0, 64.0, 0.37]),
)
def test_weighted_is_bit_identical_to_tensor_arithmetic(
    k: int, integral: bool, seed: int, own_weight: float
) -> None:
    generator = torch.Generator().manual_seed(seed)
    own = torch.randn(50, generator=generator)
    received = torch.randn(k, 50, generator=generator) * 10.0
    received[0, 3] = float("nan")
    weights = torch.rand(k, generator=generator) * 100.0
    if integral:
        weights = weights.round()
    weights[-1] = -1.0 if k > 2 else weights[-1]
    merged = make_merge_rule("weighted")(
        own, received, weights, MergeContext(own_weight=own_weight)
    )
    reference = _weighted_reference(own, received, weights, own_weight)
    if not bool(torch.isfinite(reference).all()):
        return  # every weight left out: the fallback, covered above
    assert torch.equal(merged, reference)
