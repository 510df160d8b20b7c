"""The configured neighbours, which peers are connected, and a replay window for each.

Neighbours are kept sorted by key, so every iteration over them (whom to send to, in which
order to merge) is the same in every process, whatever order the caller listed them in.
A peer counts as connected from ``PeerConnected`` to ``PeerDisconnected``; each
``PeerConnected`` starts a fresh replay window for that peer, since the new connection was
freshly authenticated and the peer's earlier sequence numbers belong to the old one.

A mode that talks to peers beyond its neighbours (``modest``, membership-sampled
``gossip``) builds the set with ``strangers > 0``: it then *admits* any other peer, whose
replay windows are kept for at most ``strangers`` peers (the least recently heard is
forgotten), so memory stays bounded whoever connects.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection

from p2pfl.errors import ConfigError
from p2pfl.identity import NodeId
from p2pfl.wire import ReplayWindow


class PeerSet:
    """Neighbour membership, connection state and per-peer replay protection."""

    __slots__ = (
        "_connected",
        "_connected_in_order",
        "_neighbour_set",
        "_own",
        "_strangers",
        "_window_size",
        "_windows",
        "neighbours",
        "stranger_capacity",
    )

    def __init__(
        self,
        own: NodeId,
        neighbours: Collection[NodeId],
        *,
        window_size: int,
        strangers: int = 0,
    ) -> None:
        """Remember ``neighbours`` (duplicates collapse), none of them connected yet.

        Args:
            own: this node.
            neighbours: the configured neighbours.
            window_size: sequence numbers remembered per peer.
            strangers: 0 admits neighbours only; otherwise any other peer is admitted and
                the windows of at most this many non-neighbours are kept.

        Raises:
            ConfigError: ``neighbours`` holds this node itself or something not a NodeId.
        """
        unique = set(neighbours)
        if any(not isinstance(peer, NodeId) for peer in unique):
            raise ConfigError("neighbours", neighbours, "a collection of NodeId")
        if own in unique:
            raise ConfigError("neighbours", own, "neighbours other than the node itself")
        self._own = own
        self.neighbours: tuple[NodeId, ...] = tuple(sorted(unique))
        self._neighbour_set = frozenset(unique)
        self._window_size = window_size
        self._windows: dict[NodeId, ReplayWindow] = {
            peer: ReplayWindow(window_size) for peer in self.neighbours
        }
        self.stranger_capacity = strangers
        self._strangers: OrderedDict[NodeId, ReplayWindow] = OrderedDict()
        self._connected: set[NodeId] = set()
        self._connected_in_order: tuple[NodeId, ...] = ()

    def is_neighbour(self, peer: NodeId) -> bool:
        return peer in self._neighbour_set

    def admits(self, peer: NodeId) -> bool:
        """Whether ``peer`` may connect and send: a neighbour, or anyone but this node
        when strangers are admitted."""
        if peer in self._neighbour_set:
            return True
        return self.stranger_capacity > 0 and peer != self._own

    def is_connected(self, peer: NodeId) -> bool:
        return peer in self._connected

    def connect(self, peer: NodeId) -> None:
        """Mark an admitted peer connected and give it a fresh replay window."""
        self._connected.add(peer)
        if peer in self._neighbour_set:
            self._windows[peer] = ReplayWindow(self._window_size)
        else:
            self._strangers.pop(peer, None)
            self._stranger_window(peer)
        self._refresh()

    def disconnect(self, peer: NodeId) -> None:
        self._connected.discard(peer)
        self._refresh()

    def _refresh(self) -> None:
        self._connected_in_order = tuple(p for p in self.neighbours if p in self._connected)

    def connected(self) -> tuple[NodeId, ...]:
        """The connected neighbours, in key order."""
        return self._connected_in_order

    def connected_strangers(self) -> tuple[NodeId, ...]:
        """The connected peers that are not neighbours, in key order."""
        return tuple(sorted(p for p in self._connected if p not in self._neighbour_set))

    def _stranger_window(self, peer: NodeId) -> ReplayWindow:
        window = self._strangers.get(peer)
        if window is None:
            window = ReplayWindow(self._window_size)
            self._strangers[peer] = window
            while len(self._strangers) > self.stranger_capacity:
                self._strangers.popitem(last=False)
        self._strangers.move_to_end(peer)
        return window

    def check_seq(self, peer: NodeId, seq: int) -> None:
        """Record an admitted peer's sequence number.

        Raises:
            Replayed: seen already, or below the window.
            KeyError: ``peer`` is not admitted (check :meth:`admits` first).
        """
        window = self._windows.get(peer)
        if window is None:
            if not self.admits(peer):
                raise KeyError(peer)
            window = self._stranger_window(peer)
        window.check(seq)
