"""SybilWall history gossip in the protocol core: origin signatures, the draw, propagation."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import MutableMapping
from typing import Any

import numpy as np
import pytest
import torch

from p2pfl.errors import ConfigError
from p2pfl.identity import NodeId
from p2pfl.merge import MergeContext, history_hook, make_merge_rule
from p2pfl.merge.sybil import STATE_KEY, HistoryTable, history_gossip_weights
from p2pfl.protocol import (
    CoreConfig,
    MessageReceived,
    PeerConnected,
    PeerMisbehaved,
    Send,
    Started,
    TrainingFinished,
    make_core,
)
from p2pfl.protocol.base import BaseCore
from p2pfl.protocol.histories import (
    HeldHistory,
    HistoryGossip,
    SignedHistory,
    seal_history,
    sign_history,
)
from p2pfl.protocol.messages import Sealer
from p2pfl.testing.network import FakeNetwork, identity_of
from p2pfl.wire import Envelope, MessageKind, decode_frame, encode_frame, seal

from .single import ME, NEIGHBOURS, SIZE, STRANGER, make_single

ORIGIN = 7  # a node two hops away, known to the tests only through relays


def core_of(single_core: object) -> BaseCore:
    assert isinstance(single_core, BaseCore)
    return single_core


def signed(origin: int, round: int, value: float = 1.0) -> SignedHistory:
    return sign_history(identity_of(origin), round, torch.full((SIZE,), value))


def relayed(relay: int, record: SignedHistory, *, distance: int, seq: int) -> Envelope:
    """What a relay sends, framed and parsed as a driver would deliver it."""
    sealer = Sealer(identity_of(relay), wire_dtype="float32", samples=0, seq_start=seq)
    envelope = seal_history(sealer, record, distance=distance)
    return decode_frame(bytearray(encode_frame(envelope)))


def receive(core: BaseCore, relay: int, envelope: Envelope, now: float = 0.0) -> list[object]:
    return list(core.handle(MessageReceived(identity_of(relay).node_id, envelope), now=now))


def history_core(**overrides: object) -> BaseCore:
    # SybilWall learns the distant histories (its HistoryHook); the core only relays them.
    single = make_single("dsgd", merge="sybilwall", history_gossip=True, **overrides)  # type: ignore[arg-type]
    return core_of(single.core)


def table_of(core: BaseCore) -> HistoryTable:
    table = core.merge_state.get(STATE_KEY)
    assert table is None or isinstance(table, HistoryTable)
    return table if table is not None else HistoryTable()


def distant(core: BaseCore) -> dict[NodeId, tuple[int, int]]:
    return {origin: (h.round, h.distance) for origin, h in table_of(core).distant.items()}


# -- origin signatures -----------------------------------------------------------------


def test_a_relayed_record_signed_by_its_origin_is_stored_at_distance_plus_one() -> None:
    core = history_core()
    record = signed(ORIGIN, round=3, value=2.0)
    assert receive(core, NEIGHBOURS[0], relayed(NEIGHBOURS[0], record, distance=1, seq=1)) == []
    origin = identity_of(ORIGIN).node_id
    assert distant(core) == {origin: (3, 2)}
    stored = table_of(core).distant[origin].history
    assert torch.equal(stored, torch.full((SIZE,), 2.0))
    gossip = core.history_gossip
    assert gossip is not None
    assert gossip.table[origin].received_from == identity_of(NEIGHBOURS[0]).node_id


def forged_records() -> dict[str, SignedHistory]:
    genuine = signed(ORIGIN, round=3, value=2.0)
    other = sign_history(identity_of(ORIGIN), 3, torch.full((SIZE,), 5.0))
    relay_signed = sign_history(identity_of(NEIGHBOURS[0]), 3, torch.full((SIZE,), 9.0))
    return {
        # the relay signs a history itself and claims it is the origin's
        "signed by the relay": dataclasses.replace(relay_signed, origin=genuine.origin),
        # the origin's signature on other bytes
        "history altered": dataclasses.replace(genuine, payload=other.payload, digest=other.digest),
        "round altered": dataclasses.replace(genuine, round=9),
        "encoding altered": dataclasses.replace(
            genuine, spec=dataclasses.replace(genuine.spec, dtype="float16", shape=(SIZE * 2,))
        ),
        "origin altered": dataclasses.replace(genuine, origin=identity_of(STRANGER).node_id),
    }


@pytest.mark.parametrize("how", sorted(forged_records()))
def test_a_relay_cannot_forge_a_history(how: str) -> None:
    core = history_core()
    record = forged_records()[how]
    if how == "encoding altered":  # same bytes, read as twice as many float16 values
        record = dataclasses.replace(record, spec=dataclasses.replace(record.spec, shape=(SIZE,)))
    actions = receive(core, NEIGHBOURS[0], relayed(NEIGHBOURS[0], record, distance=1, seq=1))
    assert [type(a) for a in actions] == [PeerMisbehaved]
    assert isinstance(actions[0], PeerMisbehaved)
    assert actions[0].peer == identity_of(NEIGHBOURS[0]).node_id
    assert distant(core) == {}
    gossip = core.history_gossip
    assert gossip is not None and gossip.table == {}


def test_inconsistent_distances_and_shapes_are_the_relays_fault() -> None:
    core = history_core()
    a, b = NEIGHBOURS[0], NEIGHBOURS[1]
    cases = [
        relayed(a, signed(ORIGIN, 1), distance=0, seq=1),  # someone else's at distance 0
        relayed(a, signed(a, 1), distance=2, seq=2),  # its own at distance > 0
        relayed(b, sign_history(identity_of(ORIGIN), 1, torch.ones(SIZE + 1)), distance=1, seq=1),
    ]
    for envelope in cases:
        actions = receive(core, _index(envelope), envelope)
        assert [type(x) for x in actions] == [PeerMisbehaved]
    bad_meta = seal(
        identity_of(a),
        MessageKind.HISTORY,
        seq=5,
        round=1,
        payload=signed(ORIGIN, 1).payload,
        spec=signed(ORIGIN, 1).spec,
        meta={"o": b"short", "d": 1, "hs": bytes(64)},
    )
    assert [type(x) for x in receive(core, a, bad_meta)] == [PeerMisbehaved]
    assert distant(core) == {}


def _index(envelope: Envelope) -> int:
    for i in (*NEIGHBOURS, STRANGER):
        if identity_of(i).node_id == envelope.sender:
            return i
    raise AssertionError("unknown sender")


def test_history_from_a_stranger_or_replayed_is_refused() -> None:
    core = history_core()
    record = signed(ORIGIN, 2)
    stranger = relayed(STRANGER, record, distance=1, seq=1)
    assert [type(x) for x in receive(core, STRANGER, stranger)] == [PeerMisbehaved]
    envelope = relayed(NEIGHBOURS[0], record, distance=1, seq=1)
    assert receive(core, NEIGHBOURS[0], envelope) == []
    assert [type(x) for x in receive(core, NEIGHBOURS[0], envelope)] == [PeerMisbehaved]


def test_only_newer_rounds_replace_and_gossip_never_overwrites_a_direct_record() -> None:
    core = history_core()
    a, b = NEIGHBOURS[0], NEIGHBOURS[1]
    origin = identity_of(ORIGIN).node_id
    assert receive(core, a, relayed(a, signed(ORIGIN, 5, 1.0), distance=1, seq=1)) == []
    assert receive(core, b, relayed(b, signed(ORIGIN, 4, 2.0), distance=1, seq=1)) == []
    assert distant(core) == {origin: (5, 2)}  # the older round did not replace
    assert receive(core, b, relayed(b, signed(ORIGIN, 6, 3.0), distance=2, seq=2)) == []
    assert distant(core) == {origin: (6, 3)}
    # a's own publication is a direct record; a relayed copy of it never replaces it
    assert receive(core, a, relayed(a, signed(a, 2), distance=0, seq=2)) == []
    assert receive(core, b, relayed(b, signed(a, 9), distance=1, seq=3)) == []
    gossip = core.history_gossip
    assert gossip is not None
    held = gossip.table[identity_of(a).node_id]
    assert (held.distance, held.record.round) == (1, 2)
    assert identity_of(a).node_id not in distant(core)


def test_own_record_coming_back_is_ignored_and_capacity_bounds_the_table() -> None:
    core = history_core(history_capacity=2)
    a = NEIGHBOURS[0]
    assert receive(core, a, relayed(a, signed(ME, 1), distance=1, seq=1)) == []
    gossip = core.history_gossip
    assert gossip is not None and gossip.table == {}
    for seq, (origin, distance) in enumerate([(7, 1), (8, 2), (9, 3), (10, 1)], start=2):
        receive(core, a, relayed(a, signed(origin, 1), distance=distance, seq=seq))
    kept = {held.record.origin: held.distance for held in gossip.table.values()}
    assert kept == {identity_of(7).node_id: 2, identity_of(10).node_id: 2}
    assert set(distant(core)) == set(kept)  # evicted records leave the merge rule's table too


# -- when it is on ----------------------------------------------------------------------


def build(merge: str, **overrides: object) -> BaseCore:
    config = CoreConfig(mode="dsgd", **overrides)  # type: ignore[arg-type]
    core = make_core(
        config,
        identity=identity_of(ME),
        neighbours=[identity_of(i).node_id for i in NEIGHBOURS],
        vector=torch.zeros(SIZE),
        samples=1,
        merge=make_merge_rule(merge),
        rng=np.random.default_rng(0),
    )
    return core_of(core)


def test_on_for_sybilwall_variants_off_otherwise_unless_configured() -> None:
    assert build("sybilwall").history_gossip is not None
    assert build("sybilwall_median").history_gossip is not None
    assert build("sybilwall_weighted_median").history_gossip is not None
    assert build("mean").history_gossip is None
    assert build("foolsgold").history_gossip is None
    assert build("sybilwall", history_gossip=False).history_gossip is None
    assert build("mean", history_gossip=True).history_gossip is not None
    # off: a HISTORY message is an unexpected kind
    core = build("mean")
    a = NEIGHBOURS[0]
    core.handle(PeerConnected(identity_of(a).node_id), now=0.0)
    envelope = relayed(a, signed(ORIGIN, 1), distance=1, seq=1)
    assert [type(x) for x in receive(core, a, envelope)] == [PeerMisbehaved]


@pytest.mark.parametrize(
    ("field", "value"),
    [("history_lambda", 0.0), ("history_capacity", 0), ("history_gossip", "yes")],
)
def test_history_config_errors_name_the_key(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"protocol.{field}"):
        CoreConfig(**{field: value})
    with pytest.raises(ConfigError, match="protocol.history_gossip"):
        CoreConfig(mode="modest", history_gossip=True)


# -- the draw ---------------------------------------------------------------------------


def test_draw_respects_exclusions_and_the_lambda_weights() -> None:
    me = identity_of(ME)
    gossip = HistoryGossip(me, torch.zeros(SIZE))
    peer, other = identity_of(1).node_id, identity_of(2).node_id
    table = {
        # origin index: (distance, delivered by)
        1: (1, peer),  # the peer's own record: never sent back to it
        2: (1, other),
        3: (2, other),
        4: (3, other),
        5: (4, other),
        6: (2, peer),  # delivered by the peer: never sent back to it
    }
    for origin, (distance, source) in table.items():
        gossip.table[identity_of(origin).node_id] = HeldHistory(signed(origin, 1), distance, source)
    rng = np.random.default_rng(2024)
    draws = 10_000
    counts: Counter[NodeId] = Counter()
    for _ in range(draws):
        held = gossip.draw(peer, rng)
        assert held is not None
        counts[held.record.origin] += 1
    assert identity_of(1).node_id not in counts and identity_of(6).node_id not in counts
    eligible = [2, 3, 4, 5]
    expected = history_gossip_weights([table[i][0] for i in eligible], 0.8)
    for origin, probability in zip(eligible, expected.tolist(), strict=True):
        observed = counts[identity_of(origin).node_id] / draws
        # 4 standard deviations of a binomial proportion
        assert abs(observed - probability) < 4 * (probability * (1 - probability) / draws) ** 0.5
    # relative weights 1 : 0.449 : 0.202 : 0.091 for d = 1..4
    ratios = (expected / expected[0]).tolist()
    assert ratios == pytest.approx([1.0, 0.4493, 0.2019, 0.0907], abs=1e-3)
    # nothing eligible: nothing drawn
    assert gossip.draw(identity_of(1).node_id, rng) is not None
    lonely = HistoryGossip(me, torch.zeros(SIZE))
    lonely.table[peer] = HeldHistory(signed(1, 1), 1, peer)
    assert lonely.draw(peer, rng) is None


# -- traffic and propagation ------------------------------------------------------------


def test_one_own_and_at_most_one_relayed_record_per_neighbour_per_round() -> None:
    single = make_single("dsgd", history_gossip=True, rounds=3)
    core = core_of(single.core)
    for seq, i in enumerate(NEIGHBOURS, start=1):
        envelope = relayed(i, signed(i, 0, float(i)), distance=0, seq=seq)
        assert single.receive(i, envelope) == []
    core.handle(Started(), now=0.0)
    actions = core.handle(TrainingFinished(torch.ones(SIZE), 0.1, 1), now=1.0)
    sends = [a for a in actions if isinstance(a, Send)]
    per_peer: Counter[tuple[NodeId, str]] = Counter()
    for send in sends:
        envelope = send.envelope
        if envelope.kind is MessageKind.HISTORY:
            label = "own" if envelope.meta["d"] == 0 else "relayed"
            origin = NodeId(envelope.meta["o"])
            assert origin != send.peer  # never its own record back
            if label == "own":
                assert origin == single.me.node_id and envelope.round == 0
        else:
            label = envelope.kind.name
        per_peer[(send.peer, label)] += 1
    for i in NEIGHBOURS:
        peer = single.id(i)
        assert per_peer[(peer, "MODEL_UPDATE")] == 1
        assert per_peer[(peer, "own")] == 1
        assert per_peer[(peer, "relayed")] == 1  # two other neighbours' records to choose from
    assert len(sends) == 3 * len(NEIGHBOURS)
    # the own record is the accumulated update since the start: trained - initial
    own = core.history_gossip.own if core.history_gossip else None
    assert own is not None and own.round == 0
    own.verify()


def test_distant_histories_reach_three_hops_on_a_line() -> None:
    # 0 - 1 - 2 - 3: node 3 learns node 0's history (3 hops) and node 1's (2 hops)
    config = CoreConfig(mode="dsgd", rounds=12, round_timeout=5.0, history_gossip=True)
    vectors = [torch.randn(SIZE, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    network = FakeNetwork(4, [(0, 1), (1, 2), (2, 3)], config, vectors=vectors, merge="sybilwall")
    network.start()
    network.run()
    ids = [network.node_id(i) for i in range(4)]
    cores = [core_of(network.nodes[i].core) for i in range(4)]
    assert all(core.finished for core in cores)
    assert all(not node.misbehaved for node in network.nodes.values())
    far = distant(cores[3])
    assert far[ids[1]][1] == 2 and far[ids[0]][1] == 3
    assert distant(cores[0])[ids[2]][1] == 2 and distant(cores[0])[ids[3]][1] == 3
    # the merge rule compares them: distant rows never replace the direct ones
    table = table_of(cores[3])
    assert set(table.direct) == {ids[2]}
    # every record a node holds verifies against its origin's key
    for core in cores:
        gossip = core.history_gossip
        assert gossip is not None
        for held in gossip.table.values():
            held.record.verify()


def test_history_gossip_reaches_two_hops_with_gossip_mode_on_a_ring() -> None:
    config = CoreConfig(
        mode="gossip", rounds=15, period=1.0, period_jitter=0.2, fanout=2, history_gossip=True
    )
    vectors = [torch.full((SIZE,), float(i)) for i in range(6)]
    edges = [(i, (i + 1) % 6) for i in range(6)]
    network = FakeNetwork(6, edges, config, vectors=vectors, merge="sybilwall", train_time=0.5)
    network.start()
    network.run(until=40.0)
    for i in range(6):
        far = distant(core_of(network.nodes[i].core))
        assert far, f"node {i} learnt no distant history"
        assert all(distance >= 2 for _, distance in far.values())
    assert all(not node.misbehaved for node in network.nodes.values())


# -- the merge rule's history hook -------------------------------------------------------


class _Listening:
    """A plug-in rule (the mean) that implements HistoryHook and notes every call."""

    name = "listening"

    def __init__(self) -> None:
        self.calls: list[tuple[str, NodeId, int]] = []

    def __call__(
        self, own: torch.Tensor, received: torch.Tensor, weights: torch.Tensor, ctx: MergeContext
    ) -> torch.Tensor:
        return torch.cat([own[None], received]).mean(dim=0)

    def learn_history(
        self,
        state: MutableMapping[str, Any],
        origin: NodeId,
        round: int,
        distance: int,
        history: torch.Tensor,
    ) -> None:
        state["learnt"] = state.get("learnt", 0) + 1
        self.calls.append(("learn", origin, distance))

    def forget_history(self, state: MutableMapping[str, Any], origin: NodeId) -> None:
        self.calls.append(("forget", origin, 0))


def test_a_plug_in_rule_with_the_history_hook_gets_gossip_and_learns_distant_records() -> None:
    rule = _Listening()
    assert history_hook(rule) is rule and history_hook(make_merge_rule("mean")) is None
    peers = [identity_of(i).node_id for i in NEIGHBOURS]
    core = core_of(
        make_core(
            CoreConfig(mode="dsgd", history_capacity=1),
            identity=identity_of(ME),
            neighbours=peers,
            vector=torch.zeros(SIZE),
            samples=1,
            merge=rule,
            rng=np.random.default_rng(1),
        )
    )
    assert core.gossips_histories  # on by itself: the rule declared the hook
    relay = NEIGHBOURS[0]
    first, second = signed(ORIGIN, round=3), signed(8, round=4)
    assert receive(core, relay, relayed(relay, first, distance=1, seq=1)) == []
    assert receive(core, relay, relayed(relay, second, distance=2, seq=2)) == []
    origin, other = identity_of(ORIGIN).node_id, identity_of(8).node_id
    # Stored two and three hops away; the table holds one, so the farther is evicted.
    assert rule.calls == [("learn", origin, 2), ("learn", other, 3), ("forget", other, 0)]
    assert core.merge_state == {"learnt": 2}  # only the rule wrote its state


def test_history_gossip_without_a_hook_relays_but_leaves_the_rule_state_alone() -> None:
    core = core_of(make_single("dsgd", history_gossip=True).core)  # the mean: no hook
    relay = NEIGHBOURS[0]
    assert receive(core, relay, relayed(relay, signed(ORIGIN, round=3), distance=1, seq=1)) == []
    gossip = core.history_gossip
    assert gossip is not None and identity_of(ORIGIN).node_id in gossip.table
    assert core.merge_state == {}
