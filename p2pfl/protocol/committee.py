"""Deterministic committee derivation and the availability search, both sans-IO.

Theory of operation
-------------------
*Ordering.* The candidates of sample index ``r`` are sorted by
``SHA-256(public key || r as 8-byte big-endian)`` (ties, which need a hash collision, by key).
Any two nodes with the same candidates derive the same order without communicating.

*Availability.* A :class:`Selection` walks one ordering and finds the first ``target``
candidates that answer an availability ping. It keeps ``target - found - waiting`` pings in
flight: it pings the next candidates of the order, counts this node and peers already known to
be available for this index without pinging them, and when a ping is not answered within
``ping_timeout`` it pings the next candidate. It is done once ``target`` peers answered or the
order is exhausted with nothing in flight. The driver (the core) sends the pings it returns,
routes pongs to :meth:`Selection.pong` and wakes it with :meth:`Selection.expire`. The target
may grow later (:meth:`Selection.grow`), which is how a trainer fails over to the next
aggregator.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Sequence

from p2pfl.identity import NodeId


def sample_key(peer: NodeId, index: int) -> bytes:
    """``SHA-256(peer || index as 8-byte big-endian)``: a peer's place in ordering ``index``."""
    return hashlib.sha256(peer.raw + index.to_bytes(8, "big")).digest()


def ordering(candidates: Iterable[NodeId], index: int) -> tuple[NodeId, ...]:
    """``candidates`` sorted by :func:`sample_key` for ``index`` (duplicates collapse)."""
    return tuple(sorted(set(candidates), key=lambda peer: (sample_key(peer, index), peer.raw)))


def first_available(
    order: Sequence[NodeId], count: int, available: Collection[NodeId]
) -> tuple[NodeId, ...]:
    """The first ``count`` members of ``order`` that are in ``available``."""
    chosen: list[NodeId] = []
    for peer in order:
        if len(chosen) >= count:
            break
        if peer in available:
            chosen.append(peer)
    return tuple(chosen)


class Selection:
    """The search for the first ``target`` available candidates of one ordering."""

    __slots__ = (
        "_found",
        "_known",
        "_next",
        "_position",
        "_taken",
        "_waiting",
        "index",
        "order",
        "own",
        "target",
    )

    def __init__(
        self,
        order: Sequence[NodeId],
        target: int,
        *,
        index: int,
        own: NodeId,
        known_available: Collection[NodeId] = (),
    ) -> None:
        self.order = tuple(order)
        self.target = target
        self.index = index
        self.own = own
        self._position = {peer: at for at, peer in enumerate(self.order)}
        self._known = known_available
        self._next = 0
        self._waiting: dict[NodeId, float] = {}
        self._found: list[NodeId] = []
        self._taken = 0

    @property
    def done(self) -> bool:
        if len(self._found) >= self.target:
            return True
        return self._next >= len(self.order) and not self._waiting

    @property
    def deadline(self) -> float | None:
        return min(self._waiting.values()) if self._waiting else None

    def waiting_for(self, peer: NodeId) -> bool:
        return peer in self._waiting

    def pump(self, now: float, timeout: float) -> list[NodeId]:
        """Start as many pings as are missing; returns the peers to ping now."""
        pings: list[NodeId] = []
        while (
            not self.done
            and len(self._found) + len(self._waiting) < self.target
            and self._next < len(self.order)
        ):
            peer = self.order[self._next]
            self._next += 1
            if peer == self.own or peer in self._known:
                self._found.append(peer)
            else:
                self._waiting[peer] = now + timeout
                pings.append(peer)
        if self.done:
            self._waiting.clear()
        return pings

    def pong(self, peer: NodeId) -> bool:
        """``peer`` answered; True if this selection was waiting for it."""
        if self._waiting.pop(peer, None) is None:
            return False
        self._found.append(peer)
        if self.done:
            self._waiting.clear()
        return True

    def expire(self, now: float) -> None:
        """Give up on the pings whose timeout has passed (call :meth:`pump` next)."""
        for peer in [peer for peer, until in self._waiting.items() if until <= now]:
            del self._waiting[peer]

    def grow(self, extra: int = 1) -> None:
        """Look for ``extra`` more peers (call :meth:`pump` next)."""
        self.target += extra

    def found(self) -> tuple[NodeId, ...]:
        """Everyone found so far, in ordering position."""
        return tuple(sorted(self._found, key=self._position.__getitem__))

    def take_new(self) -> tuple[NodeId, ...]:
        """Found peers not yet returned by an earlier call, in ordering position."""
        fresh = self._found[self._taken :]
        self._taken = len(self._found)
        return tuple(sorted(fresh, key=self._position.__getitem__))
