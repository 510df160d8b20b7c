"""The core's merge step: a rule that cannot give its guarantee with the inputs at hand, and
the finite-input entry of the sample-weighted mean, held bit for bit to the rule's general
call (including every input that leaves it)."""

from __future__ import annotations

import math

import pytest
import torch

from p2pfl.identity import Identity
from p2pfl.merge import MergeContext, make_merge_rule
from p2pfl.merge.averaging import WeightedMean
from p2pfl.protocol.merging import Merger
from p2pfl.protocol.messages import ModelUpdate


def _update(vector: torch.Tensor) -> ModelUpdate:
    return ModelUpdate(
        sender=Identity.from_seed(bytes(32)).node_id,
        seq=0,
        round=0,
        samples=10,
        degree=1,
        vector=vector,
        digest=b"d" * 32,
    )


def test_too_few_inputs_for_krum_keeps_the_own_model_and_counts_it() -> None:
    merger = Merger(make_merge_rule("krum", f=1), own_weight=10.0, layout=None)
    own = torch.zeros(4)
    merged = merger.merge(own, [_update(torch.full((4,), 1e6))], own_round=0)
    assert torch.equal(merged, own)
    assert merged is not own
    assert merger.fallbacks == 1


def test_enough_inputs_for_krum_merges() -> None:
    merger = Merger(make_merge_rule("krum", f=1), own_weight=10.0, layout=None)
    own = torch.zeros(4)
    updates = [_update(torch.full((4,), value)) for value in (0.1, 0.2, 0.15, 0.12, 1e6)]
    merged = merger.merge(own, updates, own_round=0)
    assert merger.fallbacks == 0
    assert float(merged.abs().max()) <= 0.2


class _Counting(WeightedMean):
    """The weighted mean, counting the merges that went through its general call (it defines
    both entries, so the Merger still takes its finite-input one)."""

    def __init__(self) -> None:
        self.general_calls = 0

    def __call__(
        self, own: torch.Tensor, received: torch.Tensor, weights: torch.Tensor, ctx: MergeContext
    ) -> torch.Tensor:
        self.general_calls += 1
        return super().__call__(own, received, weights, ctx)

    def merge_finite(
        self, own: torch.Tensor, rows: torch.Tensor, weights: list[float], own_weight: float
    ) -> torch.Tensor | None:
        return super().merge_finite(own, rows, weights, own_weight)


class _ChangedCall(WeightedMean):
    """A subclass that changes the general call only: its merges must all go through it."""

    def __call__(
        self, own: torch.Tensor, received: torch.Tensor, weights: torch.Tensor, ctx: MergeContext
    ) -> torch.Tensor:
        return own.clone()


class _ChangedEntry(WeightedMean):
    """A subclass that changes the finite entry only: the Merger must not trust it."""

    def merge_finite(
        self, own: torch.Tensor, rows: torch.Tensor, weights: list[float], own_weight: float
    ) -> torch.Tensor | None:
        return torch.full_like(own, 7.0)


class _GeneralOnly:
    """The weighted mean without its finite-input entry: every merge takes the general call."""

    name = "weighted"

    def __call__(
        self, own: torch.Tensor, received: torch.Tensor, weights: torch.Tensor, ctx: MergeContext
    ) -> torch.Tensor:
        return WeightedMean()(own, received, weights, ctx)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    # Bit patterns, so that NaN == NaN and -0.0 != 0.0.
    return tensor.contiguous().view(torch.int32 if tensor.dtype is torch.float32 else torch.int64)


def _sender_update(index: int, vector: torch.Tensor, samples: int) -> ModelUpdate:
    return ModelUpdate(
        sender=Identity.from_seed(bytes([index]) * 32).node_id,
        seq=index,
        round=3,
        samples=samples,
        degree=6,
        vector=vector,
        digest=bytes([index]) * 32,
    )


def _same_as_general(own: torch.Tensor, updates: list[ModelUpdate], own_weight: float) -> int:
    """Merge both ways, assert the same bits; how many merges left the finite entry."""
    rule = _Counting()
    fast = Merger(rule, own_weight=own_weight, layout=None).merge(own, updates, own_round=3)
    general = Merger(_GeneralOnly(), own_weight=own_weight, layout=None).merge(
        own, updates, own_round=3
    )
    assert fast.dtype == general.dtype and fast.shape == general.shape
    assert torch.equal(_bits(fast), _bits(general))
    return rule.general_calls


