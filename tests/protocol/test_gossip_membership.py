"""Gossip with membership peer sampling: pushes reach peers beyond the neighbours."""

from __future__ import annotations

from collections import Counter

import torch

from p2pfl.codec import encode_vector
from p2pfl.protocol import Action, CoreConfig, PeerMisbehaved, Send, Started
from p2pfl.protocol.gossip import GossipCore
from p2pfl.protocol.membership import Record, Status, sign_advert
from p2pfl.testing.network import FakeNetwork, FakeNode, identity_of
from p2pfl.wire import MessageKind, seal

from .single import NEIGHBOURS, SIZE, STRANGER, make_single

N = 10


class RecordingNetwork(FakeNetwork):
    """A fake network that remembers who sent a model to whom."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.pushes: Counter[tuple[int, int]] = Counter()

    def carry_out(self, node: FakeNode, action: Action) -> None:
        if isinstance(action, Send) and action.envelope.kind is MessageKind.MODEL_UPDATE:
            self.pushes[(node.index, self.index_of[action.peer])] += 1
        super().carry_out(node, action)


def ring(n: int) -> list[tuple[int, int]]:
    return [(i, (i + 1) % n) for i in range(n)]


def run_ring(peer_sampling: str) -> RecordingNetwork:
    config = CoreConfig(
        mode="gossip",
        rounds=30,
        period=1.0,
        fanout=1,
        peer_sampling=peer_sampling,
        view_entries=4,
    )
    vectors = [torch.full((SIZE,), float(i)) for i in range(N)]
    network = RecordingNetwork(N, ring(N), config, vectors=vectors, train_time=0.5, seed=3)
    network.start()
    network.run(until=60.0)
    return network


def test_membership_sampling_pushes_beyond_the_neighbours() -> None:
    network = run_ring("membership")
    assert all(not node.misbehaved for node in network.nodes.values())
    assert all(node.core.finished for node in network.nodes.values())
    beyond = {(a, b) for (a, b) in network.pushes if b not in network.adjacency[a]}
    assert len(beyond) >= N  # many pushes to non-neighbours
    for i, node in network.nodes.items():
        core = node.core
        assert isinstance(core, GossipCore) and core.membership is not None
        assert len(core.membership) == N, f"node {i} knows {len(core.membership)} peers"
        targets = {b for (a, b) in network.pushes if a == i}
        assert targets - network.adjacency[i], f"node {i} pushed only to neighbours"


def test_neighbour_sampling_is_unchanged() -> None:
    network = run_ring("neighbours")
    assert all((b in network.adjacency[a]) for (a, b) in network.pushes)
    for node in network.nodes.values():
        assert isinstance(node.core, GossipCore) and node.core.membership is None


def test_membership_mode_accepts_a_strangers_model_and_checks_its_view() -> None:
    single = make_single("gossip", peer_sampling="membership", rounds=3)
    core = single.core
    assert isinstance(core, GossipCore) and core.membership is not None
    core.handle(Started(), now=0.0)
    stranger = single.peers[STRANGER]
    spec, payload = encode_vector(torch.ones(SIZE), samples=1)
    own = Record(sign_advert(stranger, 0, Status.JOIN), 0).to_wire()
    envelope = seal(
        stranger,
        MessageKind.MODEL_UPDATE,
        seq=1,
        round=0,
        payload=bytes(payload),
        spec=spec,
        meta={"deg": 2, "view": [own]},
    )
    assert single.receive(STRANGER, envelope) == []
    assert single.id(STRANGER) in core.membership.pending  # applied at the next push
    # a record about someone else, signed by the sender: forged
    forged = Record(sign_advert(stranger, 5, Status.LEAVE), 0).to_wire()
    forged[0] = identity_of(NEIGHBOURS[0]).node_id.raw
    bad = seal(
        stranger,
        MessageKind.MODEL_UPDATE,
        seq=2,
        round=0,
        payload=bytes(payload),
        spec=spec,
        meta={"deg": 2, "view": [forged]},
    )
    actions = single.receive(STRANGER, bad)
    assert [type(a) for a in actions] == [PeerMisbehaved]
    assert core.membership.advert(single.id(NEIGHBOURS[0])) is not None
    advert = core.membership.advert(single.id(NEIGHBOURS[0]))
    assert advert is not None and advert.status is Status.JOIN
