"""The configured neighbours, which peers are connected, and a replay window for each.

Neighbours are kept sorted by key, so every iteration over them (whom to send to, in which
order to merge) is the same in every process, whatever order the caller listed them in.
A peer counts as connected from ``PeerConnected`` (or ``NeighboursConnected``, for all of
them) to ``PeerDisconnected``; each connection starts a fresh replay window for that peer,
since the new connection was freshly authenticated and the peer's earlier sequence numbers
belong to the old one.

A mode that talks to peers beyond its neighbours (``modest``, membership-sampled
``gossip``) builds the set with ``strangers > 0``: it then *admits* any other peer, whose
replay windows are kept for at most ``strangers`` peers (the least recently heard is
forgotten), so memory stays bounded whoever connects.

Cost: nothing here is O(degree) per event. Connecting, disconnecting, checking a sequence
number, and reading the k-th connected neighbour in key order (what a push samples) are
O(log degree) at most: connection flags are one byte per neighbour, ranked by a Fenwick tree
that exists only while some neighbour is disconnected; replay windows are made when a peer
first sends, not per neighbour. A complete graph's neighbourhood can be passed as
:class:`AllPeersBut`, a view of one shared sorted table, so n cores hold O(n) ids, not O(n^2).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Collection, Iterable, Iterator, Sequence

from p2pfl.errors import ConfigError
from p2pfl.identity import NodeId
from p2pfl.views import IndexedView
from p2pfl.wire import ReplayWindow


class Neighbourhood(IndexedView[NodeId]):
    """Distinct peers sorted by key, with an O(1) rank lookup."""

    __slots__ = ()

    def position(self, peer: NodeId) -> int | None:
        """``peer``'s index in key order, or None if it is not one of them."""
        raise NotImplementedError

    def __contains__(self, peer: object) -> bool:
        return isinstance(peer, NodeId) and self.position(peer) is not None


class SortedPeers(Neighbourhood):
    """An explicit neighbourhood: a sorted tuple and each peer's index."""

    __slots__ = ("_index", "_peers")

    def __init__(self, peers: Iterable[NodeId]) -> None:
        """Sort ``peers`` by key (duplicates collapse).

        Raises:
            ConfigError: an item is not a NodeId.
        """
        unique = set(peers)
        if any(not isinstance(peer, NodeId) for peer in unique):
            raise ConfigError("neighbours", sorted(map(str, unique)), "a collection of NodeId")
        # Sorting by the raw bytes is NodeId's own order, without its per-comparison tuples.
        self._peers = tuple(sorted(unique, key=lambda peer: peer.raw))
        # Keyed by the raw key: bytes hash in C (and cache it), NodeId.__hash__ is a Python
        # call, and a lookup happens for every message.
        self._index = {peer.raw: index for index, peer in enumerate(self._peers)}

    def position(self, peer: NodeId) -> int | None:
        return self._index.get(peer.raw)

    def __len__(self) -> int:
        return len(self._peers)

    def _item(self, index: int) -> NodeId:
        return self._peers[index]

    def __iter__(self) -> Iterator[NodeId]:
        return iter(self._peers)


class AllPeersBut(Neighbourhood):
    """Every peer of a shared :class:`SortedPeers` but one: a complete graph's neighbourhood
    in O(1) memory per node."""

    __slots__ = ("_own", "_own_at", "_universe")

    def __init__(self, universe: SortedPeers, own: NodeId) -> None:
        """The peers of ``universe`` other than ``own`` (which need not be in it)."""
        self._universe = universe
        self._own = own
        at = universe.position(own)
        self._own_at = len(universe) if at is None else at

    def position(self, peer: NodeId) -> int | None:
        at = self._universe.position(peer)
        if at is None or at == self._own_at:
            return None
        return at if at < self._own_at else at - 1

    def __len__(self) -> int:
        return len(self._universe) - (self._own_at < len(self._universe))

    def _item(self, index: int) -> NodeId:
        return self._universe._item(index if index < self._own_at else index + 1)

    def __iter__(self) -> Iterator[NodeId]:
        universe = self._universe
        return itertools.chain(
            itertools.islice(universe, self._own_at),
            itertools.islice(universe, self._own_at + 1, None),
        )


class _Connected(IndexedView[NodeId]):
    """The connected neighbours in key order: a live view of a :class:`PeerSet`."""

    __slots__ = ("_set",)

    def __init__(self, peer_set: PeerSet) -> None:
        self._set = peer_set

    def __len__(self) -> int:
        return self._set._count

    def _item(self, index: int) -> NodeId:
        return self._set.neighbours._item(self._set._select(index))

    def __iter__(self) -> Iterator[NodeId]:
        peers = self._set
        if peers._count == len(peers.neighbours):
            return iter(peers.neighbours)
        return itertools.compress(peers.neighbours, peers._up)

    def __contains__(self, peer: object) -> bool:
        if not isinstance(peer, NodeId):
            return False
        at = self._set.neighbours.position(peer)
        return at is not None and bool(self._set._up[at])


