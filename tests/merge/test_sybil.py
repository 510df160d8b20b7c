"""FoolsGold, SybilWall and its median variants: reference vectors, bookkeeping, properties."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from p2pfl.errors import ConfigError
from p2pfl.identity import NodeId
from p2pfl.merge import (
    MERGE_RULES,
    HistoryTable,
    MergeContext,
    history_gossip_weights,
    make_merge_rule,
    record_distant_history,
    similarity_weights,
)
from p2pfl.merge.sybil import STATE_KEY, coordinate_weighted_median, history_table
from p2pfl.params import flatten

RULES = ["foolsgold", "sybilwall", "sybilwall_median", "sybilwall_weighted_median"]


def node(i: int) -> NodeId:
    return NodeId(bytes([i]) * 32)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, tol: float = 1e-5) -> None:
    """``torch.testing.assert_close`` without its multi-second first-call import."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (actual, expected)
    assert torch.allclose(actual, expected, rtol=tol, atol=tol, equal_nan=True), (actual, expected)


def linear_model(value: list[float]) -> torch.Tensor:
    """The reference tests' model: ``nn.Linear(2, 2)`` with every row and the bias = value."""
    model = nn.Linear(2, 2)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0)
            p.add_(torch.tensor(value))
    return flatten(model)


def vec(value: list[float]) -> torch.Tensor:
    """What :func:`linear_model` flattens to: weight rows then bias, all equal to value."""
    return torch.tensor(value * 3)


def call(
    name: str,
    own: torch.Tensor,
    rows: list[torch.Tensor],
    ctx: MergeContext,
    **params: Any,
) -> torch.Tensor:
    received = torch.stack(rows) if rows else torch.zeros(0, own.numel())
    return make_merge_rule(name, **params)(own, received, torch.ones(len(rows)), ctx)


# --- registry and parameters ----------------------------------------------------------------


def test_registered_with_validated_parameters() -> None:
    assert set(RULES) <= set(MERGE_RULES)
    for name in RULES:
        assert make_merge_rule(name).name == name
    bad = [
        ("kappa", 0.0, "merge.kappa"),
        ("kappa", math.nan, "merge.kappa"),
        ("kappa", True, "merge.kappa"),
        ("own_trust", -1.0, "merge.own_trust"),
        ("own_trust", math.inf, "merge.own_trust"),
        ("baseline", "first", "merge.baseline"),
    ]
    for name in RULES:
        for param, value, key in bad:
            with pytest.raises(ConfigError) as info:
                make_merge_rule(name, **{param: value})
            assert info.value.key == key
        with pytest.raises(ConfigError):
            make_merge_rule(name, beta=1)


# --- reference vectors (SybilWall repo, ml/test/aggregators/test_sybilwall.py) ---------------


A, B = [0.0, 1.0], [1.0, 0.0]


@pytest.mark.parametrize(
    ("c", "expected_weights", "expected"),
    [([1.0, -1.0], [1.0, 0.0, 0.0], A), ([0.0, -1.0], [1.0, 1.0, 1.0], [1 / 3, 0.0])],
)
def test_reference_vectors(
    c: list[float], expected_weights: list[float], expected: list[float]
) -> None:
    models = torch.stack([linear_model(A), linear_model(B), linear_model(c)])
    assert torch.equal(models[0], vec(A))
    # The reference treats each model as its own history.
    weights = similarity_weights(models)
    assert torch.equal(weights, torch.tensor(expected_weights, dtype=torch.float64))
    # No own model (own_trust=0); without sender ids a row's history is row - own = the model.
    zero = torch.zeros(6)
    for name in ("sybilwall", "foolsgold"):
        out = call(name, zero, list(models), MergeContext(), own_trust=0.0)
        assert torch.equal(out, vec(expected))
    # The same through the tracked histories: round 1 sets the baselines at 0, round 2
    # sends the models, so H_p = model_p.
    ctx = MergeContext(senders=(node(1), node(2), node(3)))
    call("sybilwall", zero, [zero, zero, zero], ctx, own_trust=0.0)
    out = call("sybilwall", zero, list(models), ctx, own_trust=0.0)
    assert torch.equal(out, vec(expected))
    table = history_table(ctx.state)
    assert torch.equal(table.direct[node(3)].history, vec(c))


