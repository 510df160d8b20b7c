"""Bristle: output-layer-only, per-class integration driven by a recall probe."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from p2pfl.errors import ConfigError, LocalProtocolError
from p2pfl.identity import NodeId
from p2pfl.merge import MERGE_RULES, BristleContextError, MergeContext, make_merge_rule
from p2pfl.merge.base import Probe
from p2pfl.merge.bristle import CLASS_COUNTS_KEY, integration_weights, output_layer
from p2pfl.params import ParamLayout

LAYOUT = ParamLayout.from_shapes(
    [("body.weight", (4, 4)), ("body.bias", (4,)), ("head.weight", (3, 4)), ("head.bias", (3,))]
)
HEAD = slice(20, 32)  # head.weight [3, 4] then head.bias [3]


def node(i: int) -> NodeId:
    return NodeId(bytes([i]) * 32)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, tol: float = 1e-5) -> None:
    """``torch.testing.assert_close`` without its multi-second first-call import."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (actual, expected)
    assert torch.allclose(actual, expected, rtol=tol, atol=tol, equal_nan=True), (actual, expected)


def vector(head: torch.Tensor, body: torch.Tensor | None = None) -> torch.Tensor:
    body = torch.eye(4) if body is None else body
    return torch.cat([body.reshape(-1), torch.zeros(4), head.reshape(-1), torch.zeros(3)])


def make_probe(classes: tuple[int, ...] = (0, 1, 2)) -> Probe:
    """Recall per class of a flat vector on blobs at 3·e_c; NaN for classes with no data."""
    gen = torch.Generator().manual_seed(0)
    xs, ys = [], []
    for c in classes:
        centre = torch.zeros(4)
        centre[c] = 3.0
        xs.append(centre + 0.3 * torch.randn(20, 4, generator=gen))
        ys.append(torch.full((20,), c))
    x, y = torch.cat(xs), torch.cat(ys)

    def probe(flat: torch.Tensor) -> torch.Tensor:
        flat = flat.to(torch.float32)
        body_w, body_b = flat[:16].reshape(4, 4), flat[16:20]
        head_w, head_b = flat[20:32].reshape(3, 4), flat[32:35]
        pred = ((x @ body_w.T + body_b) @ head_w.T + head_b).argmax(dim=1)
        recall = torch.full((3,), math.nan)
        for c in classes:
            recall[c] = (pred[y == c] == c).float().mean()
        return recall

    return probe


GOOD = torch.cat([torch.eye(3), torch.zeros(3, 1)], dim=1)  # head row c picks feature c


def merge(
    own: torch.Tensor,
    rows: list[torch.Tensor],
    *,
    probe: Probe | None = None,
    state: dict[str, object] | None = None,
    senders: tuple[NodeId, ...] | None = None,
    **params: Any,
) -> torch.Tensor:
    ctx = MergeContext(
        senders=senders if senders is not None else tuple(node(i + 1) for i in range(len(rows))),
        layout=LAYOUT,
        probe=probe if probe is not None else make_probe(),
        state=state if state is not None else {},
    )
    return make_merge_rule("bristle", **params)(own, torch.stack(rows), torch.ones(len(rows)), ctx)


def test_registered_with_validated_parameters() -> None:
    assert "bristle" in MERGE_RULES
    assert make_merge_rule("bristle").name == "bristle"
    for param, value in [
        ("exploitation", 0),
        ("exploration", -1),
        ("min_screening", 1.5),
        ("seed", "x"),
        ("exploitation", True),
    ]:
        with pytest.raises(ConfigError) as info:
            make_merge_rule("bristle", **{param: value})
        assert info.value.key == f"merge.{param}"


def test_needs_probe_and_layout() -> None:
    rule = make_merge_rule("bristle")
    own = vector(GOOD)
    with pytest.raises(BristleContextError, match="probe") as info:
        rule(own, own[None], torch.ones(1), MergeContext(layout=LAYOUT))
    assert isinstance(info.value, ValueError) and isinstance(info.value, LocalProtocolError)
    with pytest.raises(BristleContextError, match="layout"):
        rule(own, own[None], torch.ones(1), MergeContext(probe=make_probe()))
    flat_only = ParamLayout.from_shapes([("w", (35,))])
    with pytest.raises(BristleContextError):
        rule(own, own[None], torch.ones(1), MergeContext(layout=flat_only, probe=make_probe()))
    with pytest.raises(ValueError, match="recalls"):
        merge(own, [own], probe=lambda v: torch.ones(2))


