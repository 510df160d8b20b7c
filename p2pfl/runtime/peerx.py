"""Peer exchange: learn other nodes' addresses and keys from authenticated neighbours.

Theory of operation
-------------------
Every ``interval`` seconds a node sends each connected peer one ``PEER_EXCHANGE`` frame
listing up to ``max_per_message`` peers it is connected to *now* (so it only vouches for keys
it authenticated itself) and can dial (it knows their listening address), leaving out the
recipient. The payload is a msgpack array of ``[address, key]`` pairs; the frame's signature
binds it, so each entry is signed by the neighbour that advertises it.

A receiving node checks, cheapest first: the frame comes from the connection's own peer; it
passes the peer's token bucket for peer exchange (``min_interval`` seconds between frames
per peer; a faster peer is ignored and counted); the payload is at most ``max_payload_bytes``
and a msgpack array of at most ``max_per_message`` pairs (more is misbehaviour: a strike).
Entries for this node, the advertising peer, configured peers, banned keys or with a bad
address are skipped. The rest go into a :class:`PeerBook` of at most ``max_known`` entries;
when it is full the oldest learned entry makes room.

Learned peers are *candidates*. Whether a node connects to them is a config decision
(``node.accept_unknown_peers``, default false, and ``node.max_peers``); the node's
connections (:mod:`p2pfl.runtime.connections`) do that, not this module.

:class:`PeerExchange` is a node's side of it: the per-peer buckets, the checks above on every
received frame (refusals and strikes go to the node's
:class:`~p2pfl.runtime.defences.Defences`), the book, and the task that advertises. Advertised entries are never forwarded as such: a node advertises
only peers it is connected to, so a lying neighbour cannot spread invented peers further
than one hop.
"""

from __future__ import annotations

import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Container, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgpack
import trio

from p2pfl.errors import DecodeError, WireError
from p2pfl.identity import NODE_ID_BYTES, Identity, NodeId
from p2pfl.runtime.limits import TokenBucket
from p2pfl.runtime.logs import log_event
from p2pfl.wire import Envelope, MessageKind, PayloadSpec, seal

if TYPE_CHECKING:
    from p2pfl.config import PeerExchangeConfig
    from p2pfl.runtime.defences import Defences
    from p2pfl.runtime.peer import PeerConnection

log = logging.getLogger("p2pfl.node")

DEFAULT_MAX_PER_MESSAGE = 32
DEFAULT_MAX_KNOWN = 256
MAX_ADDRESS_CHARS = 262  # "[" + 255-char host + "]:" + 5-digit port ... rounded
PEERX_CODEC = "peers"


@dataclass(frozen=True, slots=True)
class PeerAd:
    """One advertised peer: where to dial it and the key it must prove there."""

    address: str
    node_id: NodeId

    @property
    def host_port(self) -> tuple[str, int]:
        """The address split; :func:`parse_address` checked it already."""
        parsed = parse_address(self.address)
        assert parsed is not None
        return parsed


@dataclass(frozen=True, slots=True)
class LearnedPeer:
    """A peer in the book: the ad, who advertised it and when (node clock seconds)."""

    ad: PeerAd
    learned_from: NodeId
    learned_at: float


def parse_address(text: str) -> tuple[str, int] | None:
    """``host:port`` (``[v6]:port``) as ``(host, port)``, or ``None`` if it is not one."""
    if len(text) > MAX_ADDRESS_CHARS:
        return None
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or len(port_text) > 5:
        return None
    port = int(port_text)
    if not 1 <= port <= 65535 or any(c.isspace() or c in "/@?#" for c in host):
        return None
    return host, port


def encode_ads(ads: Iterable[PeerAd]) -> bytes:
    """The payload of a ``PEER_EXCHANGE`` frame."""
    packed: bytes = msgpack.packb([[ad.address, ad.node_id.raw] for ad in ads], use_bin_type=True)
    return packed


def decode_ads(
    payload: bytes | bytearray | memoryview, *, max_per_message: int, max_payload_bytes: int
) -> list[PeerAd]:
    """Parse a ``PEER_EXCHANGE`` payload; malformed *entries* are skipped.

    Raises:
        DecodeError: the payload is too large, not a msgpack array, or holds more than
            ``max_per_message`` entries.
    """
    view = memoryview(payload).cast("B")
    if view.nbytes > max_payload_bytes:
        raise DecodeError(f"peer list of {view.nbytes} bytes exceeds {max_payload_bytes}")
    try:
        raw = msgpack.unpackb(
            view,
            raw=False,
            use_list=True,
            max_array_len=max(max_per_message, 2),
            max_map_len=0,
            max_ext_len=0,
            max_str_len=MAX_ADDRESS_CHARS,
            max_bin_len=NODE_ID_BYTES,
        )
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.UnpackException) as exc:
        raise DecodeError(f"peer list is not valid msgpack: {exc}") from exc
    if not isinstance(raw, list):
        raise DecodeError("peer list is not an array")
    if len(raw) > max_per_message:
        raise DecodeError(f"peer list of {len(raw)} entries exceeds {max_per_message}")
    ads: list[PeerAd] = []
    for entry in raw:
        if not (isinstance(entry, list) and len(entry) == 2):
            continue
        address, key = entry
        if not isinstance(address, str) or not isinstance(key, bytes):
            continue
        if len(key) != NODE_ID_BYTES or parse_address(address) is None:
            continue
        ads.append(PeerAd(address, NodeId(key)))
    return ads