class PeerSet:
    """Neighbour membership, connection state and per-peer replay protection."""

    __slots__ = (
        "_count",
        "_own",
        "_strangers",
        "_strangers_connected",
        "_tree",
        "_up",
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
            neighbours: the configured neighbours; a :class:`Neighbourhood` is used as is.
            window_size: sequence numbers remembered per peer.
            strangers: 0 admits neighbours only; otherwise any other peer is admitted and
                the windows of at most this many non-neighbours are kept.

        Raises:
            ConfigError: ``neighbours`` holds this node itself or something not a NodeId.
        """
        table = neighbours if isinstance(neighbours, Neighbourhood) else SortedPeers(neighbours)
        if own in table:
            raise ConfigError("neighbours", own, "neighbours other than the node itself")
        self._own = own
        self.neighbours: Neighbourhood = table
        self._window_size = window_size
        self._windows: dict[bytes, ReplayWindow] = {}
        """Neighbours' windows by raw key, made when a neighbour first sends after connecting."""
        self.stranger_capacity = strangers
        self._strangers: OrderedDict[NodeId, ReplayWindow] = OrderedDict()
        self._strangers_connected: set[NodeId] = set()
        self._up = bytearray(len(table))
        """1 at a neighbour's index while it is connected."""
        self._count = 0
        self._tree: list[int] | None = None
        """Fenwick tree over ``_up`` (1-based), kept while it exists; None: build on need."""

    def is_neighbour(self, peer: NodeId) -> bool:
        return self.neighbours.position(peer) is not None

    def admits(self, peer: NodeId) -> bool:
        """Whether ``peer`` may connect and send: a neighbour, or anyone but this node
        when strangers are admitted."""
        if self.neighbours.position(peer) is not None:
            return True
        return self.stranger_capacity > 0 and peer != self._own

    def is_connected(self, peer: NodeId) -> bool:
        at = self.neighbours.position(peer)
        if at is None:
            return peer in self._strangers_connected
        return bool(self._up[at])

    def is_connected_neighbour(self, peer: NodeId) -> bool:
        """Whether ``peer`` is one of :meth:`connected` (a stranger never is); O(1)."""
        at = self.neighbours.position(peer)
        return at is not None and bool(self._up[at])

    @property
    def connected_count(self) -> int:
        """``len(self.connected())`` without building the view."""
        return self._count

    def connect(self, peer: NodeId) -> None:
        """Mark an admitted peer connected and give it a fresh replay window."""
        at = self.neighbours.position(peer)
        if at is None:
            self._strangers_connected.add(peer)
            self._strangers.pop(peer, None)
            self._stranger_window(peer)
            return
        self._windows.pop(peer.raw, None)
        self._set(at, 1)

    def connect_all(self) -> None:
        """Mark every neighbour connected, each with a fresh replay window."""
        self._windows.clear()
        self._up = bytearray(b"\x01") * len(self.neighbours)
        self._count = len(self.neighbours)
        self._tree = None

    def disconnect(self, peer: NodeId) -> None:
        at = self.neighbours.position(peer)
        if at is None:
            self._strangers_connected.discard(peer)
        else:
            self._set(at, 0)

    def _set(self, at: int, flag: int) -> None:
        delta = flag - self._up[at]
        if not delta:
            return
        self._up[at] = flag
        self._count += delta
        tree = self._tree
        if tree is not None:
            index = at + 1
            while index < len(tree):
                tree[index] += delta
                index += index & -index

    def _select(self, rank: int) -> int:
        """The neighbour index of the connected neighbour of rank ``rank`` (0-based)."""
        if self._count == len(self._up):
            return rank
        tree = self._tree
        if tree is None:
            tree = self._tree = _fenwick(self._up)
        position, remaining = 0, rank + 1
        step = 1 << (len(tree) - 1).bit_length()
        while step:
            following = position + step
            if following < len(tree) and tree[following] < remaining:
                position = following
                remaining -= tree[following]
            step >>= 1
        return position

    def connected(self) -> Sequence[NodeId]:
        """The connected neighbours, in key order: a live view (copy it to keep it);
        ``len`` and indexing are O(log degree)."""
        return _Connected(self)

    def connected_strangers(self) -> tuple[NodeId, ...]:
        """The connected peers that are not neighbours, in key order."""
        return tuple(sorted(self._strangers_connected, key=lambda peer: peer.raw))

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
        window = self._windows.get(peer.raw)
        if window is None:
            if self.neighbours.position(peer) is not None:
                window = self._windows[peer.raw] = ReplayWindow(self._window_size)
            elif self.admits(peer):
                window = self._stranger_window(peer)
            else:
                raise KeyError(peer)
        window.check(seq)


def _fenwick(flags: bytearray) -> list[int]:
    """A 1-based Fenwick tree of ``flags``: entry i sums flags (i - lowbit(i), i]."""
    tree = [0, *flags]
    size = len(tree)
    for index in range(1, size):
        parent = index + (index & -index)
        if parent < size:
            tree[parent] += tree[index]
    return tree
