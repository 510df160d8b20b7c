"""Robust and gossip merge rules: reference values, resilience conditions, robustness sanity,
purity, NaN handling and order invariance; plus the age-weighted mean."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from p2pfl.errors import ConfigError
from p2pfl.merge import MERGE_RULES, MergeContext, make_merge_rule

# every rule added here, with parameters that accept 6 inputs (own + 5 received)
CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("median", {}),
    ("trimmed_mean", {"b": 2}),
    ("krum", {"f": 1}),
    ("multi_krum", {"f": 1, "m": 3}),
    ("geometric_median", {}),
    ("centered_clipping", {"tau": 0.5, "iterations": 3}),
    ("clipped_gossip", {}),
    ("clipped_gossip", {"tau": 0.5}),
    ("balance", {"gamma": 2.0}),
    ("nna", {"f": 2}),
    ("age_weighted", {}),
    ("variance_corrected", {}),
    ("variance_corrected", {"base": "median", "target": "mix"}),
]
IDS = [f"{name}-{params}" for name, params in CONFIGS]


def call(
    name: str,
    own: list[float] | torch.Tensor,
    received: list[list[float]] | torch.Tensor,
    ctx: MergeContext | None = None,
    **params: Any,
) -> torch.Tensor:
    own_t = torch.as_tensor(own, dtype=torch.float32)
    rows = torch.as_tensor(received, dtype=torch.float32).reshape(-1, own_t.numel())
    rule = make_merge_rule(name, **params)
    return rule(own_t, rows, torch.ones(rows.shape[0]), ctx or MergeContext())


def test_all_registered() -> None:
    expected = {
        "age_weighted",
        "variance_corrected",
        "median",
        "trimmed_mean",
        "krum",
        "multi_krum",
        "geometric_median",
        "centered_clipping",
        "clipped_gossip",
        "balance",
        "nna",
    }
    assert expected <= set(MERGE_RULES)
    for name in expected:
        assert make_merge_rule(name).name == name


# ---- reference values ---------------------------------------------------------------------


def test_median_known_values() -> None:
    odd = call("median", [0.0, 10.0], [[5.0, -1.0], [1.0, 3.0]])
    torch.testing.assert_close(odd, torch.tensor([1.0, 3.0]))
    even = call("median", [0.0, 10.0], [[5.0, -1.0], [1.0, 3.0], [4.0, 100.0]])
    torch.testing.assert_close(even, torch.tensor([2.5, 6.5]))  # mean of the two middle


def test_trimmed_mean_known_values_and_condition() -> None:
    result = call("trimmed_mean", [1.0], [[2.0], [100.0], [-50.0], [3.0]], f=1)
    torch.testing.assert_close(result, torch.tensor([2.0]))  # mean of 1, 2, 3
    result = call("trimmed_mean", [1.0], [[2.0], [100.0], [-50.0], [3.0]], b=2)
    torch.testing.assert_close(result, torch.tensor([2.0]))
    with pytest.raises(ValueError, match=r"b=2 and n=4"):
        call("trimmed_mean", [1.0], [[2.0], [3.0], [4.0]], b=2)


def test_krum_picks_the_central_input() -> None:
    # n = 5, f = 1: score = sum of the n - f - 2 = 2 smallest squared distances.
    # 0.05 scores 0.0025 + 0.0025; own (0.0) and 0.1 both score 0.0125; 100 is far.
    received = [[0.1], [-0.1], [0.05], [100.0]]
    torch.testing.assert_close(call("krum", [0.0], received, f=1), torch.tensor([0.05]))
    # multi-krum m=2: 0.05, then the tie between own and 0.1 goes to own
    torch.testing.assert_close(call("multi_krum", [0.0], received, f=1, m=2), torch.tensor([0.025]))
    torch.testing.assert_close(call("multi_krum", [0.0], received, f=1, m=1), torch.tensor([0.05]))


def test_krum_needs_more_than_2f_plus_2_inputs() -> None:
    with pytest.raises(ValueError, match=r"n > 2f \+ 2.*f=1 and n=4"):
        call("krum", [0.0], [[1.0], [2.0], [3.0]], f=1)
    with pytest.raises(ValueError, match=r"f=2 and n=6"):
        call("multi_krum", [0.0], [[1.0]] * 5, f=2)


def test_geometric_median_of_symmetric_points() -> None:
    points = [[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]
    # started at one of the points it walks to the centre of symmetry
    result = call("geometric_median", points[0], points[1:], iterations=100)
    torch.testing.assert_close(result, torch.zeros(2), atol=1e-3, rtol=0)
    # the own vector at the centre is already the geometric median
    result = call("geometric_median", [0.0, 0.0], points)
    torch.testing.assert_close(result, torch.zeros(2), atol=1e-6, rtol=0)
    # collinear: the geometric median of 0, 1, 2, 3, 100 is the middle point
    result = call("geometric_median", [0.0], [[1.0], [2.0], [3.0], [100.0]], iterations=50)
    torch.testing.assert_close(result, torch.tensor([2.0]), atol=0.05, rtol=0)


def test_centered_clipping_values_and_bound() -> None:
    result = call("centered_clipping", [0.0, 0.0], [[10.0, 0.0]], tau=1.0)
    torch.testing.assert_close(result, torch.tensor([0.5, 0.0]))  # (0 + clip(10, 1)) / 2
    generator = torch.Generator().manual_seed(1)
    own, rows = torch.zeros(50), torch.randn(7, 50, generator=generator) * 10
    for iterations in (1, 3):
        out = call("centered_clipping", own, rows, tau=0.3, iterations=iterations)
        assert float(out.norm()) <= 0.3 * iterations + 1e-5


def test_centered_clipping_can_start_from_the_previous_aggregate() -> None:
    ctx = MergeContext(state={})
    first = call("centered_clipping", [0.0], [[10.0]], ctx, tau=1.0, start="previous")
    torch.testing.assert_close(first, torch.tensor([0.5]))
    second = call("centered_clipping", [0.0], [[10.0]], ctx, tau=1.0, start="previous")
    torch.testing.assert_close(second, torch.tensor([0.75]))  # v0 = 0.5, steps (−0.5 + 1)/2


def test_clipped_gossip_metropolis_hastings_weights() -> None:
    # deg_i = 2, senders declare 2 and 3: W = 1/3, 1/4; W_ii = 5/12
    ctx = MergeContext(degree=2, peer_degrees=(2, 3))
    result = call("clipped_gossip", [0.0], [[12.0], [-12.0]], ctx, tau=100.0)
    torch.testing.assert_close(result, torch.tensor([12.0 / 3 - 12.0 / 4]))
    # unknown degrees (0) count as the own degree: W = 1/3 each
    ctx = MergeContext(degree=2, peer_degrees=(0, 0))
    result = call("clipped_gossip", [0.0], [[3.0], [6.0]], ctx, tau=100.0)
    torch.testing.assert_close(result, torch.tensor([3.0]))
    # fixed tau clips each neighbour's pull to tau
    result = call("clipped_gossip", [0.0], [[3.0], [6.0]], ctx, tau=1.0)
    torch.testing.assert_close(result, torch.tensor([2.0 / 3]))


def test_clipped_gossip_adaptive_tau_clips_only_the_farthest() -> None:
    ctx = MergeContext(degree=3)
    result = call("clipped_gossip", [0.0], [[1.0], [2.0], [1000.0]], ctx)
    # tau = second-largest distance = 2; W = 1/4 each
    torch.testing.assert_close(result, torch.tensor([(1.0 + 2.0 + 2.0) / 4]))


def test_balance_acceptance_radius_and_schedule() -> None:
    own = [10.0, 0.0]
    received = [[10.0, 2.0], [10.0, 6.0]]  # distances 2 and 6; ||own|| = 10
    ctx = MergeContext(own_round=0, total_rounds=10)
    # radius 0.3 * 10 = 3 accepts only the first: 0.5 own + 0.5 first
    out = call("balance", own, received, ctx)
    torch.testing.assert_close(out, torch.tensor([10.0, 1.0]))
    out = call("balance", own, received, ctx, gamma=0.7, alpha=0.0)  # radius 7: both
    torch.testing.assert_close(out, torch.tensor([10.0, 4.0]))
    late = MergeContext(own_round=10, total_rounds=10)  # radius 0.7 * e^-1 * 10 = 2.58
    out = call("balance", own, received, late, gamma=0.7, alpha=0.0)
    torch.testing.assert_close(out, torch.tensor([10.0, 2.0]))
    unknown_total = MergeContext(own_round=3, total_rounds=0)  # lambda = t: radius 0.35
    out = call("balance", own, received, unknown_total, gamma=0.7)
    torch.testing.assert_close(out, torch.tensor(own))  # nothing accepted: keep own


def test_nna_averages_the_n_minus_f_nearest() -> None:
    received = [[1.0], [-2.0], [50.0], [-60.0]]
    result = call("nna", [0.0], received, f=2)  # keep own, 1, -2
    torch.testing.assert_close(result, torch.tensor([-1.0 / 3]))
    with pytest.raises(ValueError, match=r"f=3 and n=5"):
        call("nna", [0.0], received, f=3)


def test_age_weighted_mean() -> None:
    ctx = MergeContext(rounds=(1, 3), own_round=0)
    result = call("age_weighted", [0.0], [[2.0], [6.0]], ctx)  # weights 1, 2, 4
    torch.testing.assert_close(result, torch.tensor([(2.0 * 2 + 6.0 * 4) / 7]))
    result = call("age_weighted", [0.0], [[2.0], [6.0]], ctx, offset=0.0)  # 0, 1, 3
    torch.testing.assert_close(result, torch.tensor([(2.0 + 18.0) / 4]))
    result = call("age_weighted", [0.0], [[3.0], [6.0]])  # no ages known: the plain mean
    torch.testing.assert_close(result, torch.tensor([3.0]))
    with pytest.raises(ValueError, match="ages"):
        call("age_weighted", [0.0], [[3.0], [6.0]], MergeContext(rounds=(1,)))


@pytest.mark.parametrize(
    ("name", "params", "key"),
    [
        ("trimmed_mean", {"f": -1}, "merge.f"),
        ("trimmed_mean", {"b": 1.5}, "merge.b"),
        ("krum", {"f": True}, "merge.f"),
        ("multi_krum", {"m": 0}, "merge.m"),
        ("geometric_median", {"nu": 0.0}, "merge.nu"),
        ("geometric_median", {"iterations": 0}, "merge.iterations"),
        ("centered_clipping", {"tau": -1.0}, "merge.tau"),
        ("centered_clipping", {"start": "zero"}, "merge.start"),
        ("clipped_gossip", {"tau": math.inf}, "merge.tau"),
        ("balance", {"alpha": 2.0}, "merge.alpha"),
        ("balance", {"gamma": -0.1}, "merge.gamma"),
        ("nna", {"f": "1"}, "merge.f"),
        ("age_weighted", {"offset": -1.0}, "merge.offset"),
    ],
)
def test_bad_parameters_name_the_key(name: str, params: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_merge_rule(name, **params)
    assert info.value.key == key


# ---- robustness sanity ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("median", {}),
        ("trimmed_mean", {"f": 3}),
        ("krum", {"f": 3}),
        ("multi_krum", {"f": 3}),
        ("geometric_median", {}),
        ("nna", {"f": 3}),
    ],
)
@pytest.mark.parametrize("outlier", [1e6, -1e30, 3e38])
def test_outliers_stay_out(name: str, params: dict[str, Any], outlier: float) -> None:
    generator = torch.Generator().manual_seed(7)
    honest = torch.randn(6, 20, generator=generator)  # own + 5 honest neighbours
    byzantine = torch.full((3, 20), outlier)
    byzantine[1] = -outlier  # pulling both ways
    received = torch.cat([honest[1:4], byzantine, honest[4:]])
    out = call(name, honest[0], received, **params)
    assert bool(torch.isfinite(out).all())
    low, high = honest.min(dim=0).values, honest.max(dim=0).values
    if name in ("median", "trimmed_mean", "krum", "multi_krum", "nna"):
        assert bool(((out >= low - 1e-6) & (out <= high + 1e-6)).all())
    centre = honest.mean(dim=0)
    radius = float((honest - centre).norm(dim=1).max())
    assert float((out - centre).norm()) <= radius


def test_clipping_rules_bound_the_outliers_pull() -> None:
    own = torch.zeros(10)
    honest = torch.randn(4, 10, generator=torch.Generator().manual_seed(2)) * 0.01
    received = torch.cat([honest, torch.full((2, 10), 1e30)])
    for name, params, bound in [
        ("centered_clipping", {"tau": 1.0}, 1.0),
        ("clipped_gossip", {"tau": 1.0}, 1.0),
        ("balance", {}, 1e-6),
    ]:
        out = call(name, own, received, MergeContext(degree=6), **params)
        assert float(out.double().norm()) <= bound, name
    # adaptive tau (second-largest distance) clips a single outlier to the farthest honest
    one_outlier = torch.cat([honest, torch.full((1, 10), 1e30)])
    out = call("clipped_gossip", own, one_outlier, MergeContext(degree=5))
    assert float(out.double().norm()) <= float(honest.norm(dim=1).max())


# ---- contract: purity, NaN rows, identity, order invariance ---------------------------------


def ctx_for(k: int) -> MergeContext:
    return MergeContext(
        rounds=tuple(range(k)), own_round=2, degree=6, peer_degrees=(3,) * k, total_rounds=10
    )


@pytest.mark.parametrize(("name", "params"), CONFIGS, ids=IDS)
def test_no_mutation_and_a_fresh_result(name: str, params: dict[str, Any]) -> None:
    generator = torch.Generator().manual_seed(3)
    own, received = torch.randn(12, generator=generator), torch.randn(5, 12, generator=generator)
    received[2, 3] = math.nan
    weights = torch.ones(5)
    copies = (own.clone(), received.clone(), weights.clone())
    out = make_merge_rule(name, **params)(own, received, weights, ctx_for(5))
    for before, after in zip(copies, (own, received, weights), strict=True):
        torch.testing.assert_close(after, before, equal_nan=True)
    assert out.shape == own.shape and out.dtype == own.dtype
    assert out.data_ptr() not in {own.data_ptr(), *(row.data_ptr() for row in received)}
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize(("name", "params"), CONFIGS, ids=IDS)
def test_nan_rows_are_excluded(name: str, params: dict[str, Any]) -> None:
    generator = torch.Generator().manual_seed(4)
    own, clean = torch.randn(8, generator=generator), torch.randn(5, 8, generator=generator)
    dirty = torch.cat([clean[:2], torch.full((1, 8), math.nan), clean[2:]])
    dirty[2, 0] = math.inf
    rule = make_merge_rule(name, **params)
    ctx5 = ctx_for(5)  # the sender of the left-out row keeps its (self) weight: same degree
    ctx6 = MergeContext(
        rounds=(0, 1, 99, 2, 3, 4), own_round=2, degree=6, peer_degrees=(3,) * 6, total_rounds=10
    )
    torch.testing.assert_close(
        rule(own, dirty, torch.ones(6), ctx6), rule(own, clean, torch.ones(5), ctx5)
    )


@pytest.mark.parametrize(("name", "params"), CONFIGS, ids=IDS)
def test_identity_on_equal_inputs_and_nothing_received(name: str, params: dict[str, Any]) -> None:
    own = torch.linspace(-1, 1, 10)
    out = make_merge_rule(name, **params)(own, own.repeat(5, 1), torch.ones(5), ctx_for(5))
    torch.testing.assert_close(out, own)
    alone = make_merge_rule(name, **params)(own, torch.empty(0, 10), torch.empty(0), ctx_for(0))
    torch.testing.assert_close(alone, own)
    assert alone.data_ptr() != own.data_ptr()


def test_dtype_and_shape_are_preserved() -> None:
    own = torch.zeros(2, 3, dtype=torch.float64)
    received = torch.arange(30, dtype=torch.float32).reshape(5, 2, 3)
    for name, params in CONFIGS:
        out = make_merge_rule(name, **params)(own, received, torch.ones(5), ctx_for(5))
        assert out.dtype == torch.float64 and out.shape == (2, 3), name


@pytest.mark.parametrize(("name", "params"), CONFIGS, ids=IDS)
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_order_invariance(name: str, params: dict[str, Any], data: st.DataObject) -> None:
    seed = data.draw(st.integers(0, 2**31 - 1))
    ties = data.draw(st.booleans())
    generator = torch.Generator().manual_seed(seed)
    own = torch.randn(6, generator=generator)
    received = torch.randn(5, 6, generator=generator)
    if ties:  # duplicated rows and symmetric pairs around own
        received[1] = received[0]
        received[3] = 2 * own - received[2]
    order = data.draw(st.permutations(range(5)))
    index = torch.tensor(order, dtype=torch.long)
    rule = make_merge_rule(name, **params)
    ctx = ctx_for(5)
    shuffled_ctx = MergeContext(
        rounds=tuple(ctx.rounds[i] for i in order),
        own_round=ctx.own_round,
        degree=ctx.degree,
        peer_degrees=tuple(ctx.peer_degrees[i] for i in order),
        total_rounds=ctx.total_rounds,
    )
    torch.testing.assert_close(
        rule(own, received[index], torch.ones(5), shuffled_ctx),
        rule(own, received, torch.ones(5), ctx),
        rtol=1e-5,
        atol=1e-5,
    )


# -- Krum at any scale (issue 12, defect 7) -----------------------------------------------


def direct_krum_scores(rows: np.ndarray, f: int) -> np.ndarray:
    """Krum scores from every pairwise distance summed from its own differences (float64)."""
    n = rows.shape[0]
    distances = np.array(
        [[float(np.sum((rows[i] - rows[j]) ** 2)) for j in range(n)] for i in range(n)]
    )
    np.fill_diagonal(distances, np.inf)
    scores: np.ndarray = np.sort(distances, axis=1)[:, : n - f - 2].sum(axis=1)
    return scores


scales = st.floats(-8.0, 8.0).map(lambda e: 10.0**e)


@settings(max_examples=300, deadline=None)
@given(
    dim=st.integers(1, 6),
    k=st.integers(4, 8),
    f=st.integers(0, 2),
    data=st.data(),
)
def test_krum_and_multi_krum_choose_as_direct_krum_whatever_the_scales(
    dim: int, k: int, f: int, data: st.DataObject
) -> None:
    """Own and received rows scaled independently by up to 1e8 (an attacker picks the scale
    of its rows): the rules choose what Krum from direct pairwise distances chooses."""
    assume(k + 1 > 2 * f + 2)
    values = st.floats(-10.0, 10.0, width=32)
    base = data.draw(
        st.lists(st.lists(values, min_size=dim, max_size=dim), min_size=k + 1, max_size=k + 1)
    )
    factors = data.draw(st.lists(scales, min_size=k + 1, max_size=k + 1))
    rows32 = torch.tensor([[v * s for v in row] for row, s in zip(base, factors, strict=True)])
    assume(bool(torch.isfinite(rows32).all()))
    rows = rows32.to(torch.float64).numpy()
    scores = direct_krum_scores(rows, f)
    order = np.argsort(scores, kind="stable")
    ranked = scores[order]
    # Rounding decides near-ties in any implementation; compare clear choices only.
    assume(ranked[1] - ranked[0] > 1e-9 * abs(ranked[1]))
    own, received = rows32[0], rows32[1:]
    chosen = call("krum", own, received, f=f)
    assert torch.equal(chosen, rows32[order[0]]), (scores, order)
    m = data.draw(st.integers(1, k + 1))
    if m < k + 1:
        assume(ranked[m] - ranked[m - 1] > 1e-9 * abs(ranked[m]))
    mean = rows[sorted(order[:m])].mean(axis=0)
    merged = call("multi_krum", own, received, f=f, m=m)
    np.testing.assert_allclose(merged.numpy(), mean.astype(np.float32), rtol=1e-6, atol=0)


def test_krum_is_not_fooled_by_an_own_vector_far_larger_than_the_others() -> None:
    """The own vector 1e6 times the received ones: distances from a Gram matrix centred on
    it lost the 1e-5 that makes the last row the best choice (it picked a 0 row)."""
    received = [[0.0], [0.0], [0.0], [0.0], [1.0], [1e-5]]
    # Scores (f = 0): each row's 5 nearest; 1e-5 is nearest to the four zeros and to 1.
    chosen = call("krum", [1e6], received, f=0)
    assert torch.equal(chosen, torch.tensor([1e-5]))
    assert torch.equal(call("multi_krum", [1e6], received, f=0, m=1), chosen)
