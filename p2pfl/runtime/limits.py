"""Bounded bookkeeping for a node under hostile traffic: rate buckets, bans, failure counts.

Theory of operation
-------------------
Everything here is a plain object driven with an explicit ``now`` (seconds on any monotonic
clock; the node passes ``trio.current_time()``), so tests drive it with numbers and never
sleep. Every container has a fixed capacity chosen by the caller, and none grows with the
traffic an attacker can send:

- :class:`TokenBucket` admits ``rate`` events per second with bursts up to ``burst``, plus
  whatever :meth:`TokenBucket.credit` adds; the node keeps one per authenticated connection
  and counts an event it refuses as a strike.
- :func:`peer_allowance` sizes that bucket from the protocol settings, because a peer's
  legitimate traffic is paced by rounds, not seconds: a ``dsgd`` neighbour sends one model
  per round (plus two history records with history gossip), however fast rounds go when
  training is short. The node credits every bucket ``per_round`` tokens each time its own
  round advances, and the bucket refills ``per_second`` tokens per second for the traffic that
  time paces (gossip pushes, keep-alives, peer exchange, a peer running rounds alone on its
  ``round_timeout``). A peer flooding faster than both is still refused and struck.
- :class:`BanList` maps a key (a peer's ``NodeId``, or a remote IP address for peers that
  failed before authenticating) to the time its ban ends. Expired bans are dropped when
  seen; when the list is full, the ban that ends soonest is evicted to make room.
- :class:`FailureCounter` counts failures per key within a sliding window (a fixed-window
  approximation: the count resets once ``window`` seconds passed since the first failure).
  When full it forgets the least recently failing key, so a flood of distinct addresses
  costs at most ``capacity`` entries.

Bans live in memory only: a restarted node starts with an empty list (documented in the
README, "Operate a node").
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from p2pfl.protocol import mode_traits
from p2pfl.protocol.config import CoreConfig

K = TypeVar("K", bound=Hashable)

ALLOWANCE_MARGIN = 2.0
"""Factor over what the protocol sends, so reordering and jitter never strike an honest peer."""
HISTORY_FRAMES = 2
"""History gossip adds, per model sent, the sender's own record and one relayed record."""
PEER_EXCHANGE_MIN_FACTOR = 0.8
"""Peer exchange sleeps ``interval * U(0.8, 1.2)`` between advertisements."""


@dataclass(frozen=True, slots=True)
class PeerAllowance:
    """What one authenticated peer may send: the shape of its token bucket."""

    per_round: float
    """Tokens credited each time this node's round advances."""
    per_second: float
    """Tokens refilled per second whatever the rounds do."""
    burst: float
    """Tokens banked at most (the bucket starts full)."""

    def bucket(self, now: float) -> TokenBucket:
        """A full bucket of this allowance."""
        return TokenBucket(self.per_second, self.burst, now=now)


