"""SybilWall's probabilistic history gossip, every history signed by its origin (§2.2).

Theory of operation
-------------------
SybilWall compares the accumulated-update histories of the senders it merges with those of
*distant* nodes, so Sybils spread over several neighbours are still compared with each
other. Distant histories travel by gossip; p2pfl makes every one of them unforgeable.

*Publishing.* Each time a node sends its model (a dsgd round, a gossip push) it also sends
each recipient its own history ``H = m_sent − m_start`` (the sum of its own published
updates, FoolsGold's accumulated update, starting from the model the core was built with) as
a :class:`SignedHistory`: the origin signs ``HISTORY_CONTEXT || origin || round (8 bytes
big-endian) || len || "codec\\0dtype\\0shape" || SHA-256(payload)`` once, when it publishes.

*Relaying.* Right after, it sends each recipient ``n`` **one** record drawn from its table
with probability ``∝ λ·e^{−λ(d−1)}`` (:func:`~p2pfl.merge.sybil.history_gossip_weights`),
``d`` being the record's hop distance, leaving out its own record, ``n``'s own and every
record it received from ``n``. The record travels unchanged (same payload bytes, spec,
round and origin signature) in a ``HISTORY`` message sealed by the relay, whose
``meta["d"]`` is the relay's distance to the origin (0 for its own history).

*Receiving* (:meth:`HistoryGossip.receive`), cheapest first: the origin's key, the distance
and the signature are well formed; distance 0 comes only from the origin itself and
distance ≥ 1 never does; the shape is the own model's; the origin's signature verifies. A
failure is the relay's fault (``RemoteProtocolError``, so ``PeerMisbehaved``): a relay can
forward a record but never forge or alter one. Records of this node itself are ignored. A
valid record is stored at ``d + 1`` hops: an unknown origin always; a direct record
(distance 1, published by a neighbour) is replaced only by that neighbour's newer
publication; a distant one by a newer round, or the same round over a shorter path. A stored
distant record (distance ≥ 2) is handed to the merge rule's
:meth:`~p2pfl.merge.base.HistoryHook.learn_history`. Direct records only feed the relaying: the
merge rule computes its neighbours' histories from their models itself. The rule receives
records through the :class:`~p2pfl.merge.base.HistoryHook` it implements and keeps them in its
own state; this module never touches that state.

What a relay can still do: lie about the distance (changing only how often the record is
drawn) or withhold records; what it cannot: change a history or its round, or invent one.
Memory is bounded: at most ``capacity`` records, the farthest and then oldest forgotten first
(the rule is told: :meth:`~p2pfl.merge.base.HistoryHook.forget_history`). Traffic is bounded: per recipient and send, one own record
and at most one relayed record.
"""

from __future__ import annotations

import hashlib
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from p2pfl.codec import encode_vector
from p2pfl.errors import BadSignature, RemoteProtocolError
from p2pfl.identity import NODE_ID_BYTES, SIGNATURE_BYTES, Identity, NodeId
from p2pfl.merge.base import HistoryHook
from p2pfl.merge.sybil import history_gossip_weights
from p2pfl.protocol.messages import Sealer, decode_model
from p2pfl.wire import Envelope, MessageKind, PayloadSpec

HISTORY_CONTEXT = b"p2pfl/history/v1\x00"
MAX_DISTANCE = 255
"""A record claiming more hops than this is refused."""


def history_signed_bytes(origin: NodeId, round: int, spec: PayloadSpec, digest: bytes) -> bytes:
    """The exact bytes an origin's history signature covers."""
    described = "\x00".join((spec.codec, spec.dtype, ",".join(map(str, spec.shape)))).encode()
    return (
        HISTORY_CONTEXT
        + origin.raw
        + round.to_bytes(8, "big")
        + len(described).to_bytes(4, "big")
        + described
        + digest
    )


@dataclass(frozen=True, slots=True)
class SignedHistory:
    """An origin's accumulated-update history as it signed it: encoded, never re-encoded."""

    origin: NodeId
    round: int
    spec: PayloadSpec
    payload: bytes
    digest: bytes
    """SHA-256 of ``payload``."""
    signature: bytes

    def verify(self) -> None:
        """Raises:
        RemoteProtocolError: the signature is not the origin's over this record.
        """
        message = history_signed_bytes(self.origin, self.round, self.spec, self.digest)
        try:
            self.origin.verify(self.signature, message)
        except BadSignature as exc:
            raise RemoteProtocolError(
                f"history of {self.origin} (round {self.round}) is not signed by its origin"
            ) from exc


def sign_history(
    identity: Identity, round: int, history: torch.Tensor, *, wire_dtype: str = "float32"
) -> SignedHistory:
    """The own history, encoded in ``wire_dtype`` and signed."""
    spec, view = encode_vector(history, dtype=wire_dtype, samples=0)
    payload = bytes(view)
    digest = hashlib.sha256(payload).digest()
    signature = identity.sign(history_signed_bytes(identity.node_id, round, spec, digest))
    return SignedHistory(identity.node_id, round, spec, payload, digest, signature)


def seal_history(sealer: Sealer, record: SignedHistory, *, distance: int) -> Envelope:
    """A ``HISTORY`` message carrying ``record`` unchanged, sealed by ``sealer``'s node (the
    relay, or the origin itself with ``distance`` 0)."""
    return sealer.seal_payload(
        MessageKind.HISTORY,
        record.round,
        payload=record.payload,
        spec=record.spec,
        meta={"o": record.origin.raw, "d": distance, "hs": record.signature},
    )


