"""The ``modest`` mode on a fake network: rounds, fail-over, leaving, bounded traffic."""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter
from collections.abc import Iterable

import torch

from p2pfl.identity import Identity
from p2pfl.protocol import Action, CoreConfig, Event, LeaveRequested, Send, Stop
from p2pfl.protocol.committee import ordering
from p2pfl.protocol.modest import ModestCore
from p2pfl.testing.network import FakeNetwork, FakeNode
from p2pfl.wire import MessageKind, encode_frame

FAST = {
    "ping_timeout": 1.0,
    "aggregation_timeout": 5.0,
    "ack_timeout": 8.0,
    "local_steps": 1,
}


def modest(**overrides: object) -> CoreConfig:
    return CoreConfig(mode="modest", **{**FAST, **overrides})  # type: ignore[arg-type]


def key(index: int) -> Identity:
    return Identity.from_seed(hashlib.sha256(b"modest-test/%d" % index).digest())


class CountingNetwork(FakeNetwork):
    """A fake network whose nodes all know each other (the bootstrap view) without any
    ``PeerConnected`` (modest sends to any peer), counting bytes and messages per sender.

    Node keys come from :func:`key`, so any number of nodes works."""

    def __init__(
        self, n: int, config: CoreConfig, *, silent: Iterable[int] = (), seed: int = 0
    ) -> None:
        self.bytes_sent: Counter[int] = Counter()
        self.kinds: Counter[MessageKind] = Counter()
        self.received: Counter[tuple[int, MessageKind]] = Counter()
        super().__init__(
            n,
            itertools.combinations(range(n), 2),
            config,
            vectors=[torch.zeros(4)] * n,
            silent=silent,
            seed=seed,
            identities=[key(i) for i in range(n)],
            announce_links=False,
        )

    def carry_out(self, node: FakeNode, action: Action) -> None:
        if isinstance(action, Send):
            self.bytes_sent[node.index] += len(encode_frame(action.envelope))
            self.kinds[action.envelope.kind] += 1
            self.received[self.index_of[action.peer], action.envelope.kind] += 1
        super().carry_out(node, action)


def final_rounds(net: FakeNetwork) -> dict[int, int]:
    return {i: node.core.round for i, node in net.nodes.items()}


def test_rounds_complete_with_silent_nodes_and_models_follow_the_rounds() -> None:
    net = CountingNetwork(20, modest(rounds=8, sample_size=5), silent=[3, 7, 11])
    net.start()
    net.run()
    rounds = final_rounds(net)
    assert max(rounds.values()) == 8
    finished = [i for i, node in net.nodes.items() if node.core.finished]
    assert len(finished) >= 3
    for i in finished:
        # fake training adds 1 per round and every aggregate is a mean of round-r models
        assert torch.equal(net.nodes[i].core.vector, torch.full((4,), 8.0))
    for node in net.nodes.values():
        saved = [checkpoint.round for checkpoint in node.checkpoints]
        assert saved == sorted(set(saved)), "rounds never go back"
        assert not node.misbehaved
    assert all(node.stopped_at is None or node.core.finished for node in net.nodes.values())


def test_a_dead_aggregator_is_failed_over_after_the_ack_timeout() -> None:
    # The first aggregator (first in ordering 1) answers pings but never aggregates: the
    # models sent to it time out and go to the next candidate.
    config = modest(rounds=6, sample_size=4, min_models=2)
    net = CountingNetwork(12, config)
    first = net.index_of[ordering(net.ids, 1)[0]]
    deaf = net.nodes[first].core
    original = deaf.handle

    def pong_only(event: Event, *, now: float) -> list[Action]:
        actions = original(event, now=now)
        return [
            action
            for action in actions
            if isinstance(action, Send) and action.envelope.kind is MessageKind.MODEST_PONG
        ]

    deaf.handle = pong_only  # type: ignore[method-assign]
    net.start()
    net.run()
    assert net.received[first, MessageKind.MODEST_TRAINED] >= 1
    assert all(rounds < 6 or i != first for i, rounds in final_rounds(net).items())
    assert max(final_rounds(net).values()) == 6
    assert any(node.core.finished for node in net.nodes.values())


def test_a_leaving_aggregator_sends_nacks_and_the_round_goes_on() -> None:
    config = modest(rounds=6, sample_size=4, aggregation_timeout=30.0, min_models=2)
    net = CountingNetwork(12, config)
    net.start()
    # Run until some node holds models as an aggregator, then make it leave.
    holders: list[FakeNode] = []
    for step in range(1, 2_000):
        net.run(until=step * 0.01)
        holders = [
            node
            for node in net.nodes.values()
            if isinstance(node.core, ModestCore) and node.core._aggregations
        ]
        if holders:
            break
    assert holders, "no aggregation ever started"
    leaver = holders[0]
    core = leaver.core
    assert isinstance(core, ModestCore)
    actions = core.handle(LeaveRequested(), now=net.now)
    assert core.finished and isinstance(actions[-1], Stop)
    kinds = Counter(action.envelope.kind.name for action in actions if isinstance(action, Send))
    assert kinds["MODEST_NACK"] >= 1 and kinds["MODEST_MEMBERSHIP"] >= 1
    for action in actions:
        net.carry_out(leaver, action)
    net.run()  # the leaver stays silent: it answers nothing, not even pings
    assert not any(isinstance(a, Send) for _, i, _, a in net.trace if i == leaver.index and a)
    rounds = final_rounds(net)
    assert max(rounds.values()) == 6 and rounds[leaver.index] < 6


def test_traffic_per_node_per_round_does_not_grow_with_the_population() -> None:
    """Messages and bytes per round stay O(s + a) from 50 to 400 nodes (no all-pairs)."""
    s, a, rounds = 4, 2, 6
    per_round: dict[int, tuple[float, float, float]] = {}
    for n in (50, 100, 200, 400):
        config = modest(rounds=rounds, sample_size=s, aggregators=a, announce_join=False)
        net = CountingNetwork(n, config)
        net.start()
        net.run(max_events=1_000_000)
        assert max(final_rounds(net).values()) == rounds
        messages: float = sum(net.kinds.values())
        total_bytes = sum(net.bytes_sent.values())
        busiest = max(net.bytes_sent.values())
        per_round[n] = (messages / rounds, total_bytes / rounds, busiest)
        # each round: s trainers ping a aggregators and send them a model; a aggregators
        # ping s trainers and send them the model, plus acks: a small multiple of s * a.
        assert messages / rounds <= 6 * s * a + 4 * s
    base_messages, base_bytes, base_busiest = per_round[50]
    for n in (100, 200, 400):
        grown = per_round[n]
        assert grown[0] <= 1.5 * base_messages, per_round
        assert grown[1] <= 1.5 * base_bytes, per_round
        assert grown[2] <= 2.0 * base_busiest, per_round


def test_modest_config_errors_name_the_key() -> None:
    import pytest

    from p2pfl.errors import ConfigError

    for field, value in [
        ("sample_size", 0),
        ("aggregators", 0),
        ("success_fraction", 0.0),
        ("success_fraction", 1.5),
        ("min_models", 0),
        ("ping_timeout", 0.0),
        ("aggregation_timeout", float("inf")),
        ("ack_timeout", -1.0),
        ("inactivity_threshold", 0),
        ("view_entries", 257),
        ("view_capacity", 0),
        ("announce_join", 1),
    ]:
        with pytest.raises(ConfigError) as info:
            modest(**{field: value})
        assert info.value.key == f"protocol.{field}"