def peer_allowance(
    protocol: CoreConfig,
    *,
    base_rate: float,
    base_burst: float,
    histories: bool,
    idle_timeout: float | None,
    exchange_interval: float | None,
) -> PeerAllowance:
    """Size a peer's bucket from the protocol it runs, assuming peers configured alike.

    Args:
        protocol: the core's settings; its mode's declared traffic
            (:attr:`~p2pfl.protocol.core.ModeTraits.traffic`) and rounds ahead.
        base_rate: ``node.peer_message_rate``: frames per second always allowed.
        base_burst: ``node.peer_message_burst``: frames always allowed at once.
        histories: whether models are followed by history records (history gossip).
        idle_timeout: the idle watchdog's timeout (keep-alives at a third of it), or None.
        exchange_interval: seconds between peer-exchange messages, or None when off.

    Returns:
        ``base_*`` plus ``ALLOWANCE_MARGIN`` times what the protocol sends per round and per
        second, and a burst covering every round a peer may legitimately run ahead.
    """
    model = 1 + (HISTORY_FRAMES if histories else 0)
    traffic = mode_traits(protocol.mode).traffic
    per_round, per_second = traffic(protocol, model) if traffic is not None else (0.0, 0.0)
    if idle_timeout is not None:
        per_second += 3.0 / idle_timeout
    if exchange_interval is not None:
        per_second += 1.0 / (PEER_EXCHANGE_MIN_FACTOR * exchange_interval)
    ahead = protocol.max_rounds_ahead + 2  # the rounds buffered ahead, the current, one late
    return PeerAllowance(
        per_round=ALLOWANCE_MARGIN * per_round,
        per_second=base_rate + ALLOWANCE_MARGIN * per_second,
        burst=base_burst + ALLOWANCE_MARGIN * per_round * ahead,
    )


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` banked; each admitted event takes one."""

    __slots__ = ("_stamp", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, *, now: float) -> None:
        """Start full at ``now``.

        Raises:
            ValueError: ``rate`` or ``burst`` is not a positive finite number.
        """
        if not (math.isfinite(rate) and rate > 0 and math.isfinite(burst) and burst >= 1):
            raise ValueError(f"a token bucket needs rate > 0 and burst >= 1, got {rate}, {burst}")
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._stamp = now

    def take(self, now: float, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens if there are that many; ``False`` (nothing taken) otherwise."""
        if now > self._stamp:
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
        if self._tokens >= cost:
            self._tokens -= cost
            return True
        return False

    def credit(self, tokens: float) -> None:
        """Add ``tokens`` (never beyond ``burst``): allowance earned by protocol progress."""
        self._tokens = min(self.burst, self._tokens + tokens)

    @property
    def tokens(self) -> float:
        """Tokens banked at the last :meth:`take` or :meth:`credit`."""
        return self._tokens


class BanList(Generic[K]):
    """Keys banned until a time; bounded, expired entries dropped lazily."""

    __slots__ = ("_counter", "_heap", "_until", "capacity", "evicted")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("a ban list holds at least one entry")
        self.capacity = capacity
        self._until: dict[K, float] = {}
        self._heap: list[tuple[float, int, K]] = []
        self._counter = 0
        self.evicted = 0

    def ban(self, key: K, until: float, *, now: float) -> None:
        """Ban ``key`` until ``until`` (a longer existing ban is kept)."""
        self.expire(now)
        if until <= now:
            return
        current = self._until.get(key)
        if current is not None and current >= until:
            return
        if current is None and len(self._until) >= self.capacity:
            self._evict_one()
        self._until[key] = until
        self._counter += 1
        heapq.heappush(self._heap, (until, self._counter, key))
        self._compact()

    def banned_until(self, key: K, now: float) -> float | None:
        """When ``key``'s ban ends, or ``None`` if it is not banned at ``now``."""
        until = self._until.get(key)
        if until is None:
            return None
        if until <= now:
            del self._until[key]
            return None
        return until

    def is_banned(self, key: K, now: float) -> bool:
        return self.banned_until(key, now) is not None

    def unban(self, key: K) -> None:
        self._until.pop(key, None)

    def expire(self, now: float) -> None:
        """Drop every ban that ended by ``now``."""
        while self._heap and self._heap[0][0] <= now:
            until, _, key = heapq.heappop(self._heap)
            if self._until.get(key) == until:
                del self._until[key]

    def active(self, now: float) -> int:
        """Bans in force at ``now``."""
        self.expire(now)
        return len(self._until)

    def __len__(self) -> int:
        return len(self._until)

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._until))

    def _evict_one(self) -> None:
        while self._heap:
            until, _, key = heapq.heappop(self._heap)
            if self._until.get(key) == until:
                del self._until[key]
                self.evicted += 1
                return

    def _compact(self) -> None:
        # Re-banning a key leaves its old heap entry behind; rebuild when stale ones dominate.
        if len(self._heap) > 2 * self.capacity + 16:
            self._heap = [(u, i, k) for i, (k, u) in enumerate(self._until.items())]
            heapq.heapify(self._heap)


class FailureCounter(Generic[K]):
    """Failures per key within ``window`` seconds; at most ``capacity`` keys remembered."""

    __slots__ = ("_entries", "capacity", "window")

    def __init__(self, capacity: int, window: float) -> None:
        if capacity < 1 or not window > 0:
            raise ValueError("a failure counter needs capacity >= 1 and window > 0")
        self.capacity = capacity
        self.window = window
        self._entries: OrderedDict[K, tuple[float, int]] = OrderedDict()

    def record(self, key: K, now: float) -> int:
        """Count one failure of ``key`` at ``now``; returns its count within the window."""
        entry = self._entries.pop(key, None)
        if entry is None or now - entry[0] >= self.window:
            entry = (now, 0)
        entry = (entry[0], entry[1] + 1)
        self._entries[key] = entry
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return entry[1]

    def count(self, key: K, now: float) -> int:
        entry = self._entries.get(key)
        if entry is None or now - entry[0] >= self.window:
            return 0
        return entry[1]

    def forget(self, key: K) -> None:
        self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)
