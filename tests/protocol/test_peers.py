"""The peer set: connection bookkeeping costs O(log degree), never O(degree), per event."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable
from types import FrameType

import numpy as np
import pytest
import torch

from p2pfl.identity import Identity, NodeId
from p2pfl.merge import make_merge_rule
from p2pfl.protocol import (
    Core,
    CoreConfig,
    DeadlineReached,
    NeighboursConnected,
    PeerConnected,
    PeerDisconnected,
    Send,
    Started,
    make_core,
)
from p2pfl.protocol.peers import AllPeersBut, PeerSet, SortedPeers


def ids(count: int, salt: str = "") -> list[NodeId]:
    return [NodeId(hashlib.sha256(f"{salt}{index}".encode()).digest()) for index in range(count)]


def gossip_core(neighbours: object, *, seed: int = 3) -> Core:
    return make_core(
        CoreConfig(mode="gossip", rounds=5, local_steps=1, fanout=2),
        identity=Identity.from_seed(b"\x07" * 32),
        neighbours=neighbours,  # type: ignore[arg-type]
        vector=torch.zeros(4),
        samples=1,
        merge=make_merge_rule("weighted"),
        rng=np.random.default_rng(seed),
    )


def calls_during(action: Callable[[], object]) -> int:
    """Python and builtin function calls made while ``action`` runs (a deterministic cost)."""
    count = 0

    def profile(_frame: FrameType, event: str, _arg: object) -> None:
        nonlocal count
        if event in ("call", "c_call"):
            count += 1

    sys.setprofile(profile)
    try:
        action()
    finally:
        sys.setprofile(None)
    return count


def connect_all_one_by_one(size: int) -> int:
    peers = ids(size)
    core = gossip_core(peers)

    def drive() -> None:
        for peer in peers:
            core.handle(PeerConnected(peer), now=0.0)

    return calls_during(drive)


def test_ten_thousand_connects_cost_linear_work() -> None:
    # A per-connect O(degree) rebuild makes 10,000 connects ~10,000x the work of 100
    # (quadratic in the degree); linear work makes it ~100x. Counting calls is exact.
    small = connect_all_one_by_one(100)
    large = connect_all_one_by_one(10_000)
    assert large < 200 * small, (small, large)


def test_connected_view_matches_a_sorted_reference() -> None:
    own = Identity.from_seed(b"\x01" * 32).node_id
    neighbours = ids(64)
    peers = PeerSet(own, neighbours, window_size=8)
    ordered = sorted(neighbours)
    up: set[NodeId] = set()
    rng = np.random.default_rng(5)
    for step in range(600):
        choice = rng.integers(0, 10)
        peer = ordered[int(rng.integers(0, len(ordered)))]
        if choice == 0:
            peers.connect_all()
            up = set(ordered)
        elif choice < 6:
            peers.connect(peer)
            up.add(peer)
        else:
            peers.disconnect(peer)
            up.discard(peer)
        expected = [p for p in ordered if p in up]
        view = peers.connected()
        assert len(view) == len(expected), step
        assert list(view) == expected
        assert [view[i] for i in range(len(view))] == expected
        assert all((p in view) == (p in up) for p in ordered[:8])
        assert all(peers.is_connected(p) == (p in up) for p in ordered[:8])


def test_complete_neighbourhood_view_is_the_sorted_others() -> None:
    everyone = ids(30)
    universe = SortedPeers(everyone)
    for own in (everyone[0], sorted(everyone)[0], sorted(everyone)[-1], ids(1, "x")[0]):
        view = AllPeersBut(universe, own)
        expected = sorted(peer for peer in everyone if peer != own)
        assert list(view) == expected
        assert [view[i] for i in range(len(view))] == expected
        assert [view.position(peer) for peer in expected] == list(range(len(expected)))
        assert own not in view and view.position(own) is None
        with pytest.raises(IndexError):
            view[len(expected)]


def test_neighbours_connected_is_one_peer_connected_per_neighbour() -> None:
    # Same seed, same pushes: connecting all at once draws the same targets, also after a
    # disconnect (the Fenwick path), as connecting one by one.
    peers = ids(40)
    targets: list[list[list[NodeId]]] = []
    for bulk in (True, False):
        core = gossip_core(peers)
        if bulk:
            core.handle(NeighboursConnected(), now=0.0)
        else:
            for peer in peers:
                core.handle(PeerConnected(peer), now=0.0)
        core.handle(Started(), now=0.0)
        for peer in sorted(peers)[::3]:
            core.handle(PeerDisconnected(peer), now=0.0)
        pushes = []
        for _ in range(5):
            deadline = core.next_deadline()
            actions = core.handle(DeadlineReached(), now=deadline)
            pushes.append([action.peer for action in actions if isinstance(action, Send)])
        targets.append(pushes)
    assert targets[0] == targets[1]
    assert all(len(push) == 2 for push in targets[0])
    disconnected = set(sorted(peers)[::3])
    assert not any(peer in disconnected for push in targets[0] for peer in push)