def test_output_layer_is_last_linear() -> None:
    weight, bias = output_layer(LAYOUT)
    assert weight.name == "head.weight" and bias is not None and bias.name == "head.bias"


def test_identical_peer_gets_positive_weight() -> None:
    r = torch.tensor([0.9, 0.8, 1.0], dtype=torch.float64)
    w = integration_weights(r, r[None, :])
    certainty = 0.9 - float(r.std(unbiased=False))
    assert_close(w, torch.full((1, 3), certainty, dtype=torch.float64))
    # Through the rule: merging an identical model changes nothing.
    own = vector(GOOD)
    out = merge(own, [own.clone()])
    assert_close(out, own)


def test_score_formula_by_hand() -> None:
    r_own = torch.tensor([0.8, 0.6, 1.0], dtype=torch.float64)
    r_peer = torch.tensor([[0.9, 0.6, 1.0]], dtype=torch.float64)
    w = integration_weights(r_own, r_peer)
    mean = (0.9 + 0.6 + 1.0) / 3
    std = math.sqrt(((0.9 - mean) ** 2 + (0.6 - mean) ** 2 + (1.0 - mean) ** 2) / 3)
    certainty = mean - std
    diff = 10 * abs(0.8 - 0.9)
    better = (10 / (1 + math.exp(-(diff ** (3 + 0.8)) / 100)) - 4) * certainty
    equal = (10 * 0.5 - 4) * certainty  # score 0 gives weight 1·certainty
    assert_close(w[0], torch.tensor([better, equal, equal], dtype=torch.float64))


def test_far_worse_class_gets_zero_weight() -> None:
    r_own = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    r_peer = torch.tensor([[0.0, 1.0, 1.0]], dtype=torch.float64)
    w = integration_weights(r_own, r_peer)
    assert float(w[0, 0]) == 0.0
    assert float(w[0, 1]) > 0.0 and float(w[0, 2]) > 0.0
    # Through the rule: the peer's head row 0 is reversed, so its class-0 recall is 0;
    # its rows 1 and 2 are good (and different from ours), so they are integrated.
    own = vector(GOOD)
    peer_head = GOOD * 1.5
    peer_head[0] = -GOOD[0]
    out = merge(own, [vector(peer_head)])
    assert_close(out[20:24], own[20:24])  # class 0 untouched
    assert not torch.equal(out[24:28], own[24:28])  # class 1 integrated
    assert bool((out[24:28] >= own[24:28]).all()) and bool((out[24:28] <= 1.5).all())


def test_sequential_attack_penalty_grows_along_the_peer_order() -> None:
    r_own = torch.tensor([0.9, 0.9], dtype=torch.float64)
    r_peer = torch.tensor([[0.8, 0.9], [0.8, 0.9]], dtype=torch.float64)
    w = integration_weights(r_own, r_peer)
    certainty = 0.85 - 0.05
    diff = 10 * (0.9 - 0.8)
    first = -(diff ** (4 + 0.9))
    second = first * (1 + 2 * (0.9 - 0.8))
    expected = [(10 / (1 + math.exp(-s / 100)) - 4) * certainty for s in (first, second)]
    assert_close(w[:, 0], torch.tensor(expected, dtype=torch.float64))
    assert float(w[1, 0]) < float(w[0, 0])


def test_declared_class_count_selects_top_classes() -> None:
    r_own = torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64)
    r_peer = torch.tensor([[0.2, 0.9, 0.5]], dtype=torch.float64)
    w = integration_weights(r_own, r_peer, [1])
    assert float(w[0, 0]) == 0.0 and float(w[0, 2]) == 0.0 and float(w[0, 1]) > 0.0
    # The same through ctx.state.
    own = vector(GOOD)
    peer = vector(GOOD * 1.2)
    state: dict[str, object] = {CLASS_COUNTS_KEY: {node(1): 3}}
    assert not torch.equal(merge(own, [peer], state=state), own)


