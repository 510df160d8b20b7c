"""``ModelUpdate``, the one message the dsgd and gossip modes exchange: sealing and checking.

Theory of operation
-------------------
Outgoing, :class:`Sealer` signs every message a core sends and owns the per-node sequence
counter, so the numbers never repeat. A model becomes one ``MODEL_UPDATE`` envelope: the
payload is the vector in the configured wire dtype, the header carries the round (dsgd) or
age (gossip), this node's sample count and number of neighbours (``meta["deg"]``). One
envelope is sealed per model and the same object is sent to every recipient. Modes with
messages of their own (``modest``, history gossip) seal them with
:meth:`Sealer.seal_vector` / :meth:`Sealer.seal_payload`.

Incoming, :func:`parse_model_update` turns a ``MessageReceived`` whose signature the driver
already verified into a :class:`ModelUpdate`, cheapest checks first: the transport peer is a
neighbour (or, in a mode that admits them, any other peer), the envelope's sender is that
peer, the sequence number is fresh, the kind is ``MODEL_UPDATE``, the declared shape matches
the own model, the payload decodes, and every value is finite. Any failure raises
:class:`~p2pfl.errors.RemoteProtocolError`, which the core turns into a ``PeerMisbehaved``
action. The vector of an accepted update is never a view of the driver's receive buffer; it
is decoded once per envelope object and shared, read-only, by every core that receives that
object (see :func:`decode_model`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from p2pfl.codec import CODECS, decode_vector, encode_vector
from p2pfl.errors import RemoteProtocolError, WireError
from p2pfl.identity import Identity, NodeId
from p2pfl.numerics import all_finite
from p2pfl.protocol.compression import BASE, Chains, Compressor
from p2pfl.protocol.events import MessageReceived
from p2pfl.protocol.peers import PeerSet
from p2pfl.wire import Envelope, MessageKind, PayloadSpec, seal


@dataclass(frozen=True, slots=True)
class ModelUpdate:
    """A neighbour's model that passed every check."""

    sender: NodeId
    seq: int
    round: int
    """The dsgd round it was trained in, or its gossip age (trainings behind it)."""
    samples: int
    degree: int
    """How many neighbours the sender has (merge rules with Metropolis-Hastings weights use it)."""
    vector: torch.Tensor
    digest: bytes
    """SHA-256 of the payload: two updates with equal digest and samples are the same model."""

    def same_model(self, other: ModelUpdate) -> bool:
        return self.digest == other.digest and self.samples == other.samples


MAX_DEGREE = 1 << 20