def test_reference_history_vector_and_normalisation_fix() -> None:
    """Reference ``test_history``: models [a, b], histories [a, b, c] -> output a."""
    zero = torch.zeros(6)
    ctx = MergeContext(senders=(node(1), node(2)))
    call("sybilwall", zero, [zero, zero], ctx, own_trust=0.0)
    assert record_distant_history(ctx.state, node(3), 5, 1, vec([1.0, -1.0]))
    out = call("sybilwall", zero, [vec(A), vec(B)], ctx, own_trust=0.0)
    assert torch.equal(out, vec(A))
    # FoolsGold ignores distant histories: a and b are orthogonal, both keep weight 1.
    ctx = MergeContext(senders=(node(1), node(2)), state={})
    call("foolsgold", zero, [zero, zero], ctx, own_trust=0.0)
    record_distant_history(ctx.state, node(3), 5, 1, vec([1.0, -1.0]))
    out = call("foolsgold", zero, [vec(A), vec(B)], ctx, own_trust=0.0)
    assert_close(out, vec([0.5, 0.5]))


def test_distant_histories_do_not_shrink_the_model() -> None:
    """The reference bug: weights normalised over k + h entries shrink the result to 0."""
    own = torch.full((6,), 2.0)
    ctx = MergeContext(senders=(node(1), node(2)))
    for step in range(3):
        rows = [own + step, own - step]
        call("sybilwall", own, rows, ctx)
    for origin in (7, 8, 9):
        record_distant_history(ctx.state, node(origin), 1, 1, torch.randn(6))
    out = call("sybilwall", own, [own.clone(), own.clone()], ctx)
    assert_close(out, own)


def test_weighted_median_reference_vectors() -> None:
    """SybilWall repo, ml/test/aggregators/test_weighted_median.py."""
    abc = torch.stack([vec(A), vec(B), vec([1.0, -1.0])])
    third = torch.full((3,), 1 / 3, dtype=torch.float64)
    assert torch.equal(coordinate_weighted_median(abc, third), vec([1.0, 0.0]))
    skewed = torch.tensor([1 / 5, 1 / 5, 3 / 5], dtype=torch.float64)
    assert torch.equal(coordinate_weighted_median(abc, skewed), vec([1.0, -1.0]))
    abc2 = torch.stack([vec(A), vec(B), vec([0.0, -1.0])])
    assert torch.equal(coordinate_weighted_median(abc2, third), vec([0.0, 0.0]))
    # Equal weights on an even count pick the lower middle value.
    four = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    assert coordinate_weighted_median(four, torch.ones(4)).item() == 2.0
    with pytest.raises(ValueError):
        coordinate_weighted_median(four, torch.zeros(4))


def test_gossip_weights() -> None:
    p = history_gossip_weights([1, 2, 3, 4])
    assert_close(p.sum(), torch.tensor(1.0, dtype=torch.float64))
    ratios = (p / p[0]).tolist()
    assert [round(r, 3) for r in ratios] == [1.0, 0.449, 0.202, 0.091]
    assert history_gossip_weights([]).numel() == 0
    with pytest.raises(ConfigError):
        history_gossip_weights([1], lam=0.0)
    with pytest.raises(ValueError):
        history_gossip_weights([0, 1])


# --- similarity weights ---------------------------------------------------------------------


def test_similarity_weights_edge_cases() -> None:
    assert similarity_weights(torch.zeros(0, 4)).numel() == 0
    assert similarity_weights(torch.ones(1, 4)).tolist() == [1.0]
    # All histories pointing the same way: no one can be told apart, every weight is 0.
    assert similarity_weights(torch.ones(3, 4)).tolist() == [0.0, 0.0, 0.0]
    # Zero histories (nothing learnt yet) are dissimilar to everything.
    assert similarity_weights(torch.zeros(3, 4)).tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError):
        similarity_weights(torch.tensor([[math.nan, 0.0]]))
    with pytest.raises(ValueError):
        similarity_weights(torch.zeros(3))