def test_finite_sample_weighted_merges_skip_the_general_call_with_the_same_bits() -> None:
    generator = torch.Generator().manual_seed(11)
    for case in range(200):
        size = (1, 7, 2410, 64)[case % 4]
        count = 1 + case % 9
        scale = float(10.0 ** int(torch.randint(-30, 12, (1,), generator=generator)))
        own = torch.randn(size, generator=generator) * scale
        samples = torch.randint(0, 1 << 12, (count,), generator=generator).tolist()
        updates = [
            _sender_update(index, torch.randn(size, generator=generator) * scale, samples[index])
            for index in range(count)
        ]
        own_weight = float((0, 1, 64, 3.5)[case % 4])
        assert _same_as_general(own, updates, own_weight) == 0


@pytest.mark.parametrize(
    ("where", "value"),
    [
        ("row", math.nan),
        ("row", math.inf),
        ("own", -math.inf),
        ("own", math.nan),
        ("all", math.nan),
    ],
)
def test_a_non_finite_input_takes_the_general_call(where: str, value: float) -> None:
    own = torch.randn(33, generator=torch.Generator().manual_seed(1))
    vectors = [torch.randn(33, generator=torch.Generator().manual_seed(2 + i)) for i in range(4)]
    if where in ("row", "all"):
        vectors[2][5] = value
    if where in ("own", "all"):
        own[0] = value
    updates = [_sender_update(i, vector, 10 + i) for i, vector in enumerate(vectors)]
    assert _same_as_general(own, updates, 10.0) == 1


@pytest.mark.parametrize(
    ("samples", "own_weight"),
    [
        ([0, 0, 0], 0.0),  # nothing weighs: the plain mean
        ([-1, 5, 7], 3.0),  # a negative count is left out
        ([0, 0, 4], 0.0),  # only one row weighs
        ([(1 << 24) + 1, 3, 1 << 60], 5.0),  # counts float32 rounds
        ([2, 3, 4], math.inf),  # an infinite own weight is dropped
        ([2, 3, 4], -1.0),
    ],
)
def test_unusual_weights_merge_as_the_general_call_does(
    samples: list[int], own_weight: float
) -> None:
    own = torch.randn(9, generator=torch.Generator().manual_seed(3))
    updates = [
        _sender_update(i, torch.randn(9, generator=torch.Generator().manual_seed(4 + i)), count)
        for i, count in enumerate(samples)
    ]
    _same_as_general(own, updates, own_weight)


def test_values_near_the_float32_limit_merge_exactly() -> None:
    own = torch.full((5,), 3e38)
    updates = [_sender_update(i, torch.full((5,), -3e38 + i * 1e37), 2) for i in range(3)]
    assert _same_as_general(own, updates, 2.0) == 0


def test_other_dtypes_and_shapes_take_the_general_call() -> None:
    own = torch.randn(6)
    half = [_sender_update(i, torch.randn(6).to(torch.float16), 3) for i in range(3)]
    assert _same_as_general(own, half, 1.0) == 1
    double = [_sender_update(i, torch.randn(6, dtype=torch.float64), 3) for i in range(3)]
    assert _same_as_general(own, double, 1.0) == 1
    assert _same_as_general(torch.randn(2, 3), [_sender_update(0, torch.randn(2, 3), 1)], 1.0) == 1
    with pytest.raises(ValueError, match="received has shape"):
        Merger(_Counting(), own_weight=1.0, layout=None).merge(
            own, [_sender_update(0, torch.randn(7), 1)], own_round=0
        )


def test_explicit_weights_take_the_general_call() -> None:
    rule = _Counting()
    merger = Merger(rule, own_weight=1.0, layout=None)
    merger.merge(
        torch.zeros(3), [_update(torch.ones(3))], own_round=0, weights=[2.0], own_weight=1.0
    )
    assert rule.general_calls == 1


def test_a_subclass_that_changes_one_entry_only_gets_the_general_call() -> None:
    own = torch.zeros(3)
    merged = Merger(_ChangedCall(), own_weight=1.0, layout=None).merge(
        own, [_update(torch.ones(3))], own_round=0
    )
    assert torch.equal(merged, own)
    merged = Merger(_ChangedEntry(), own_weight=10.0, layout=None).merge(
        own, [_update(torch.ones(3))], own_round=0
    )
    assert torch.equal(merged, torch.full((3,), 0.5))


def test_an_explicit_own_weight_is_honoured_without_explicit_weights() -> None:
    own = torch.zeros(5)
    updates = [_sender_update(1, torch.ones(5), samples=1)]
    merger = Merger(WeightedMean(), own_weight=1.0, layout=None)
    # own weight 3 against one sample: a quarter of the way to the received model
    merged = merger.merge(own, updates, own_round=3, own_weight=3.0)
    assert torch.allclose(merged, torch.full((5,), 0.25))
    assert torch.allclose(merger.merge(own, updates, own_round=3), torch.full((5,), 0.5))