class Sealer:
    """Signs everything one node sends, numbering the envelopes from one sequence counter.

    The counter is this object's alone: every envelope a core sends is sealed here, so the
    numbers never repeat and only grow (a peer's replay window refuses anything else).
    """

    __slots__ = ("_identity", "_next_seq", "compressor", "degree", "samples", "wire_dtype")

    def __init__(
        self,
        identity: Identity,
        *,
        wire_dtype: str,
        samples: int,
        seq_start: int,
        degree: int = 0,
        compressor: Compressor | None = None,
    ) -> None:
        self._identity = identity
        self.wire_dtype = wire_dtype
        self.degree = degree
        self.samples = samples
        self._next_seq = seq_start
        self.compressor = compressor
        """With one, ``MODEL_UPDATE`` payloads are what it encodes (a lossy codec, error
        feedback, delta chains: :mod:`p2pfl.protocol.compression`); without, the model in
        ``wire_dtype``."""

    @property
    def next_seq(self) -> int:
        """The sequence number the next envelope will carry."""
        return self._next_seq

    def seal(
        self, vector: torch.Tensor, round: int, *, meta: Mapping[str, object] | None = None
    ) -> Envelope:
        """One signed ``MODEL_UPDATE`` for ``vector``; it may share ``vector``'s memory.

        ``meta`` adds header fields (e.g. a membership view) next to ``deg``.
        """
        compressor = self.compressor
        fields = {"deg": self.degree, **(meta or {})}
        if compressor is None:
            return self.seal_vector(MessageKind.MODEL_UPDATE, vector, round, meta=fields)
        (spec, payload, _), links = compressor.encode(vector, self.samples)
        envelope = self.seal_payload(
            MessageKind.MODEL_UPDATE, round, payload=payload, spec=spec, meta={**fields, **links}
        )
        compressor.sealed(envelope.seq)
        return envelope

    def seal_vector(
        self,
        kind: MessageKind,
        vector: torch.Tensor,
        round: int,
        *,
        meta: Mapping[str, object] | None = None,
    ) -> Envelope:
        """One signed message of ``kind`` carrying ``vector`` in the wire dtype, with this
        node's sample count; it may share ``vector``'s memory (no copy)."""
        spec, payload = encode_vector(vector, dtype=self.wire_dtype, samples=self.samples)
        return self.seal_payload(kind, round, payload=payload, spec=spec, meta=meta)

    def seal_payload(
        self,
        kind: MessageKind,
        round: int,
        *,
        payload: bytes | bytearray | memoryview = b"",
        spec: PayloadSpec | None = None,
        meta: Mapping[str, object] | None = None,
    ) -> Envelope:
        """One signed message of ``kind`` with the next sequence number (no payload by
        default)."""
        envelope = seal(
            self._identity,
            kind,
            seq=self._next_seq,
            round=round,
            payload=payload,
            spec=spec,
            meta=meta,
        )
        self._next_seq += 1
        return envelope


_DECODED = "model"
"""The key of :attr:`Envelope.memo` under which :func:`decode_model` keeps its result."""
_DELTA = "model+base"
"""The memo key of a delta's (base, result)."""


def decode_model(
    envelope: Envelope, shape: torch.Size, base: torch.Tensor | None = None
) -> torch.Tensor:
    """The envelope's model, checked for shape and finiteness.

    ``base`` is given for a delta (a link of a chain, see
    :mod:`p2pfl.protocol.compression`): the model is ``base`` plus the decoded payload. The
    memo then holds the base too, and is reused only by a receiver holding that very tensor
    (in a simulator, every receiver that followed the chain).

    The payload is decoded and checked once per envelope object (the result is kept in
    ``envelope.memo``): a simulator hands one verified envelope to all its receivers, and
    each would otherwise decode, check and copy the same bytes. The tensor returned is
    therefore shared by every receiver of ``envelope`` and owns its memory (never a view of
    the payload): callers must not modify it, which merge rules never do (their inputs are
    read-only, see ``p2pfl.merge.base``) and cores never do to a received model.

    Raises:
        RemoteProtocolError: another shape, undecodable, or NaN/infinite values.
    """
    if tuple(envelope.spec.shape) != tuple(shape):
        raise RemoteProtocolError(
            f"model of shape {list(envelope.spec.shape)}, this node's is {list(shape)}"
        )
    if base is not None:
        memo = envelope.memo.get(_DELTA)
        if memo is None or memo[0] is not base:
            memo = envelope.memo[_DELTA] = (base, _decode_checked(envelope, base))
        decoded = memo[1]
    else:
        decoded = envelope.memo.get(_DECODED)
        if decoded is None:
            decoded = envelope.memo[_DECODED] = _decode_checked(envelope)
    if isinstance(decoded, RemoteProtocolError):
        # A fresh exception per receiver: raising the cached one would chain tracebacks.
        raise RemoteProtocolError(str(decoded))
    tensor: torch.Tensor = decoded
    return tensor