def test_kappa_scales_the_logit() -> None:
    h = torch.tensor([[1.0, 0.0], [0.6, 0.8], [-0.6, 0.8]])
    base = similarity_weights(h)
    assert 0.0 < float(base[0]) < 0.5 and float(base[2]) == 1.0
    soft, sharp = similarity_weights(h, kappa=0.2), similarity_weights(h, kappa=5.0)
    assert_close(soft[:2], base[:2] * 0.2)  # κ scales the unclipped logit
    assert float(soft[2]) == 1.0  # α = 1 maps to +inf, whatever κ
    assert sharp.tolist() == [1.0, 1.0, 1.0]


# --- bookkeeping ----------------------------------------------------------------------------


def test_histories_accumulate_updates_without_the_initial_model() -> None:
    own = torch.zeros(3)
    ctx = MergeContext(senders=(node(1),), rounds=(1,))
    call("foolsgold", own, [torch.tensor([5.0, 5.0, 5.0])], ctx)
    table = history_table(ctx.state)
    assert torch.equal(table.direct[node(1)].history, torch.zeros(3))
    ctx2 = MergeContext(senders=(node(1),), rounds=(2,), state=ctx.state)
    call("foolsgold", own, [torch.tensor([6.0, 5.0, 4.0])], ctx2)
    assert torch.equal(table.direct[node(1)].history, torch.tensor([1.0, 0.0, -1.0]))
    # An older round does not rewind the history.
    stale = MergeContext(senders=(node(1),), rounds=(1,), state=ctx.state)
    call("foolsgold", own, [torch.tensor([0.0, 0.0, 0.0])], stale)
    assert torch.equal(table.direct[node(1)].history, torch.tensor([1.0, 0.0, -1.0]))


def test_own_baseline_counts_the_first_model_against_own() -> None:
    ctx = MergeContext(senders=(node(1),))
    call("sybilwall", torch.ones(3), [torch.tensor([3.0, 1.0, 0.0])], ctx, baseline="own")
    assert torch.equal(history_table(ctx.state).direct[node(1)].history, torch.tensor([2, 0, -1.0]))


def test_record_distant_history_rules() -> None:
    state: dict[str, object] = {}
    h = torch.tensor([1.0, 2.0])
    assert record_distant_history(state, node(5), 3, 1, h)
    table = state[STATE_KEY]
    assert isinstance(table, HistoryTable)
    assert table.distant[node(5)].distance == 2
    assert not record_distant_history(state, node(5), 3, 1, h * 2)  # not newer
    assert record_distant_history(state, node(5), 4, 2, h * 2)
    assert table.distant[node(5)].distance == 3 and table.distant[node(5)].round == 4
    assert not record_distant_history(state, node(6), 1, 1, torch.tensor([math.nan, 0.0]))
    assert not record_distant_history(state, node(6), 1, 0, h)
    assert not record_distant_history(state, node(6), 1, 1, torch.ones(2, 2))
    # Direct neighbours' records are never overwritten by gossip.
    ctx = MergeContext(senders=(node(1),), state=state)
    call("sybilwall", torch.zeros(2), [torch.ones(2)], ctx)
    assert not record_distant_history(state, node(1), 99, 1, h)
    h[0] = 100.0  # the stored copy is not an alias
    assert table.distant[node(5)].history[0] == 2.0


def test_state_holding_something_else_is_reported() -> None:
    ctx = MergeContext(senders=(node(1),), state={STATE_KEY: "oops"})
    with pytest.raises(TypeError):
        call("sybilwall", torch.zeros(2), [torch.ones(2)], ctx)


# --- behaviour against Sybils ---------------------------------------------------------------


