"""dsgd with ``gossip_steps = Q`` (DFedSAM-MGS): Q exchanges and merges per round."""

from __future__ import annotations

import pytest
import torch

from p2pfl.errors import ConfigError
from p2pfl.protocol import (
    CoreConfig,
    DeadlineReached,
    Emit,
    SaveCheckpoint,
    Send,
    Started,
    StartTraining,
    TrainingFinished,
)
from p2pfl.testing import FakeNetwork

from .single import SIZE, make_single, sealed


def _sends(actions: list[object]) -> list[Send]:
    return [action for action in actions if isinstance(action, Send)]


def test_a_round_runs_q_exchanges_numbered_round_times_q_plus_step() -> None:
    single = make_single("dsgd", rounds=2, round_timeout=10.0, gossip_steps=3)
    core = single.core
    core.handle(Started(), now=0.0)
    sends = _sends(core.handle(TrainingFinished(torch.full((SIZE,), 3.0), 0.5, 10), now=1.0))
    assert {send.envelope.round for send in sends} == {0} and len(sends) == 3
    values = {1: 7.0, 2: 11.0, 3: 15.0}
    own = 3.0
    for step in range(3):
        actions: list[object] = []
        for peer, value in values.items():
            update = sealed(
                single.peers[peer], seq=step, round=step, vector=torch.full((SIZE,), value)
            )
            actions = single.receive(peer, update, now=2.0 + step)
        own = (own + sum(values.values())) / 4
        if step < 2:
            # the step's merged model goes out as the next exchange; no round closes yet
            sends = _sends(actions)
            assert len(sends) == 3 and {send.envelope.round for send in sends} == {step + 1}
            assert core.round == 0 and not [a for a in actions if isinstance(a, Emit)]
            assert core.next_deadline() == 2.0 + step + 10.0
    emit, checkpoint, train = actions
    assert isinstance(emit, Emit) and isinstance(checkpoint, SaveCheckpoint)
    assert isinstance(train, StartTraining) and train.round == 1 and core.round == 1
    torch.testing.assert_close(train.vector, torch.full((SIZE,), own))
    assert emit.fields["received"] == 9 and emit.fields["expected"] == 9
    assert emit.fields["timed_out"] == 0
    # round 1 is exchanges 3, 4, 5: a model for exchange 4 is buffered while training
    early = sealed(single.peers[1], seq=9, round=4)
    assert single.receive(1, early, now=6.0) == []
    sends = _sends(core.handle(TrainingFinished(torch.zeros(SIZE), 0.1, 10), now=7.0))
    assert {send.envelope.round for send in sends} == {3}
    # nobody answers: each step times out after round_timeout, then the round closes
    assert _sends(core.handle(DeadlineReached(), now=17.0))[0].envelope.round == 4
    assert _sends(core.handle(DeadlineReached(), now=27.0))[0].envelope.round == 5
    actions = core.handle(DeadlineReached(), now=37.0)
    record = next(a for a in actions if isinstance(a, Emit))
    assert record.fields["timed_out"] == 1 and record.fields["received"] == 1
    assert core.finished


def test_models_ahead_are_buffered_by_rounds_not_exchanges() -> None:
    single = make_single("dsgd", rounds=10, max_rounds_ahead=1, gossip_steps=2)
    single.core.handle(Started(), now=0.0)
    peer = single.peers[1]
    assert single.receive(1, sealed(peer, seq=0, round=3)) == []  # round 1, step 1: kept
    conflict = single.receive(1, sealed(peer, seq=1, round=3, vector=torch.ones(SIZE)))
    assert len(conflict) == 1  # kept, so a different second copy is a fault
    assert single.receive(1, sealed(peer, seq=2, round=4)) == []  # round 2: dropped
    assert single.receive(1, sealed(peer, seq=3, round=4, vector=torch.ones(SIZE))) == []


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_a_ring_round_applies_the_mixing_matrix_q_times(steps: int) -> None:
    n = 6
    edges = [(i, (i + 1) % n) for i in range(n)]
    start = torch.arange(n, dtype=torch.float32).pow(2).unsqueeze(1).repeat(1, 3)
    config = CoreConfig(mode="dsgd", rounds=1, local_steps=1, gossip_steps=steps)
    net = FakeNetwork(n, edges, config, vectors=list(start), merge="mean", train=lambda v: v)
    net.start()
    net.run()
    mixing = torch.zeros(n, n)
    for i in range(n):
        for j in (i - 1, i, i + 1):
            mixing[i, j % n] = 1 / 3
    expected = torch.linalg.matrix_power(mixing, steps) @ start
    for i, node in net.nodes.items():
        assert node.core.finished and not node.misbehaved
        torch.testing.assert_close(node.core.vector, expected[i])
        assert node.records[0]["received"] == 2 * steps


@pytest.mark.parametrize(
    ("overrides", "allowed"),
    [
        ({"gossip_steps": 0}, "an integer in [1, 1000]"),
        ({"gossip_steps": 1001}, "an integer in [1, 1000]"),
        ({"gossip_steps": 2, "mode": "gossip"}, "1 unless mode is dsgd"),
    ],
)
def test_bad_gossip_steps_name_the_key(overrides: dict[str, object], allowed: str) -> None:
    with pytest.raises(ConfigError, match=r"^protocol\.gossip_steps = ") as info:
        CoreConfig(**overrides)
    assert allowed in str(info.value)