def _decode_checked(
    envelope: Envelope, base: torch.Tensor | None = None
) -> torch.Tensor | RemoteProtocolError:
    """The payload (plus ``base``) as an owned float32 tensor, or the defect that refuses it."""
    spec = envelope.spec
    try:
        # Without owned, decode_vector may view the payload (a driver's receive buffer); a
        # delta is added to its base below, into a new tensor.
        decoded = decode_vector(spec, envelope.payload, owned=base is None)
    except WireError as exc:
        return RemoteProtocolError(f"undecodable model: {exc}")
    codec = CODECS.get(spec.codec)
    if base is None and codec is not None and codec.delta:
        return RemoteProtocolError(f"a {codec.name} payload that names no base model")
    if base is not None:
        # A new tensor: the decoded delta never aliases the payload afterwards.
        decoded = base + decoded.reshape(base.shape)
        return (
            decoded
            if all_finite(decoded)
            else RemoteProtocolError("model holds NaN or infinite values")
        )
    if not all_finite(decoded):
        return RemoteProtocolError("model holds NaN or infinite values")
    return decoded


def check_sender(event: MessageReceived, peers: PeerSet) -> None:
    """The checks every message of the neighbour modes passes first: the transport peer is
    admitted (a configured neighbour, unless strangers are admitted), the envelope's sender is
    that peer, and its sequence number is fresh.

    Raises:
        RemoteProtocolError: any of them fails; the message names it.
    """
    peer, envelope = event.peer, event.envelope
    if not peers.admits(peer):
        raise RemoteProtocolError("message from a peer that is not a configured neighbour")
    if envelope.sender.raw != peer.raw:  # NodeId equality, without a Python-level __eq__
        raise RemoteProtocolError(f"envelope signed by {envelope.sender}, not by the peer {peer}")
    try:
        peers.check_seq(peer, envelope.seq)
    except WireError as exc:
        raise RemoteProtocolError(f"replayed message: {exc}") from exc


def parse_model_update(
    event: MessageReceived, peers: PeerSet, shape: torch.Size, chains: Chains | None = None
) -> ModelUpdate:
    """Check a received message and take its model.

    ``chains`` holds the senders' public copies for delta payloads (``meta["b"]``); without
    it a delta is refused.

    Raises:
        MissingBase: a delta whose base this node does not hold (drop it, nobody's fault).
        RemoteProtocolError: any other defect; the message names it.
    """
    envelope = event.envelope
    check_sender(event, peers)
    if envelope.kind is not _MODEL_UPDATE:
        raise RemoteProtocolError(f"unexpected message kind {envelope.kind.name}")
    if BASE in envelope.meta:
        if chains is None:
            raise RemoteProtocolError("a delta payload, which this mode does not take")
        decoded = decode_model(envelope, shape, chains.base(envelope))
        update = _model_update(envelope, decoded)
    else:
        decoded = decode_model(envelope, shape)
        # Everything but the per-receiver checks above depends on the envelope alone: one
        # ModelUpdate (immutable, like its shared vector) serves every receiver of it.
        shared: ModelUpdate | None = envelope.memo.get(_UPDATE)
        if shared is None or shared.vector is not decoded:
            shared = envelope.memo[_UPDATE] = _model_update(envelope, decoded)
        update = shared
    if chains is not None:
        chains.record(envelope, decoded)
    return update


_MODEL_UPDATE = MessageKind.MODEL_UPDATE
"""Bound once: an IntEnum member read off its class costs eight global lookups."""
_UPDATE = "update"
"""The memo key of the :class:`ModelUpdate` built from a (non-delta) envelope."""


def _model_update(envelope: Envelope, decoded: torch.Tensor) -> ModelUpdate:
    """The update ``envelope`` (checked) carries, with its decoded model.

    Raises:
        RemoteProtocolError: the declared degree is not an int in 0..MAX_DEGREE.
    """
    degree = envelope.meta.get("deg", 0)
    if not isinstance(degree, int) or isinstance(degree, bool) or not 0 <= degree <= MAX_DEGREE:
        raise RemoteProtocolError(f"declared degree {degree!r} is not an int in 0..{MAX_DEGREE}")
    return ModelUpdate(
        sender=envelope.sender,  # the transport peer's key: check_sender compared them
        seq=envelope.seq,
        round=envelope.round,
        samples=envelope.spec.samples,
        degree=degree,
        vector=decoded,
        digest=bytes(envelope.digest),
    )
