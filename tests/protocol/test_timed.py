"""Time-triggered gossip merging (p2pfl.protocol.timed): the weights and the core's clock."""

from __future__ import annotations

import pytest
import torch

from p2pfl.protocol import DeadlineReached, Send, Started, StartTraining, TrainingFinished
from p2pfl.protocol.messages import ModelUpdate
from p2pfl.protocol.timed import TimedMerging
from p2pfl.testing.network import identity_of

from .single import SIZE, make_single, sealed

A, B = identity_of(1).node_id, identity_of(2).node_id


def _update(sender: object, samples: int, seq: int = 0) -> ModelUpdate:
    return ModelUpdate(sender, seq, 0, samples, 2, torch.zeros(SIZE), bytes(32))  # type: ignore[arg-type]


def test_weights_are_share_times_arrivals_over_the_expected_arrivals() -> None:
    timed = TimedMerging(1.0)
    timed.begin(0.0)
    for update in (_update(A, 30), _update(A, 30, 1), _update(B, 60)):
        timed.arrived(update)
    assert timed.due(1.0) and not timed.due(1.5)
    # shares 0.3 and 0.6 of 100; A came twice in its expected 2 per tick, B once in 1
    weights, own = timed.weights([_update(A, 30, 1), _update(B, 60)], 1.0, own_samples=10)
    assert weights == pytest.approx([0.3, 0.6]) and own == pytest.approx(0.1)
    timed.arrived(_update(B, 60, 1))
    assert timed.due(2.0)
    # B: 2 arrivals in 2 s is 1 per tick, and it came once: its share again
    weights, own = timed.weights([_update(B, 60, 1)], 2.0, own_samples=10)
    assert weights == pytest.approx([0.6]) and own == pytest.approx(0.4)
    assert timed.applied[B] == pytest.approx(1.2) and timed.ticks == 2
    # the count-triggered rule would have given n_j / (own + senders merged)
    assert timed.plain[A] == pytest.approx(0.3) and timed.plain[B] == pytest.approx(0.6 + 60 / 70)


def test_a_capped_tick_owes_the_rest_to_the_next_arrival() -> None:
    timed = TimedMerging(1.0)
    timed.begin(0.0)
    timed.arrived(_update(A, 10))
    timed.arrived(_update(B, 80))
    assert timed.due(1.0)
    # shares 0.1 and 0.8, one arrival each in one expected: weights 0.1 + 0.8, own 0.1
    weights, own = timed.weights([_update(A, 10), _update(B, 80)], 1.0, own_samples=10)
    assert weights == pytest.approx([0.1, 0.8]) and own == pytest.approx(0.1)
    assert timed.due(4.0) and timed.ticks == 4  # a late wake-up counts every interval
    timed.arrived(_update(B, 80, 1))
    # B: 2 arrivals in 4 s, so 0.5 expected per tick; this one weighs 0.8 / 0.5 = 1.6 > 1
    weights, own = timed.weights([_update(B, 80, 1)], 4.0, own_samples=10)
    assert weights == pytest.approx([1.0]) and own == 0.0 and timed.clipped == 1
    timed.arrived(_update(B, 80, 2))
    assert timed.due(5.0)
    # next time B is owed the 0.6 it could not get: 0.8 * 5 / 3 + 0.6, capped again at 1
    weights, _ = timed.weights([_update(B, 80, 2)], 5.0, own_samples=10)
    assert weights == pytest.approx([1.0]) and timed.clipped == 2
    timed.arrived(_update(B, 80, 3))
    timed.arrived(_update(B, 80, 4))
    timed.arrived(_update(A, 10, 1))
    assert timed.due(6.0)
    weights, own = timed.weights([_update(A, 10, 1), _update(B, 80, 4)], 6.0, own_samples=10)
    # B owed 0.8 * 5 / 3 + 0.6 - 1 = 0.933...; now 0.8 * 2 * 6 / 5 = 1.92 more: capped, paid
    # in proportion; over the run B got 0.8 + 1 + 1 + its part of this tick
    assert sum(weights) == pytest.approx(1.0) and timed.clipped == 3
    assert timed.applied[B] == pytest.approx(2.8 + weights[1])


def test_the_core_merges_on_its_clock_and_keeps_merges_made_while_training() -> None:
    single = make_single(
        "gossip", merge_trigger="time", merge_interval=1.0, fanout=3, period=0.1, rounds=3
    )
    core = single.core
    actions = core.handle(Started(), now=0.0)
    assert [type(a) for a in actions] == [StartTraining] and core.next_deadline() == 1.0
    start = core.vector
    update = sealed(single.peers[1], seq=0, round=0, vector=torch.full((SIZE,), 6.0))
    assert single.receive(1, update, now=0.5) == []  # buffered, not merged on receipt
    assert torch.equal(core.vector, start)
    assert core.handle(DeadlineReached(), now=1.0) == []
    merged = core.vector.clone()
    assert not torch.equal(merged, start) and core.next_deadline() == 2.0
    actions = core.handle(TrainingFinished(start + 1.0, 0.2, 10), now=1.5)
    # the training's step lands on top of the tick's merge, then the model goes out
    torch.testing.assert_close(core.vector, merged + 1.0)
    sends = [a for a in actions if isinstance(a, Send)]
    assert len(sends) == 3 and isinstance(actions[-1], StartTraining)
    # no merge since it started: the training's result is taken as is; no push within
    # period * (1 - period_jitter) of the last one
    trained = torch.full((SIZE,), 9.0)
    actions = core.handle(TrainingFinished(trained, 0.1, 10), now=1.52)
    assert torch.equal(core.vector, trained)
    assert not [a for a in actions if isinstance(a, Send)]
    # nothing arrived: a tick changes nothing
    assert core.handle(DeadlineReached(), now=2.0) == [] and torch.equal(core.vector, trained)
    actions = core.handle(TrainingFinished(trained, 0.1, 10), now=3.0)
    assert core.finished and core.next_deadline() is None
