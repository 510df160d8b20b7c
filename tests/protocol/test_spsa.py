"""The ``spsa`` mode: honest nodes hold bit-identical models, step after step, while nodes
join and leave between steps; a joiner catches up with one model transfer; step messages
are small, bounded and checked."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from p2pfl.identity import Identity
from p2pfl.learn.spsa import projected_gradients
from p2pfl.merge import make_merge_rule
from p2pfl.protocol import (
    Action,
    CoreConfig,
    MessageReceived,
    PeerConnected,
    PeerDisconnected,
    PeerMisbehaved,
    Send,
    Started,
    StartTraining,
    TrainingFinished,
    make_core,
)
from p2pfl.protocol.spsa import SPSA_CODEC, SpsaCore, frame_size, model_digest
from p2pfl.testing import FakeNetwork, FakeNode
from p2pfl.wire import MessageKind, PayloadSpec, seal

SIZE = 64
TARGET = torch.linspace(-1.0, 1.0, SIZE)
PROBE_TIME = 1.0
LATENCY = 0.01
STEP = PROBE_TIME + LATENCY
"""One step in the network below: the probe, then the bytes' flight."""


def quadratic_probe(vector: torch.Tensor, seeds: tuple[int, ...], eps: float) -> tuple[float, ...]:
    """Projections of ``|θ − target|²`` (a stand-in for a learner's minibatch loss)."""

    def loss(rows: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (rows - TARGET).pow(2).sum(dim=1)

    def batches() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(1), torch.zeros(1)

    return projected_gradients(loss, vector, seeds, eps, batches).projections


class SpsaNetwork(FakeNetwork):
    """A :class:`FakeNetwork` of a complete graph whose learners answer SPSA probes, where
    nodes are *in* only between their join and leave times: an out node's sends are lost
    and nothing reaches it."""

    def __init__(
        self,
        n: int,
        config: CoreConfig,
        *,
        joins: dict[int, float] | None = None,
        leaves: dict[int, float] | None = None,
    ) -> None:
        """Nodes in ``joins`` come up at the time given (links, then ``Started``), the others
        at 0; nodes in ``leaves`` go for good at the time given (their neighbours see the
        connections drop)."""
        edges = [(a, b) for a in range(n) for b in range(a + 1, n)]
        vectors = [torch.zeros(SIZE) for _ in range(n)]
        super().__init__(
            n,
            edges,
            config,
            vectors=vectors,
            latency=LATENCY,
            train_time=PROBE_TIME,
        )
        self.joined_at = {i: (joins or {}).get(i, 0.0) for i in range(n)}
        self.left_at = {i: (leaves or {}).get(i, math.inf) for i in range(n)}
        self.dense_models = 0

    def in_at(self, index: int, at: float) -> bool:
        return self.joined_at[index] <= at < self.left_at[index]

    def start(self) -> None:
        for i in sorted(self.nodes):
            at = self.joined_at[i]
            if at == 0.0:
                for j in sorted(self.adjacency[i]):
                    if self.in_at(j, 0.0):
                        self.schedule(0.0, i, PeerConnected(self.node_id(j)))
            else:
                for j in sorted(self.adjacency[i]):
                    if self.in_at(j, at):
                        self.schedule(at, j, PeerConnected(self.node_id(i)))
                        self.schedule(at, i, PeerConnected(self.node_id(j)))
            self.schedule(at, i, Started())
            gone = self.left_at[i]
            for j in sorted(self.adjacency[i]):
                if self.in_at(j, gone):
                    self.schedule(gone, j, PeerDisconnected(self.node_id(i)))

    def carry_out(self, node: FakeNode, action: Action) -> None:
        match action:
            case Send(peer=peer):
                if not (
                    self.in_at(node.index, self.now) and self.in_at(self.index_of[peer], self.now)
                ):
                    return
                if action.envelope.kind is MessageKind.MODEL_UPDATE:
                    self.dense_models += 1
                super().carry_out(node, action)
            case StartTraining(vector=vector, steps=steps, probe=probe) if probe is not None:
                projections = quadratic_probe(vector, probe.seeds, probe.eps)
                done = TrainingFinished(vector, 0.5, steps, projections)
                self.schedule(self.now + self.train_time, node.index, done)
            case _:
                super().carry_out(node, action)

    def step_2_from_1_to_0(self, node: FakeNode, send: Send) -> bool:
        """Whether ``send`` is node 1's step message of step 2 to node 0."""
        envelope = send.envelope
        return (
            envelope.kind is MessageKind.SPSA_STEP
            and envelope.round == 2
            and node.index == 1
            and self.index_of[send.peer] == 0
        )


def config(rounds: int = 8, **changes: object) -> CoreConfig:
    base = CoreConfig(mode="spsa", rounds=rounds, round_timeout=10.0, spsa_samples=2, spsa_lr=0.05)
    return base.replace(**changes)


def digests_by_round(net: SpsaNetwork, left_at: dict[int, float]) -> dict[int, set[str]]:
    """Every digest each node reported for each step it closed while it was in."""
    seen: dict[int, set[str]] = {}
    for index, node in net.nodes.items():
        for record in node.records:
            if "digest" not in record:
                continue
            if float(record["merged_at"]) >= left_at.get(index, float("inf")):
                continue
            seen.setdefault(int(record["round"]), set()).add(str(record["digest"]))
    return seen


def test_three_nodes_hold_one_model_and_it_learns() -> None:
    net = SpsaNetwork(3, config(rounds=30, spsa_samples=4, spsa_clip=20.0, spsa_lr=0.05))
    net.start()
    net.run()
    cores = [node.core for node in net.nodes.values()]
    assert all(core.finished for core in cores)
    first = cores[0].vector
    assert all(torch.equal(core.vector, first) for core in cores)
    for round_, digests in digests_by_round(net, {}).items():
        assert len(digests) == 1, round_
    records = [r for node in net.nodes.values() for r in node.records if "digest" in r]
    assert {r["digest_mismatches"] for r in records} == {0}
    assert {r["contributions"] for r in records} == {12}  # 3 nodes x 4 samples, every step
    # The shared model walks down the quadratic.
    start = float(TARGET.pow(2).sum())
    assert float((first - TARGET).pow(2).sum()) < 0.5 * start
    assert not any(node.misbehaved for node in net.nodes.values())


@pytest.mark.parametrize("seed", range(8))
def test_honest_models_are_bit_identical_under_joins_and_leaves(seed: int) -> None:
    """A seeded schedule of joins and leaves between steps: every step, every node in the
    run reports the same model digest; joiners catch up with one dense transfer."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(4, 7))
    rounds = 10
    late = {int(i) for i in rng.choice(n, size=int(rng.integers(1, 3)), replace=False)}
    # Mid-probe instants are between steps: no step bytes are in flight.
    joins = {i: float(rng.integers(1, rounds - 4)) * STEP + 0.3 for i in sorted(late)}
    leaver = int(rng.choice(sorted(set(range(n)) - late)))
    left_at = {leaver: float(rng.integers(2, rounds - 2)) * STEP + 0.5}
    net = SpsaNetwork(n, config(rounds=rounds), joins=joins, leaves=left_at)
    net.start()
    net.run()

    seen = digests_by_round(net, left_at)
    assert set(seen) == set(range(rounds))
    for round_, digests in seen.items():
        assert len(digests) == 1, f"round {round_}: {sorted(digests)}"
    in_at_end = [i for i in range(n) if i != leaver]
    finals = [net.nodes[i].core for i in in_at_end]
    assert all(core.finished for core in finals)
    assert all(torch.equal(core.vector, finals[0].vector) for core in finals)
    for i in late:
        core = net.nodes[i].core
        assert isinstance(core, SpsaCore)
        assert core.syncs == 1
    assert net.dense_models == len(late)  # one model transfer per joiner, no replays
    for i in in_at_end:
        assert not net.nodes[i].misbehaved
        records = [r for r in net.nodes[i].records if "digest" in r]
        assert {r["digest_mismatches"] for r in records} == {0}


def test_a_lost_step_message_is_caught_up_with_one_model() -> None:
    """One node misses a peer's bytes of step 2: the peer's step-3 bytes show it fell
    behind (links are FIFO), and it takes that peer's model instead of diverging."""

    class Lossy(SpsaNetwork):
        def carry_out(self, node: FakeNode, action: Action) -> None:
            if isinstance(action, Send) and self.step_2_from_1_to_0(node, action):
                return
            super().carry_out(node, action)

    net = Lossy(4, config(rounds=8, round_timeout=3.0))
    net.start()
    net.run()
    victim = net.nodes[0].core
    assert isinstance(victim, SpsaCore) and victim.syncs == 1
    cores = [node.core for node in net.nodes.values()]
    assert all(core.finished for core in cores)
    assert all(torch.equal(core.vector, cores[0].vector) for core in cores)
    for round_, digests in digests_by_round(net, {}).items():
        assert len(digests) == 1, round_


def test_an_equivocating_peer_shows_as_digest_mismatches_and_is_repaired() -> None:
    """Node 1 sends node 0 other bytes of step 2 than everyone else: node 0's model
    differs, the step-3 digests say so on every node, and node 0 takes the majority's
    model back."""

    class Equivocating(SpsaNetwork):
        def carry_out(self, node: FakeNode, action: Action) -> None:
            if isinstance(action, Send) and self.step_2_from_1_to_0(node, action):
                envelope = action.envelope
                other = bytes((level + 7) % 100 for level in bytes(envelope.payload))
                forged = seal(
                    node.identity,
                    MessageKind.SPSA_STEP,
                    seq=envelope.seq,
                    round=2,
                    payload=other,
                    spec=envelope.spec,
                    meta=envelope.meta,
                )
                action = Send(action.peer, forged)
            super().carry_out(node, action)

    net = Equivocating(4, config(rounds=8))
    net.start()
    net.run()
    mismatches = {
        index: [
            (r["round"], r["digest_mismatches"]) for r in node.records if r.get("digest_mismatches")
        ]
        for index, node in net.nodes.items()
    }
    assert mismatches == {0: [(3, 3)], 1: [(3, 1)], 2: [(3, 1)], 3: [(3, 1)]}
    # ... and each node says so in a record of its own (the simulator logs it as an event).
    alerts = [r for r in net.nodes[0].records if "majority" in r]
    assert [(r["round"], r["peers"], r["of"]) for r in alerts] == [(3, 3, 3)]
    assert alerts[0]["own"] != alerts[0]["majority"]
    victim = net.nodes[0].core
    assert isinstance(victim, SpsaCore) and victim.syncs == 1
    cores = [node.core for node in net.nodes.values()]
    assert all(torch.equal(core.vector, cores[0].vector) for core in cores)


def test_step_frames_do_not_grow_with_the_model() -> None:
    sizes = []
    for size in (10, 100_000):
        identity = Identity.from_seed(bytes([3]) * 32)
        peer = Identity.from_seed(bytes([4]) * 32).node_id
        core = make_core(
            config(spsa_samples=8),
            identity=identity,
            neighbours=[peer],
            vector=torch.zeros(size),
            samples=10,
            merge=make_merge_rule("mean"),
            rng=np.random.default_rng(0),
        )
        core.handle(PeerConnected(peer), now=0.0)
        core.handle(Started(), now=0.0)
        actions = core.handle(
            TrainingFinished(torch.zeros(size), 0.1, 8, tuple(float(k) for k in range(8))),
            now=1.0,
        )
        [send] = [a for a in actions if isinstance(a, Send)]
        assert send.envelope.payload_bytes == 8
        sizes.append(frame_size(send.envelope))
    assert sizes[0] == sizes[1]
    assert sizes[0] < 300


def _step_core() -> tuple[SpsaCore, Identity]:
    own = Identity.from_seed(bytes([5]) * 32)
    peer = Identity.from_seed(bytes([6]) * 32)
    core = make_core(
        config(),
        identity=own,
        neighbours=[peer.node_id],
        vector=torch.zeros(SIZE),
        samples=1,
        merge=make_merge_rule("mean"),
        rng=np.random.default_rng(0),
    )
    assert isinstance(core, SpsaCore)
    core.handle(PeerConnected(peer.node_id), now=0.0)
    core.handle(Started(), now=0.0)
    return core, peer


@pytest.mark.parametrize(
    ("spec", "payload", "meta", "reason"),
    [
        (PayloadSpec(SPSA_CODEC, "int8", (2,), 1), b"\x01", None, "declared as 2"),
        (PayloadSpec(SPSA_CODEC, "int8", (300,), 1), b"\x00" * 300, None, "at most 255"),
        (PayloadSpec("dense", "float32", (1,), 1), b"\x00" * 4, None, "step payload dense"),
        (PayloadSpec(SPSA_CODEC, "int8", (1,), 1), b"\x80", None, "-128"),
        (PayloadSpec(SPSA_CODEC, "int8", (1,), 1), b"\x01", {"md": b"short"}, "digest"),
    ],
)
def test_malformed_step_messages_are_misbehaviour(
    spec: PayloadSpec, payload: bytes, meta: dict[str, object] | None, reason: str
) -> None:
    core, peer = _step_core()
    envelope = seal(
        peer,
        MessageKind.SPSA_STEP,
        seq=1,
        round=0,
        payload=payload,
        spec=spec,
        meta=meta if meta is not None else {"md": model_digest(torch.zeros(SIZE))},
    )
    actions = core.handle(MessageReceived(peer.node_id, envelope), now=0.5)
    [fault] = actions
    assert isinstance(fault, PeerMisbehaved)
    assert reason in fault.reason


def test_two_different_step_messages_for_one_step_are_misbehaviour() -> None:
    core, peer = _step_core()
    digest = model_digest(torch.zeros(SIZE))
    spec = PayloadSpec(SPSA_CODEC, "int8", (1,), 1)
    first = seal(
        peer, MessageKind.SPSA_STEP, seq=1, round=0, payload=b"\x01", spec=spec, meta={"md": digest}
    )
    second = seal(
        peer, MessageKind.SPSA_STEP, seq=2, round=0, payload=b"\x02", spec=spec, meta={"md": digest}
    )
    assert core.handle(MessageReceived(peer.node_id, first), now=0.5) == []
    [fault] = core.handle(MessageReceived(peer.node_id, second), now=0.6)
    assert isinstance(fault, PeerMisbehaved)
    assert "two different" in fault.reason


def test_an_unasked_model_is_ignored() -> None:
    core, peer = _step_core()
    from p2pfl.codec import encode_vector

    spec, payload = encode_vector(torch.ones(SIZE))
    envelope = seal(
        peer, MessageKind.MODEL_UPDATE, seq=1, round=5, payload=payload, spec=spec, meta={"deg": 1}
    )
    assert core.handle(MessageReceived(peer.node_id, envelope), now=0.5) == []
    assert core.round == 0 and torch.equal(core.vector, torch.zeros(SIZE))