def parse_history(envelope: Envelope) -> tuple[SignedHistory, int]:
    """The record in a ``HISTORY`` message and the sender's distance to its origin; the
    origin's signature is not checked here (:meth:`SignedHistory.verify`).

    Raises:
        RemoteProtocolError: a field is missing or malformed.
    """
    meta = envelope.meta
    origin, distance, signature = meta.get("o"), meta.get("d"), meta.get("hs")
    if not (isinstance(origin, bytes) and len(origin) == NODE_ID_BYTES):
        raise RemoteProtocolError("history origin is not a 32-byte key")
    if not (isinstance(signature, bytes) and len(signature) == SIGNATURE_BYTES):
        raise RemoteProtocolError("history signature is not 64 bytes")
    if (
        not isinstance(distance, int)
        or isinstance(distance, bool)
        or not 0 <= distance <= MAX_DISTANCE
    ):
        raise RemoteProtocolError(
            f"history distance {distance!r} is not an int in 0..{MAX_DISTANCE}"
        )
    record = SignedHistory(
        origin=NodeId(origin),
        round=envelope.round,
        spec=envelope.spec,
        payload=bytes(envelope.payload),
        digest=bytes(envelope.digest),
        signature=signature,
    )
    return record, distance


@dataclass(frozen=True, slots=True)
class HeldHistory:
    """A record in the table: its distance from this node and who delivered it."""

    record: SignedHistory
    distance: int
    received_from: NodeId


class HistoryGossip:
    """One node's signed history records, its own history and the λ-weighted draw."""

    __slots__ = (
        "_baseline",
        "_hook",
        "_identity",
        "_state",
        "capacity",
        "lam",
        "own",
        "table",
        "wire_dtype",
    )

    def __init__(
        self,
        identity: Identity,
        baseline: torch.Tensor,
        *,
        hook: HistoryHook | None = None,
        state: MutableMapping[str, Any] | None = None,
        lam: float = 0.8,
        capacity: int = 32,
        wire_dtype: str = "float32",
    ) -> None:
        """Start with an empty table; the own history is measured from ``baseline``.

        ``hook`` (the merge rule's) learns every stored distant record and forgets every
        evicted one, keeping them in ``state`` (the rule's per-node state); with no hook
        the records are only relayed.
        """
        self._identity = identity
        self._hook = hook
        self._state: MutableMapping[str, Any] = {} if state is None else state
        self._baseline = baseline.detach().to(torch.float32).clone()
        self.lam = lam
        self.capacity = capacity
        self.wire_dtype = wire_dtype
        self.table: dict[NodeId, HeldHistory] = {}
        self.own: SignedHistory | None = None

    def publish(self, vector: torch.Tensor, round: int) -> SignedHistory:
        """Sign the own history as of the model ``vector`` sent in ``round`` (the same
        record again if nothing changed since the last call)."""
        own = self.own
        if own is not None and own.round == round:
            return own
        history = vector.detach().to(torch.float32) - self._baseline
        self.own = sign_history(self._identity, round, history, wire_dtype=self.wire_dtype)
        return self.own

    def candidates(self, peer: NodeId) -> list[HeldHistory]:
        """What may be gossiped to ``peer``: not its own record, none it delivered, in key
        order (the own record is never in the table)."""
        return [
            held
            for origin, held in sorted(self.table.items(), key=lambda item: item[0].raw)
            if origin != peer and held.received_from != peer
        ]

    def draw(self, peer: NodeId, rng: np.random.Generator) -> HeldHistory | None:
        """One record for ``peer``, drawn with probability ``∝ λ·e^{−λ(d−1)}``; None if
        there is nothing to send it."""
        candidates = self.candidates(peer)
        if not candidates:
            return None
        weights = history_gossip_weights([held.distance for held in candidates], self.lam)
        index = int(rng.choice(len(candidates), p=weights.numpy()))
        return candidates[index]

    def receive(
        self,
        peer: NodeId,
        envelope: Envelope,
        shape: torch.Size,
    ) -> HeldHistory | None:
        """Check and store a ``HISTORY`` message from ``peer`` (whose envelope the caller
        checked already: sender, freshness); distant records go to the merge rule's hook.

        Returns:
            The stored record, or None if it taught nothing (stale, or this node's own).

        Raises:
            RemoteProtocolError: malformed, inconsistent, of another shape, not signed by
                its origin, or holding NaN/infinite values.
        """
        record, distance = parse_history(envelope)
        origin = record.origin
        if distance == 0 and origin != peer:
            raise RemoteProtocolError(f"history of {origin} at distance 0 sent by {peer}")
        if distance > 0 and origin == peer:
            raise RemoteProtocolError(f"own history sent at distance {distance}")
        if tuple(record.spec.shape) != tuple(shape):
            raise RemoteProtocolError(
                f"history of shape {list(record.spec.shape)}, this node's is {list(shape)}"
            )
        record.verify()
        if origin == self._identity.node_id:
            return None
        stored = distance + 1
        known = self.table.get(origin)
        if known is not None:
            if known.distance == 1:
                newer = stored == 1 and record.round > known.record.round
            else:
                newer = record.round > known.record.round or (
                    record.round == known.record.round and stored < known.distance
                )
            if not newer:
                return None
        vector = decode_model(envelope, shape).clone()
        held = HeldHistory(record, stored, peer)
        self.table[origin] = held
        if stored >= 2 and self._hook is not None:
            self._hook.learn_history(self._state, origin, record.round, stored, vector)
        self._evict()
        return self.table.get(origin)

    def _evict(self) -> None:
        while len(self.table) > self.capacity:
            victim = max(
                self.table,
                key=lambda o: (self.table[o].distance, -self.table[o].record.round, o.raw),
            )
            del self.table[victim]
            if self._hook is not None:
                self._hook.forget_history(self._state, victim)