def seal_ads(identity: Identity, ads: list[PeerAd], *, seq: int) -> Envelope:
    """A signed ``PEER_EXCHANGE`` envelope advertising ``ads``."""
    return seal(
        identity,
        MessageKind.PEER_EXCHANGE,
        seq=seq,
        round=0,
        payload=encode_ads(ads),
        spec=PayloadSpec(codec=PEERX_CODEC, dtype="", shape=(len(ads),), samples=0),
    )


class PeerBook:
    """Learned peers, at most ``max_known``; the oldest learned entry makes room."""

    __slots__ = ("_peers", "evicted", "max_known", "rejected")

    def __init__(self, max_known: int = DEFAULT_MAX_KNOWN) -> None:
        if max_known < 0:
            raise ValueError("max_known must be >= 0")
        self.max_known = max_known
        self._peers: OrderedDict[NodeId, LearnedPeer] = OrderedDict()
        self.evicted = 0
        self.rejected = 0

    def learn(
        self,
        ads: Iterable[PeerAd],
        *,
        advertiser: NodeId,
        own: NodeId,
        now: float,
        skip: Callable[[NodeId], bool] = lambda _: False,
    ) -> list[PeerAd]:
        """Add the acceptable ``ads``; returns those that were new.

        ``skip`` names keys never to record (configured peers, banned keys).
        """
        new: list[PeerAd] = []
        for ad in ads:
            key = ad.node_id
            if key in (own, advertiser) or skip(key) or self.max_known == 0:
                self.rejected += 1
                continue
            known = self._peers.get(key)
            if known is not None:
                if known.ad.address != ad.address:
                    # Keep the first address heard; a second voice does not move a peer.
                    self.rejected += 1
                continue
            if len(self._peers) >= self.max_known:
                self._peers.popitem(last=False)
                self.evicted += 1
            self._peers[key] = LearnedPeer(ad, advertiser, now)
            new.append(ad)
        return new

    def forget(self, key: NodeId) -> None:
        self._peers.pop(key, None)

    def get(self, key: NodeId) -> LearnedPeer | None:
        return self._peers.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._peers

    def __len__(self) -> int:
        return len(self._peers)

    def __iter__(self) -> Iterator[LearnedPeer]:
        return iter(list(self._peers.values()))


class PeerExchange:
    """One node's peer exchange: checks received lists, keeps the book, advertises.

    Attributes:
        book: the learned peers.
    """

    def __init__(
        self,
        identity: Identity,
        settings: PeerExchangeConfig,
        defences: Defences,
        *,
        configured: Container[NodeId],
        jitter: random.Random,
    ) -> None:
        """Start with an empty book; nothing runs until :meth:`run`.

        Args:
            identity: this node's key (signs the lists, and is never learned).
            settings: ``[peer_exchange]``.
            defences: where refusals and strikes are counted.
            configured: the configured peers' keys, never recorded as learned.
            jitter: spreads the advertising times.
        """
        self.identity = identity
        self.settings = settings
        self.book = PeerBook(settings.max_known_peers)
        self._defences = defences
        self._configured = configured
        self._jitter = jitter
        self._buckets: dict[NodeId, TokenBucket] = {}

    def open_peer(self, peer: NodeId) -> None:
        """A connection to ``peer`` starts: it may send two lists per interval."""
        self._buckets[peer] = TokenBucket(
            2.0 / self.settings.interval, 2.0, now=trio.current_time()
        )

    def close_peer(self, peer: NodeId) -> None:
        self._buckets.pop(peer, None)

    def receive(self, peer: NodeId, envelope: Envelope) -> list[PeerAd]:
        """Check and learn the list ``peer`` sent; returns the peers that were new."""
        settings = self.settings
        now = trio.current_time()
        bucket = self._buckets.get(peer)
        if bucket is not None and not bucket.take(now):
            self._defences.reject("rate")
            return []
        try:
            ads = decode_ads(
                envelope.payload,
                max_per_message=settings.max_per_message,
                max_payload_bytes=settings.max_per_message * 320 + 16,
            )
        except WireError as exc:
            self._defences.reject("malformed")
            self._defences.strike(peer, f"bad peer list: {exc}")
            return []
        new = self.book.learn(
            ads,
            advertiser=peer,
            own=self.identity.node_id,
            now=now,
            skip=lambda key: key in self._configured or self._defences.is_banned(key),
        )
        if new:
            self._defences.metrics.inc("peer_exchange_learned_total", len(new))
            log_event(
                log,
                logging.INFO,
                "peers_learned",
                "learned %d peers from %s",
                len(new),
                peer,
                advertiser=peer.hex(),
                peers=[f"{ad.node_id.short()}@{ad.address}" for ad in new],
            )
        return new

    async def run(
        self,
        connections: Mapping[NodeId, PeerConnection],
        addresses: Callable[[], list[PeerAd]],
    ) -> None:
        """Every ``interval`` (jittered), send each connected peer a sample of ``addresses()``
        (the connected peers this node can vouch for), leaving out the recipient."""
        interval = self.settings.interval
        while True:
            await trio.sleep(interval * self._jitter.uniform(0.8, 1.2))
            ads = addresses()
            limit = self.settings.max_per_message
            if len(ads) > limit:
                ads = self._jitter.sample(ads, limit)
            if not ads:
                continue
            envelope = seal_ads(self.identity, ads, seq=time.time_ns() // 1000)
            for peer, connection in list(connections.items()):
                if len(ads) == 1 and ads[0].node_id == peer:
                    continue
                if not connection.enqueue(envelope):
                    self._defences.metrics.inc("queue_drops_total")
