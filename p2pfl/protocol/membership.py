"""A bounded, signed view of the population, merged from copies piggybacked on model traffic.

Theory of operation
-------------------
Each node keeps one :class:`Membership`: for every peer it knows, the last round the peer was
seen active and its latest *advertisement* ``(counter, JOIN | LEAVE)``. An advertisement is
signed by the peer it concerns, over ``ADVERT_CONTEXT || key || counter (8 bytes, big-endian)
|| status``, so a relay can forward one but never forge or alter one. The last-active round is
not signed (anyone may vouch that a peer looked alive); it can only keep a dead peer a little
longer among the candidates, where an availability ping then skips it.

Merge rule (a join-semilattice, so views converge whatever order copies arrive in)::

    active  = max(active_a, active_b)
    advert  = the one with the larger (counter, status), LEAVE > JOIN at equal counters

A copy travels as at most ``view_entries`` :class:`Record` s per message (:meth:`piggyback`:
the own record, then the most recently changed half, then a random draw from the rest), so the
traffic a view adds to a message is bounded whatever the population size. Only records whose
signature this node holds are forwarded; bootstrap knowledge (the configured neighbours,
counter 0, JOIN) is trusted locally but never sent.

Incoming copies (:meth:`merge`) are checked before anything changes: a record that would teach
this node something (an unknown peer, a larger advertisement, or a signature it lacks) must
carry a valid signature, else the whole copy is refused with
:class:`~p2pfl.errors.RemoteProtocolError` and the view is untouched. Records that teach
nothing are not verified: verification costs ~0.1 ms, so each advertisement is verified about
once per node. A newcomer's JOIN (an unknown peer, or one this node holds as LEAVE) waits in a
*pending* set until :meth:`apply_pending`, which a node calls when it next sends a model, so a
newcomer is not pulled into the very next sample. A LEAVE applies at once.

The *candidates* of sample index ``r`` (:meth:`candidates`) are this node and every peer whose
advertisement is JOIN, that was active at a round ``>= r - inactivity_threshold`` and that is
not locally *suspected* (an aggregator that refused a model; cleared when the peer is seen
active in a later round). Memory is bounded by ``capacity``: when full, the peer that left
first, then the one inactive longest, is forgotten.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from p2pfl.errors import BadSignature, RemoteProtocolError
from p2pfl.identity import NODE_ID_BYTES, SIGNATURE_BYTES, Identity, NodeId

ADVERT_CONTEXT = b"p2pfl/membership/v1\x00"
MAX_RECORDS_PER_MESSAGE = 256
"""A received view holding more records than this is refused (``wire.Limits`` caps lists at 1024)."""
MAX_COUNTER = 2**63 - 1


class Status(enum.IntEnum):
    """What a peer last advertised about itself."""

    JOIN = 0
    LEAVE = 1


def advert_bytes(peer: NodeId, counter: int, status: Status) -> bytes:
    """The exact bytes an advertisement's signature covers."""
    return ADVERT_CONTEXT + peer.raw + counter.to_bytes(8, "big") + bytes([int(status)])


@dataclass(frozen=True, slots=True)
class Advert:
    """``peer`` says it is ``status`` as of its ``counter``-th advertisement."""

    peer: NodeId
    counter: int
    status: Status
    signature: bytes | None = None
    """None only for bootstrap knowledge, which is never forwarded."""

    @property
    def rank(self) -> tuple[int, int]:
        return (self.counter, int(self.status))

    def verify(self) -> None:
        """Raises:
        RemoteProtocolError: no signature, or one that does not verify.
        """
        if self.signature is None:
            raise RemoteProtocolError(f"unsigned membership record for {self.peer}")
        try:
            self.peer.verify(self.signature, advert_bytes(self.peer, self.counter, self.status))
        except BadSignature as exc:
            raise RemoteProtocolError(f"forged membership record for {self.peer}") from exc