def run_sybil_rounds(name: str, rounds: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Two honest peers with independent updates and three Sybils sending one model."""
    gen = torch.Generator().manual_seed(7)
    size = 50
    own = torch.zeros(size)
    honest = [torch.zeros(size), torch.zeros(size)]
    sybil = torch.zeros(size)
    direction = torch.randn(size, generator=gen)
    state: dict[str, object] = {}
    senders = tuple(node(i) for i in range(1, 6))
    out = own
    for r in range(rounds):
        honest = [h + torch.randn(size, generator=gen) for h in honest]
        sybil = sybil + direction
        rows = [honest[0], honest[1], sybil, sybil, sybil]
        ctx = MergeContext(senders=senders, rounds=(r,) * 5, state=state)
        out = call(name, own, rows, ctx)
    expected = (honest[0] + honest[1] + own) / 3
    return out, expected


def test_sybils_get_zero_weight() -> None:
    for name in ("foolsgold", "sybilwall"):
        out, expected = run_sybil_rounds(name)
        assert_close(out, expected)


def test_sybilwall_median_keeps_the_strongest_half() -> None:
    out, _ = run_sybil_rounds("sybilwall_median")
    # Five senders: the two honest ones are kept, the median of three is the middle value.
    gen = torch.Generator().manual_seed(7)
    size = 50
    honest = [torch.zeros(size), torch.zeros(size)]
    torch.randn(size, generator=gen)
    for _ in range(4):
        honest = [h + torch.randn(size, generator=gen) for h in honest]
    expected = torch.median(torch.stack([torch.zeros(size), *honest]), dim=0).values
    assert_close(out, expected)


def test_sybilwall_weighted_median_ignores_zero_weight_sybils() -> None:
    out, _ = run_sybil_rounds("sybilwall_weighted_median")
    gen = torch.Generator().manual_seed(7)
    size = 50
    honest = [torch.zeros(size), torch.zeros(size)]
    torch.randn(size, generator=gen)
    for _ in range(4):
        honest = [h + torch.randn(size, generator=gen) for h in honest]
    expected = torch.median(torch.stack([torch.zeros(size), *honest]), dim=0).values
    assert_close(out, expected)


# --- contract -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", RULES)
def test_contract_purity_dtype_nan_and_order(name: str) -> None:
    gen = torch.Generator().manual_seed(3)
    own = torch.randn(2, 5, generator=gen)
    rows = torch.randn(4, 2, 5, generator=gen)
    rows[2, 0, 1] = math.nan
    senders = tuple(node(i) for i in range(1, 5))
    before = (own.clone(), rows.clone())
    first = torch.randn(4, 2, 5, generator=gen)

    def run(order: list[int]) -> torch.Tensor:
        state: dict[str, object] = {}
        rule = make_merge_rule(name)
        sent = tuple(senders[i] for i in order)
        rule(own, first[order], torch.ones(4), MergeContext(senders=sent, state=state))
        return rule(own, rows[order], torch.ones(4), MergeContext(senders=sent, state=state))

    out = run([0, 1, 2, 3])
    assert out.shape == own.shape and out.dtype == own.dtype
    assert bool(torch.isfinite(out).all())
    assert_close(out, run([3, 1, 0, 2]))
    assert torch.equal(own, before[0])
    assert_close(rows, before[1], tol=0.0)
    # The NaN row never entered the histories.
    state: dict[str, object] = {}
    make_merge_rule(name)(own, rows, torch.ones(4), MergeContext(senders=senders, state=state))
    assert node(3) not in history_table(state).direct
    # Stateless (no senders) is order-invariant too.
    rule = make_merge_rule(name)
    a = rule(own, rows, torch.ones(4), MergeContext())
    b = rule(own, rows[[3, 1, 0, 2]], torch.ones(4), MergeContext())
    assert_close(a, b)
    # Only a NaN row from a known sender: nothing to weigh, own comes back.
    lone = rule(own, rows[2:3], torch.ones(1), MergeContext(senders=(node(3),)))
    assert torch.equal(lone, own)
    # Nothing received: a copy of own.
    empty = rule(own, torch.zeros(0, 10), torch.zeros(0), MergeContext())
    assert torch.equal(empty, own) and empty.data_ptr() != own.data_ptr()


def test_float64_and_shape_errors() -> None:
    own = torch.zeros(4, dtype=torch.float64)
    out = call("sybilwall", own, [torch.ones(4, dtype=torch.float64)], MergeContext())
    assert out.dtype == torch.float64
    rule = make_merge_rule("sybilwall")
    with pytest.raises(ValueError):
        rule(own, torch.zeros(2, 3), torch.ones(2), MergeContext())
    with pytest.raises(ValueError):
        rule(own, torch.zeros(2, 4), torch.ones(3), MergeContext())
    with pytest.raises(ValueError):
        rule(own, torch.zeros(2, 4), torch.ones(2), MergeContext(senders=(node(1),)))