def test_foreign_classes_use_the_peer_weight() -> None:
    probe = make_probe(classes=(0, 1))  # no local examples of class 2: it is foreign
    own = vector(GOOD)
    peer_head = GOOD.clone()
    peer_head[2] = torch.tensor([0.0, 0.0, 2.0, 0.5])
    out = merge(own, [vector(peer_head)], probe=probe)
    # Own classes 0 and 1 are identical; peer weight W_p = (10σ(0) − 4)·certainty = 1.
    assert_close(out[20:28], own[20:28])
    assert_close(out[28:32], (own[28:32] + peer_head[2]) / 2)


def test_only_the_output_layer_changes() -> None:
    own = vector(GOOD)
    peer = vector(GOOD * 1.3, body=torch.eye(4) * 2 + 0.1)
    before = (own.clone(), peer.clone())
    out = merge(own, [peer])
    assert out.shape == own.shape and out.dtype == own.dtype
    assert torch.equal(out[:20], own[:20])
    assert not torch.equal(out[HEAD], own[HEAD])
    assert torch.equal(own, before[0]) and torch.equal(peer, before[1])
    own64 = own.to(torch.float64)
    assert merge(own64, [peer.to(torch.float64)]).dtype == torch.float64


def test_non_finite_rows_are_left_out() -> None:
    own = vector(GOOD)
    bad = vector(GOOD * 1.3)
    bad[25] = math.nan
    good = vector(GOOD * 1.3)
    out = merge(own, [good, bad])
    assert_close(out, merge(own, [good]))
    assert bool(torch.isfinite(out).all())


def test_prioritiser_keeps_the_closest() -> None:
    own = vector(GOOD)
    near, far = vector(GOOD * 1.1), vector(GOOD * 3.0)
    only_near = merge(own, [near], exploitation=1, exploration=0)
    both = merge(own, [far, near], exploitation=1, exploration=0)
    assert_close(both, only_near)
    assert not torch.equal(merge(own, [far, near], exploitation=2), only_near)


def test_padding_with_older_models_only_ranks() -> None:
    own = vector(GOOD)
    state: dict[str, object] = {}
    senders = (node(1), node(2), node(3))
    merge(own, [own.clone()] * 3, state=state, senders=senders, exploitation=2, exploration=0)
    new = vector(GOOD * 1.2)
    # Three older models at distance 0 take both exploitation places: nothing is integrated.
    padded = merge(
        own, [new], state=state, senders=(node(4),), exploitation=2, exploration=0, min_screening=5
    )
    assert torch.equal(padded, own)
    unpadded = merge(own, [new], senders=(node(4),), exploitation=2, exploration=0)
    assert not torch.equal(unpadded, own)


def test_deterministic_and_order_invariant_with_exploration() -> None:
    own = vector(GOOD)
    rows = [vector(GOOD * (1.0 + 0.1 * i)) for i in range(1, 6)]
    senders = tuple(node(i) for i in range(1, 6))

    def run(order: list[int]) -> torch.Tensor:
        return merge(
            own,
            [rows[i] for i in order],
            senders=tuple(senders[i] for i in order),
            exploitation=1,
            exploration=2,
            seed=11,
        )

    first = run([0, 1, 2, 3, 4])
    assert torch.equal(first, run([0, 1, 2, 3, 4]))
    assert_close(first, run([4, 2, 0, 3, 1]))
    # The generator lives in the state and advances: successive draws may differ, but a
    # fresh state always replays the same sequence.
    s1: dict[str, object] = {}
    s2: dict[str, object] = {}
    seq1 = [merge(own, rows, state=s1, exploitation=1, exploration=1) for _ in range(3)]
    seq2 = [merge(own, rows, state=s2, exploitation=1, exploration=1) for _ in range(3)]
    for a, b in zip(seq1, seq2, strict=True):
        assert torch.equal(a, b)