def sign_advert(identity: Identity, counter: int, status: Status) -> Advert:
    """The own advertisement, signed.

    Raises:
        ValueError: ``counter`` outside ``0 .. 2**63 - 1``.
    """
    if not 0 <= counter <= MAX_COUNTER:
        raise ValueError(f"advertisement counter {counter} outside 0..{MAX_COUNTER}")
    peer = identity.node_id
    signature = identity.sign(advert_bytes(peer, counter, status))
    return Advert(peer, counter, status, signature)


@dataclass(frozen=True, slots=True)
class Record:
    """One view entry as it travels: a signed advertisement and a last-active round."""

    advert: Advert
    active: int

    def to_wire(self) -> list[Any]:
        advert = self.advert
        assert advert.signature is not None, "only signed records are forwarded"
        return [advert.peer.raw, self.active, advert.counter, int(advert.status), advert.signature]


def parse_records(raw: object, *, max_round: int) -> list[Record]:
    """Records from a message's ``meta["view"]`` (None: no view); signatures are not checked.

    ``max_round`` caps each last-active round (a record cannot vouch beyond the message).

    Raises:
        RemoteProtocolError: not a list of well-formed records, or too many.
    """
    if raw is None:
        return []
    if not isinstance(raw, list) or len(raw) > MAX_RECORDS_PER_MESSAGE:
        raise RemoteProtocolError(f"view is not a list of <= {MAX_RECORDS_PER_MESSAGE} records")
    records = []
    for item in raw:
        if not (isinstance(item, list) and len(item) == 5):
            raise RemoteProtocolError("view record is not a 5-element list")
        key, active, counter, status, signature = item
        if not (isinstance(key, bytes) and len(key) == NODE_ID_BYTES):
            raise RemoteProtocolError("view record key is not 32 bytes")
        if not (isinstance(signature, bytes) and len(signature) == SIGNATURE_BYTES):
            raise RemoteProtocolError("view record signature is not 64 bytes")
        if not all(_is_count(value) for value in (active, counter)) or counter > MAX_COUNTER:
            raise RemoteProtocolError("view record round or counter is not an int >= 0")
        if status not in (Status.JOIN, Status.LEAVE) or isinstance(status, bool):
            raise RemoteProtocolError(f"view record status {status!r} is not 0 or 1")
        advert = Advert(NodeId(key), counter, Status(status), signature)
        records.append(Record(advert, min(active, max_round)))
    return records


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(slots=True)
class _Entry:
    advert: Advert
    active: int
    changed: int
    """Local logical time of the last change; the most recent are piggybacked first."""


