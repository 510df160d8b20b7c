"""The configured neighbours, which of them are connected, and a replay window for each.

Neighbours are kept sorted by key, so every iteration over them (whom to send to, in which
order to merge) is the same in every process, whatever order the caller listed them in.
A neighbour counts as connected from ``PeerConnected`` to ``PeerDisconnected``; each
``PeerConnected`` starts a fresh replay window for that peer, since the new connection was
freshly authenticated and the peer's earlier sequence numbers belong to the old one.
"""

from __future__ import annotations

from collections.abc import Collection

from p2pfl.errors import ConfigError
from p2pfl.identity import NodeId
from p2pfl.wire import ReplayWindow


class PeerSet:
    """Neighbour membership, connection state and per-neighbour replay protection."""

    __slots__ = ("_connected", "_connected_in_order", "_window_size", "_windows", "neighbours")

    def __init__(self, own: NodeId, neighbours: Collection[NodeId], *, window_size: int) -> None:
        """Remember ``neighbours`` (duplicates collapse), none of them connected yet.

        Raises:
            ConfigError: ``neighbours`` holds this node itself or something not a NodeId.
        """
        unique = set(neighbours)
        if any(not isinstance(peer, NodeId) for peer in unique):
            raise ConfigError("neighbours", neighbours, "a collection of NodeId")
        if own in unique:
            raise ConfigError("neighbours", own, "neighbours other than the node itself")
        self.neighbours: tuple[NodeId, ...] = tuple(sorted(unique))
        self._window_size = window_size
        self._windows: dict[NodeId, ReplayWindow] = {
            peer: ReplayWindow(window_size) for peer in self.neighbours
        }
        self._connected: set[NodeId] = set()
        self._connected_in_order: tuple[NodeId, ...] = ()

    def is_neighbour(self, peer: NodeId) -> bool:
        return peer in self._windows

    def is_connected(self, peer: NodeId) -> bool:
        return peer in self._connected

    def connect(self, peer: NodeId) -> None:
        """Mark a neighbour connected and give it a fresh replay window."""
        self._connected.add(peer)
        self._windows[peer] = ReplayWindow(self._window_size)
        self._refresh()

    def disconnect(self, peer: NodeId) -> None:
        self._connected.discard(peer)
        self._refresh()

    def _refresh(self) -> None:
        self._connected_in_order = tuple(p for p in self.neighbours if p in self._connected)

    def connected(self) -> tuple[NodeId, ...]:
        """The connected neighbours, in key order."""
        return self._connected_in_order

    def check_seq(self, peer: NodeId, seq: int) -> None:
        """Record a neighbour's sequence number.

        Raises:
            Replayed: seen already, or below the window.
        """
        self._windows[peer].check(seq)
