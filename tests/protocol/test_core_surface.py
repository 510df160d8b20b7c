"""The core surface every mode shares: the leave event, ``idle``, the loss a checkpoint
carries, and one sequence counter for everything a node sends."""

from __future__ import annotations

import itertools

import pytest
import torch

from p2pfl.errors import LocalProtocolError
from p2pfl.protocol import (
    PROTOCOL_MODES,
    Action,
    CoreConfig,
    DeadlineReached,
    LeaveRequested,
    SaveCheckpoint,
    Send,
    Started,
    StartTraining,
    Stop,
    TrainingFinished,
    mode_traits,
    model_kinds,
)
from p2pfl.testing.network import FakeNetwork, FakeNode
from p2pfl.wire import Envelope, MessageKind

from .single import NEIGHBOURS, SIZE, make_single, sealed


def trained(loss: float) -> TrainingFinished:
    return TrainingFinished(torch.ones(SIZE), loss=loss, steps=1)


@pytest.mark.parametrize("mode", ["dsgd", "gossip"])
def test_leaving_while_training_stops_and_drops_the_training_result(mode: str) -> None:
    single = make_single(mode)
    core = single.core
    assert any(isinstance(a, StartTraining) for a in core.handle(Started(), now=0.0))
    actions = core.handle(LeaveRequested(), now=1.0)
    assert [type(a) for a in actions] == [Stop] and core.finished
    assert core.next_deadline() is None and not core.idle
    # the training outstanding at the leave may still be reported: dropped, once
    assert core.handle(trained(0.5), now=2.0) == []
    with pytest.raises(LocalProtocolError):
        core.handle(trained(0.5), now=3.0)
    assert core.handle(LeaveRequested(), now=4.0) == []  # gone already
    neighbour = NEIGHBOURS[0]
    late = sealed(single.peers[neighbour], seq=1, round=0)
    assert single.receive(neighbour, late, now=5.0) == []


@pytest.mark.parametrize("mode", sorted(PROTOCOL_MODES))
def test_every_mode_leaves_before_it_started(mode: str) -> None:
    overrides: dict[str, object] = {}
    if mode == "fedavg":
        overrides["server"] = make_single("dsgd").peers[NEIGHBOURS[0]].node_id.hex()
    core = make_single(mode, **overrides).core
    actions = core.handle(LeaveRequested(), now=0.0)
    assert isinstance(actions[-1], Stop) and core.finished
    assert not any(isinstance(a, StartTraining) for a in actions)


def test_idle_means_started_not_training_no_timer_not_finished() -> None:
    core = make_single("dsgd", rounds=2, round_timeout=5.0).core
    assert not core.idle  # not started
    core.handle(Started(), now=0.0)
    assert not core.idle  # training
    core.handle(trained(0.25), now=1.0)
    assert core.next_deadline() == 6.0 and not core.idle  # collecting, the timeout armed

    # modest: a node outside the first sample waits with no timer: idle
    net = SeqNetwork(12)
    net.start()
    net.run(until=0.0)
    idle = [node.core.idle for node in net.nodes.values()]
    assert 0 < sum(idle) < 12  # the first sample trains, the others wait
    for index, node in net.nodes.items():
        training = any(isinstance(a, StartTraining) for a in net.asked.get(index, []))
        waiting = node.core.next_deadline() is None and not node.core.finished
        assert node.core.idle == (waiting and not training)


class SeqNetwork(FakeNetwork):
    """``n`` modest nodes that all know each other, noting what each core asked for."""

    def __init__(self, n: int) -> None:
        config = CoreConfig(
            mode="modest", rounds=3, sample_size=3, aggregators=1, min_models=2, local_steps=1
        )
        super().__init__(
            n,
            itertools.combinations(range(n), 2),
            config,
            vectors=[torch.zeros(SIZE)] * n,
            announce_links=False,
        )
        self.sent: dict[int, list[Envelope]] = {}
        self.asked: dict[int, list[Action]] = {}

    def carry_out(self, node: FakeNode, action: Action) -> None:
        self.asked.setdefault(node.index, []).append(action)
        if isinstance(action, Send):
            envelopes = self.sent.setdefault(node.index, [])
            if not envelopes or envelopes[-1] is not action.envelope:
                envelopes.append(action.envelope)
        super().carry_out(node, action)


def test_a_checkpoint_carries_the_loss_of_the_training_before_it() -> None:
    single = make_single("dsgd", rounds=3, round_timeout=5.0)
    core = single.core
    core.handle(Started(), now=0.0)
    core.handle(trained(0.25), now=1.0)
    actions = core.handle(DeadlineReached(), now=6.0)  # round 0 closes by its timeout
    saved = [a for a in actions if isinstance(a, SaveCheckpoint)]
    assert [(s.round, s.loss) for s in saved] == [(1, 0.25)]


def test_one_counter_numbers_every_message_a_modest_node_sends() -> None:
    """Pings, pongs, models, acks and announcements alike: per sender, strictly increasing."""
    net = SeqNetwork(10)
    net.start()
    net.run()
    assert max(node.core.round for node in net.nodes.values()) == 3
    for envelopes in net.sent.values():
        seqs = [envelope.seq for envelope in envelopes]
        assert seqs == sorted(set(seqs)), seqs
    kinds = [{envelope.kind for envelope in envelopes} for envelopes in net.sent.values()]
    assert max(len(k) for k in kinds) >= 4  # several kinds from one sender, one counter


def test_modes_declare_the_kinds_that_carry_their_models() -> None:
    assert mode_traits("dsgd").model_kinds == {MessageKind.MODEL_UPDATE}
    assert mode_traits("modest").model_kinds == {
        MessageKind.MODEST_TRAINED,
        MessageKind.MODEST_AGGREGATE,
    }
    kinds = model_kinds()
    assert MessageKind.MODEL_UPDATE in kinds and MessageKind.MODEST_AGGREGATE in kinds
    assert MessageKind.HISTORY not in kinds and MessageKind.MODEST_PING not in kinds