class Membership:
    """One node's view of the population; see the module docstring."""

    __slots__ = (
        "_clock",
        "_entries",
        "_identity",
        "_pending",
        "_suspects",
        "capacity",
        "inactivity_threshold",
        "own",
    )

    def __init__(
        self,
        identity: Identity,
        bootstrap: Iterable[NodeId],
        *,
        start_round: int = 0,
        counter: int = 0,
        capacity: int = 4096,
        inactivity_threshold: int = 50,
    ) -> None:
        """Know ``bootstrap`` (trusted: JOIN, counter 0, active at ``start_round``) and self.

        Raises:
            ValueError: ``counter`` out of range.
        """
        self._identity = identity
        self.own = identity.node_id
        self.capacity = capacity
        self.inactivity_threshold = inactivity_threshold
        self._clock = itertools.count()
        self._entries: dict[NodeId, _Entry] = {}
        self._pending: dict[NodeId, Record] = {}
        self._suspects: dict[NodeId, int] = {}
        own = sign_advert(identity, counter, Status.JOIN)
        self._entries[self.own] = _Entry(own, start_round, next(self._clock))
        for peer in sorted(set(bootstrap) - {self.own}):
            if len(self._entries) >= capacity:
                break
            advert = Advert(peer, 0, Status.JOIN)
            self._entries[peer] = _Entry(advert, start_round, next(self._clock))

    # -- queries ------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, peer: object) -> bool:
        return peer in self._entries

    def advert(self, peer: NodeId) -> Advert | None:
        entry = self._entries.get(peer)
        return None if entry is None else entry.advert

    def last_active(self, peer: NodeId) -> int | None:
        entry = self._entries.get(peer)
        return None if entry is None else entry.active

    @property
    def pending(self) -> frozenset[NodeId]:
        return frozenset(self._pending)

    def own_record(self) -> Record:
        entry = self._entries[self.own]
        return Record(entry.advert, entry.active)

    def peers(self) -> tuple[NodeId, ...]:
        """Every known peer but this node, in key order."""
        return tuple(sorted(peer for peer in self._entries if peer != self.own))

    def is_candidate(self, peer: NodeId, index: int) -> bool:
        if peer == self.own:
            return self._entries[peer].advert.status is Status.JOIN
        entry = self._entries.get(peer)
        return (
            entry is not None
            and entry.advert.status is Status.JOIN
            and entry.active >= index - self.inactivity_threshold
            and peer not in self._suspects
        )

    def candidates(self, index: int) -> tuple[NodeId, ...]:
        """Who may be sampled for index ``index``, in key order."""
        return tuple(sorted(peer for peer in self._entries if self.is_candidate(peer, index)))

    # -- local changes ------------------------------------------------------------------

    def set_round(self, round: int) -> None:
        """This node is active in ``round``."""
        self.observe(self.own, round)

    def observe(self, peer: NodeId, round: int) -> None:
        """``peer`` showed itself active at ``round`` (a message from it); unknown peers wait
        for a signed record."""
        entry = self._entries.get(peer)
        if entry is None:
            return
        suspected = self._suspects.get(peer)
        if suspected is not None and round > suspected:
            del self._suspects[peer]
        if round > entry.active:
            entry.active = round
            entry.changed = next(self._clock)

    def suspect(self, peer: NodeId, round: int) -> None:
        """Leave ``peer`` out of the candidates until it is seen active after ``round``."""
        if peer != self.own and peer in self._entries:
            self._suspects[peer] = max(round, self._suspects.get(peer, round))

    def announce(self, status: Status) -> Record:
        """Advertise a new own status (JOIN again, or LEAVE); returns the signed record."""
        entry = self._entries[self.own]
        entry.advert = sign_advert(self._identity, entry.advert.counter + 1, status)
        entry.changed = next(self._clock)
        return Record(entry.advert, entry.active)

    # -- copies from peers --------------------------------------------------------------

    def merge(self, records: Sequence[Record]) -> None:
        """Merge a received copy; JOINs of newcomers wait for :meth:`apply_pending`.

        Raises:
            RemoteProtocolError: a record that is news does not carry a valid signature; the
                view is left unchanged.
        """
        news = [record for record in records if self._is_news(record)]
        for record in news:
            record.advert.verify()
        news_ids = {id(record) for record in news}
        for record in records:
            peer = record.advert.peer
            if peer == self.own:
                continue
            is_news = id(record) in news_ids and self._is_news(record)
            joins = record.advert.status is Status.JOIN
            entry = self._entries.get(peer)
            if entry is None:
                if is_news and not joins:
                    self._insert(record)
                elif is_news or peer in self._pending:
                    self._hold(record)  # a stale record still vouches for activity
                continue
            if entry.advert.status is Status.LEAVE and joins and is_news:
                self._hold(record)
                continue
            changed = False
            if is_news and record.advert.rank >= entry.advert.rank:
                changed = entry.advert.rank != record.advert.rank
                entry.advert = record.advert
            if record.active > entry.active:
                entry.active = record.active
                changed = True
            if changed:
                entry.changed = next(self._clock)
                if entry.advert.status is Status.LEAVE:
                    self._drop_pending(entry, peer)

    def apply_pending(self) -> None:
        """Admit the JOINs held since the last call (a node calls this when it sends a model)."""
        pending, self._pending = self._pending, {}
        for peer in sorted(pending):
            record = pending[peer]
            entry = self._entries.get(peer)
            if entry is None:
                self._insert(record)
            elif record.advert.rank > entry.advert.rank or record.active > entry.active:
                if record.advert.rank > entry.advert.rank:
                    entry.advert = record.advert
                entry.active = max(entry.active, record.active)
                entry.changed = next(self._clock)

    def _is_news(self, record: Record) -> bool:
        peer = record.advert.peer
        if peer == self.own:
            return False
        held = self._pending.get(peer)
        if held is not None and record.advert.rank > held.advert.rank:
            return True
        entry = self._entries.get(peer)
        if entry is None:
            return held is None or record.advert.rank > held.advert.rank
        if record.advert.rank > entry.advert.rank:
            return True
        return record.advert.rank == entry.advert.rank and entry.advert.signature is None

    def _hold(self, record: Record) -> None:
        peer = record.advert.peer
        held = self._pending.get(peer)
        if held is None:
            if len(self._pending) >= self.capacity:
                weakest = min(self._pending, key=lambda p: (self._pending[p].active, p.raw))
                if (self._pending[weakest].active, weakest.raw) >= (record.active, peer.raw):
                    return
                del self._pending[weakest]
            self._pending[peer] = record
            return
        advert = record.advert if record.advert.rank > held.advert.rank else held.advert
        self._pending[peer] = Record(advert, max(record.active, held.active))

    def _insert(self, record: Record) -> None:
        peer = record.advert.peer
        if len(self._entries) >= self.capacity and not self._evict(record):
            return
        entry = _Entry(record.advert, record.active, next(self._clock))
        self._entries[peer] = entry
        if record.advert.status is Status.LEAVE:
            self._drop_pending(entry, peer)

    def _drop_pending(self, entry: _Entry, peer: NodeId) -> None:
        """A LEAVE overtook a held JOIN: forget the JOIN, keep the round it vouched for."""
        held = self._pending.get(peer)
        if held is None or held.advert.rank > entry.advert.rank:
            return
        del self._pending[peer]
        entry.active = max(entry.active, held.active)

    def _evict(self, newcomer: Record) -> bool:
        """Make room for ``newcomer`` by forgetting the peer that left first, then the one
        inactive longest, unless that would be the newcomer itself; True if room was made."""

        def worth(peer: NodeId, status: Status, active: int) -> tuple[bool, int, bytes]:
            return (status is Status.JOIN, active, peer.raw)

        others = [peer for peer in self._entries if peer != self.own]
        if not others:
            return False
        victim = min(
            others,
            key=lambda peer: worth(
                peer, self._entries[peer].advert.status, self._entries[peer].active
            ),
        )
        entry = self._entries[victim]
        advert = newcomer.advert
        if worth(victim, entry.advert.status, entry.active) >= worth(
            advert.peer, advert.status, newcomer.active
        ):
            return False
        del self._entries[victim]
        self._suspects.pop(victim, None)
        return True

    # -- copies to peers ----------------------------------------------------------------

    def piggyback(self, limit: int, rng: np.random.Generator) -> list[Record]:
        """At most ``limit`` signed records: own, the most recently changed half, random rest."""
        own = self.own_record()
        signed = [
            (peer, entry)
            for peer, entry in self._entries.items()
            if peer != self.own and entry.advert.signature is not None
        ]
        room = limit - 1
        if room <= 0 or not signed:
            return [own]
        signed.sort(key=lambda item: (-item[1].changed, item[0].raw))
        fresh = signed[: max(1, room // 2)] if room < len(signed) else signed
        rest = signed[len(fresh) :]
        extra = room - len(fresh)
        if extra > 0 and rest:
            rest.sort(key=lambda item: item[0].raw)
            picks = rng.choice(len(rest), size=min(extra, len(rest)), replace=False)
            fresh = fresh + [rest[int(index)] for index in sorted(picks)]
        return [own, *(Record(entry.advert, entry.active) for _, entry in fresh)]
