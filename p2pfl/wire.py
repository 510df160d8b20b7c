"""Frames and envelopes: the only bytes p2pfl exchanges.

Theory of operation
-------------------
A frame is ``u32 total | u32 header_len | header | payload`` (big-endian lengths).
``total`` counts every byte after itself, so a reader learns the whole frame size from the
first four bytes and refuses an oversized frame before reading or allocating it.

The header is one msgpack map with short keys (see ``_FIELDS``). Its ``sig`` entry is an
Ed25519 signature, by the sender, over ``SIGNING_CONTEXT`` followed by the *canonical*
msgpack encoding of every other entry (keys sorted, shortest integer forms). The payload is
bound through its SHA-256 digest ``h``. A receiver accepts a header only if its bytes are
exactly the canonical encoding, so a frame has one valid byte form and any altered byte is
rejected. Checks run cheapest first and before anything else is interpreted: sizes, msgpack
shape and limits, version, kind, signature, digest. Nothing is ever unpickled and msgpack
extension types are refused.

Payload bytes stay outside msgpack so a sender can write them straight from a tensor's
memory and a receiver can view them with ``torch.frombuffer`` (see ``p2pfl.codec``).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import msgpack

from p2pfl.errors import (
    BadSignature,
    DecodeError,
    FrameTooLarge,
    Replayed,
    UnknownKind,
    UnsupportedVersion,
)
from p2pfl.identity import NODE_ID_BYTES, SIGNATURE_BYTES, Identity, NodeId

PROTOCOL_VERSION = 1
SIGNING_CONTEXT = b"p2pfl/frame/v1\x00"
LENGTH_PREFIX = struct.Struct(">I")
DIGEST_BYTES = 32
MAX_SEQ = 2**63 - 1
MAX_ROUND = 2**63 - 1


class MessageKind(IntEnum):
    """The registry of message kinds; numbers are fixed forever once released."""

    HELLO = 1
    """Handshake opener; payload is the sender's fresh nonce."""
    HELLO_PROOF = 2
    """Handshake answer; payload is the *peer's* nonce, so the signature proves the key."""
    KEEPALIVE = 3
    """Runtime-level liveness frame on an idle connection; empty payload, never reaches a core."""
    PEER_EXCHANGE = 4
    """Runtime-level peer advertisement: payload is a msgpack array of ``[address, key]``
    pairs (``"host:port"``, 32-byte public key), signed by the neighbour that advertises
    them (see ``p2pfl.runtime.peerx``); never reaches a core."""
    MODEL_UPDATE = 10
    """A model (flat parameter vector) for a round; payload is tensor bytes."""
    # 20-29: the ``modest`` mode (sampled committees, p2pfl.protocol.modest). Every one may
    # carry ``meta["view"]``: membership records, each signed by the peer it concerns.
    MODEST_PING = 20
    """Availability ping for sample index ``round``; empty payload."""
    MODEST_PONG = 21
    """Answer to a ping: ``round`` echoes the ping's; ``meta["ping"]`` its sequence number."""
    MODEST_TRAINED = 22
    """A model trained in ``round``, sent to an aggregator of sample ``round + 1``."""
    MODEST_AGGREGATE = 23
    """The aggregated model that starts ``round``, sent to the trainers of that sample."""
    MODEST_ACK = 24
    """An aggregator took (or no longer needs) the sender's model of ``round``."""
    MODEST_NACK = 25
    """An aggregator will not aggregate the model of ``round``: send it elsewhere."""
    MODEST_MEMBERSHIP = 26
    """A join or leave announcement: ``meta["view"]`` holds the signed records."""
    # 30-39: Sybil-aware merging (p2pfl.protocol.histories).
    HISTORY = 30
    """One SybilWall history record: the payload is an origin's accumulated-update vector
    (``round`` = the origin's round), ``meta["o"]`` the origin's key, ``meta["d"]`` the
    sender's hop distance to it (0 = the sender's own history) and ``meta["hs"]`` the
    origin's signature over (origin, round, payload description and digest), so a relay can
    forward a record but never forge or alter one."""
    # 40-49: the ``spsa`` mode (shared-randomness one-byte updates, p2pfl.protocol.spsa).
    SPSA_STEP = 40
    """A node's projections for step ``round``: the payload is one signed byte (int8) per
    sample, ``meta["md"]`` the first 16 bytes of the SHA-256 of the model it measured them at."""
    SPSA_SYNC = 41
    """A node that fell behind asks for the current model (empty payload, ``round`` = its own
    step); the answer is one ``MODEL_UPDATE`` in float32."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds checked before allocation; a frame exceeding any is refused."""

    max_frame_bytes: int = 64 * 1024 * 1024
    max_header_bytes: int = 64 * 1024
    max_elements: int = 16 * 1024 * 1024
    max_container_len: int = 1024
    max_depth: int = 6
    max_shape_dims: int = 8


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True, slots=True)
class PayloadSpec:
    """What the payload bytes are: codec, element dtype, shape and the samples behind them."""

    codec: str = "raw"
    dtype: str = ""
    shape: tuple[int, ...] = ()
    samples: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {"c": self.codec, "d": self.dtype, "n": self.samples, "s": list(self.shape)}


@dataclass(frozen=True, slots=True)
class Envelope:
    """A signed message: the header fields, the payload, and the proof that binds them.

    Instances made by :func:`seal` or :func:`decode_frame` are signed and verified; build
    them any other way only in tests.
    """

    kind: MessageKind
    sender: NodeId
    seq: int
    round: int
    spec: PayloadSpec
    payload: bytes | bytearray | memoryview
    digest: bytes
    signature: bytes
    meta: Mapping[str, Any] = field(default_factory=dict)
    version: int = PROTOCOL_VERSION
    memo: dict[str, Any] = field(default_factory=dict, init=False, compare=False, repr=False)
    """Values this process derived from the envelope's immutable content (e.g. its decoded
    model, see :func:`p2pfl.protocol.messages.decode_model`), computed once and shared by
    every receiver of the same object, and the header bytes :func:`seal` made (what
    :func:`encode_header` sends). Not a field of the message: only ever a copy of what the
    fields determine, fresh on every new envelope (``dataclasses.replace`` included),
    ignored by ``==``."""

    def header_fields(self) -> dict[str, Any]:
        """Every header entry except the signature, as it is signed.

        The map is built with its keys in canonical order (the spec's too, see
        :meth:`PayloadSpec.to_wire`), and the meta map put in that order, so
        :func:`_pack_ordered` can encode it without a recursive sort.
        """
        return _header_fields(
            self.digest,
            self.kind,
            _ordered(dict(self.meta)),
            self.spec,
            self.seq,
            self.round,
            self.sender.raw,
            self.version,
        )

    @property
    def payload_bytes(self) -> int:
        return memoryview(self.payload).nbytes


def _header_fields(
    digest: bytes,
    kind: MessageKind,
    meta: dict[str, Any],
    spec: PayloadSpec,
    seq: int,
    round: int,
    sender: bytes,
    version: int,
) -> dict[str, Any]:
    """The signed header map, built in canonical key order (``meta`` must be in order)."""
    return {
        "h": digest,
        "k": int(kind),
        "m": meta,
        "p": spec.to_wire(),
        "q": seq,
        "r": round,
        "s": sender,
        "v": version,
    }


def _canonical(obj: Any) -> bytes:
    """The canonical msgpack form of ``obj``: every map's keys in ascending order."""
    return _pack_ordered(_ordered(obj))


def _pack_ordered(obj: Any) -> bytes:
    """The msgpack form of ``obj`` as it is: canonical if every map in it is in key order."""
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


_SCALARS = (bytes, str, int, float, bool, type(None))
_CONTAINERS = (dict, list, tuple)


def _ordered(obj: Any) -> Any:
    """``obj`` with every map's keys in ascending order: ``obj`` itself when it is so already
    (every header this module builds and every honest one received), else a sorted copy.

    Raises:
        TypeError: a map mixes keys that have no order (str and bytes).
    """
    return obj if _in_order(obj) else _sorted(obj)


def _in_order(obj: Any) -> bool:
    # A check, not a copy: sorting the keys of a map already in order is one linear pass in C.
    # Loops rather than all() over generators: no generator frame per map (one per frame
    # received and per envelope sealed).
    if isinstance(obj, dict):
        if len(obj) > 1:
            keys = list(obj)
            if keys != sorted(keys):
                return False
        for value in obj.values():
            if isinstance(value, _CONTAINERS) and not _in_order(value):
                return False
        return True
    if isinstance(obj, _SEQUENCES):
        for item in obj:
            if isinstance(item, _CONTAINERS) and not _in_order(item):
                return False
    return True


_SEQUENCES = (list, tuple)


def _sorted(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {
            key: value if isinstance(value, _SCALARS) else _sorted(value)
            for key, value in sorted(obj.items(), key=_first)
        }
    if isinstance(obj, list | tuple):
        return [item if isinstance(item, _SCALARS) else _sorted(item) for item in obj]
    return obj


def _first(item: tuple[Any, Any]) -> Any:
    return item[0]


def signed_bytes(fields: Mapping[str, Any]) -> bytes:
    """The exact bytes a header signature covers."""
    return SIGNING_CONTEXT + _canonical(dict(fields))


def seal(
    identity: Identity,
    kind: MessageKind,
    *,
    seq: int,
    round: int,
    payload: bytes | bytearray | memoryview,
    spec: PayloadSpec | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Envelope:
    """Sign a message as ``identity``.

    Raises:
        ValueError: ``seq`` or ``round`` is negative or too large, or ``meta`` has a non-str key.
    """
    if not 0 <= seq <= MAX_SEQ:
        raise ValueError(f"seq {seq} outside 0..{MAX_SEQ}")
    if not 0 <= round <= MAX_ROUND:
        raise ValueError(f"round {round} outside 0..{MAX_ROUND}")
    meta_dict = dict(meta or {})
    if any(not isinstance(key, str) for key in meta_dict):
        raise ValueError("meta keys must be strings")
    kind = kind if type(kind) is MessageKind else MessageKind(kind)
    spec = spec or PayloadSpec()
    digest = hashlib.sha256(payload).digest()
    sender = identity.node_id
    # The header is built and signed once, straight from the arguments (what
    # Envelope.header_fields gives for the envelope below; meta_dict is a fresh copy).
    fields = _header_fields(
        digest, kind, _ordered(meta_dict), spec, seq, round, sender.raw, PROTOCOL_VERSION
    )
    signed = _pack_ordered(fields)
    signature = identity.sign(SIGNING_CONTEXT + signed)
    envelope = Envelope(
        kind=kind,
        sender=sender,
        seq=seq,
        round=round,
        spec=spec,
        payload=payload,
        digest=digest,
        signature=signature,
        meta=meta_dict,
    )
    # Kept for encode_header, which would otherwise build and pack the same map again.
    envelope.memo[_HEADER] = _header_of_signed(signed, signature)
    return envelope


_HEADER = "header"
"""The :attr:`Envelope.memo` key of the header bytes :func:`seal` made."""
_MAP9, _MAP8 = b"\x89", b"\x88"
"""msgpack's one-byte heads of a map of 9 entries (a header) and of 8 (what is signed)."""
_SIG_ENTRY: bytes = msgpack.packb("sig") + b"\xc4\x40"
"""The signature's key and the head of its value (bin8 of 64 bytes), which the signature's
bytes follow."""
_VERSION_ENTRY: bytes = msgpack.packb("v") + msgpack.packb(PROTOCOL_VERSION)
"""The last entry of every header and of every map that is signed."""


def _header_of_signed(signed: bytes, signature: bytes) -> bytes:
    """The header: the signed map (8 entries, ``v`` last) with the ``sig`` entry added where
    canonical order puts it, before ``v``. A msgpack map is its head (the entry count)
    followed by its entries' encodings, so this is a splice; :func:`_signed_of_header` is its
    inverse."""
    return _MAP9 + signed[1 : -len(_VERSION_ENTRY)] + _SIG_ENTRY + signature + _VERSION_ENTRY


def encode_header(envelope: Envelope) -> bytes:
    header: bytes | None = envelope.memo.get(_HEADER)
    if header is not None:
        return header
    return _header_of_signed(_pack_ordered(envelope.header_fields()), envelope.signature)


def frame_parts(envelope: Envelope) -> tuple[bytes, memoryview]:
    """The frame as (prefix and header, payload view), for writing without copying the payload."""
    header = encode_header(envelope)
    payload = memoryview(envelope.payload).cast("B")
    total = 4 + len(header) + payload.nbytes
    return LENGTH_PREFIX.pack(total) + LENGTH_PREFIX.pack(len(header)) + header, payload


def encode_frame(envelope: Envelope) -> bytes:
    """The whole frame as one bytes object (copies the payload once)."""
    head, payload = frame_parts(envelope)
    return b"".join((head, payload))  # (one copy of the payload; head + tobytes() made two)


def read_length(prefix: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> int:
    """Parse the 4-byte total-length prefix and check it against ``limits``.

    Returns the number of frame bytes that follow the prefix.

    Raises:
        DecodeError: the prefix is not 4 bytes, or declares a frame too short to hold a header.
        FrameTooLarge: the declared frame exceeds ``limits.max_frame_bytes``.
    """
    if len(prefix) != 4:
        raise DecodeError("a frame starts with a 4-byte length")
    (total,) = LENGTH_PREFIX.unpack(prefix)
    if total + 4 > limits.max_frame_bytes:
        raise FrameTooLarge(f"frame of {total + 4} bytes exceeds limit {limits.max_frame_bytes}")
    if total < 4:
        raise DecodeError(f"frame length {total} too short")
    return int(total)


def decode_frame(data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> Envelope:
    """Parse and verify a whole frame, length prefix included.

    Raises:
        WireError: any subclass, for any defect; nothing else escapes.
    """
    return decode_body(_body_of(data, limits), limits)


def decode_body(body: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> Envelope:
    """Parse and verify the frame bytes that follow the length prefix.

    The returned envelope's payload is a view into ``body`` (no copy).

    Raises:
        WireError: any subclass, for any defect; nothing else escapes.
    """
    envelope, signed = _parse_body(body, limits)
    envelope.sender.verify(envelope.signature, signed)
    _check_digest(envelope)
    return envelope


def parse_frame(
    data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS
) -> tuple[Envelope, bytes]:
    """Check a whole frame as :func:`decode_frame` does, all but its signature.

    For a driver that verifies signatures elsewhere (the simulator hands them to a verifier
    process): the envelope is **not authenticated** until ``envelope.sender.verify(
    envelope.signature, signed)`` has passed, and must not be used before. A node verifies
    inline with :func:`decode_frame`.

    Returns:
        The envelope (its payload a view into ``data``) and the bytes its signature covers.

    Raises:
        WireError: any subclass, for any defect but the signature; nothing else escapes.
    """
    envelope, signed = _parse_body(_body_of(data, limits), limits)
    _check_digest(envelope)
    return envelope, signed


def _body_of(data: bytes | bytearray | memoryview, limits: Limits) -> memoryview:
    """The bytes after a whole frame's length prefix, once the prefix is checked."""
    view = memoryview(data).cast("B")
    total = read_length(view[:4], limits)
    if view.nbytes != total + 4:
        raise DecodeError(f"frame declares {total + 4} bytes but holds {view.nbytes}")
    return view[4:]


def _parse_body(body: bytes | bytearray | memoryview, limits: Limits) -> tuple[Envelope, bytes]:
    """The envelope in ``body`` and the bytes its signature covers, every check done but the
    signature and the payload digest."""
    view = memoryview(body).cast("B")
    if view.nbytes < 4:
        raise DecodeError("frame too short for a header length")
    (header_len,) = LENGTH_PREFIX.unpack(view[:4])
    if header_len > limits.max_header_bytes:
        raise FrameTooLarge(f"header of {header_len} bytes exceeds limit {limits.max_header_bytes}")
    if 4 + header_len > view.nbytes:
        raise DecodeError(f"header length {header_len} exceeds the frame")
    header_bytes = view[4 : 4 + header_len]
    payload = view[4 + header_len :]
    header = _unpack_header(header_bytes, limits)
    envelope = _envelope_from_header(header, payload, limits)
    # Canonical means: every map in key order, and packing the map as read gives back the
    # very bytes (shortest forms, no duplicate keys). The top-level and spec keys are known
    # sets by now, so only the meta map needs a walk.
    try:
        in_order = (
            list(header) == _HEADER_ORDER
            and list(header["p"]) == _SPEC_ORDER
            and _in_order(header["m"])
        )
    except TypeError as exc:  # a map mixing str and bytes keys has no sorted order
        raise DecodeError("header map keys cannot be put in canonical order") from exc
    if not in_order or _pack_ordered(header) != header_bytes:
        raise DecodeError("header is not in canonical encoding")
    return envelope, _signed_of_header(envelope, header_bytes)


def _signed_of_header(envelope: Envelope, header_bytes: memoryview) -> bytes:
    """:func:`signed_bytes` of ``envelope``'s fields, cut from its header's bytes: the inverse
    of :func:`_header_of_signed`, for a header already checked to be canonical (nine entries
    in order, ``v`` last and a 64-byte ``sig`` before it). Had it not been, the bytes cut
    would not carry the signature, which fails closed."""
    tail = len(_SIG_ENTRY) + SIGNATURE_BYTES + len(_VERSION_ENTRY)
    return b"".join((SIGNING_CONTEXT, _MAP8, header_bytes[1:-tail], _VERSION_ENTRY))


def _check_digest(envelope: Envelope) -> None:
    if hashlib.sha256(envelope.payload).digest() != envelope.digest:
        raise BadSignature("payload does not match the signed digest")


def _unpack_header(header_bytes: memoryview, limits: Limits) -> dict[str, Any]:
    cap = limits.max_container_len
    try:
        header = msgpack.unpackb(
            header_bytes,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_bin_len=limits.max_header_bytes,
            max_str_len=limits.max_header_bytes,
            max_array_len=cap,
            max_map_len=cap,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.UnpackException) as exc:
        raise DecodeError(f"header is not valid msgpack: {exc}") from exc
    except RecursionError as exc:
        raise DecodeError("header nests too deeply") from exc
    if not isinstance(header, dict):
        raise DecodeError("header is not a map")
    _check_depth(header, limits.max_depth)
    return header


def _check_depth(obj: Any, budget: int) -> None:
    # Every value, scalars too, sits one level below its container; recursing only into
    # containers (a scalar needs budget >= 1 left in its parent) saves a call per scalar.
    if budget < 0:
        raise DecodeError("header nests too deeply")
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else ()
    if not budget:
        if values:  # any value at all sits one level too deep
            raise DecodeError("header nests too deeply")
        return
    budget -= 1
    for value in values:
        if isinstance(value, _NESTED):
            _check_depth(value, budget)


_NESTED = (dict, list)
"""The containers msgpack decodes to (``use_list=True``)."""


_FIELDS = frozenset({"h", "k", "m", "p", "q", "r", "s", "sig", "v"})
_SPEC_FIELDS = frozenset({"c", "d", "n", "s"})
_HEADER_ORDER = sorted(_FIELDS)
_SPEC_ORDER = sorted(_SPEC_FIELDS)


def _field(header: Mapping[str, Any], key: str, kind: type) -> Any:
    value = header.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DecodeError(f"header field {key!r} missing or not {kind.__name__}")
    return value


_KINDS = {int(kind): kind for kind in MessageKind}


def _envelope_from_header(header: dict[str, Any], payload: memoryview, limits: Limits) -> Envelope:
    # The one shape an acceptable header has, checked in one expression: exact types
    # (msgpack decodes to exactly these), every bound. Anything else takes the field-by-field
    # path below, which refuses it with the message that names its first defect.
    if header.keys() == _FIELDS:
        sender_raw, signature, digest = header["s"], header["sig"], header["h"]
        seq, round_, meta, spec_raw = header["q"], header["r"], header["m"], header["p"]
        kind_number = header["k"]
        kind = _KINDS.get(kind_number) if type(kind_number) is int else None
        if (
            kind is not None
            and type(header["v"]) is int
            and header["v"] == PROTOCOL_VERSION
            and type(sender_raw) is bytes
            and len(sender_raw) == NODE_ID_BYTES
            and type(signature) is bytes
            and len(signature) == SIGNATURE_BYTES
            and type(digest) is bytes
            and len(digest) == DIGEST_BYTES
            and type(seq) is int
            and 0 <= seq <= MAX_SEQ
            and type(round_) is int
            and 0 <= round_ <= MAX_ROUND
            and type(meta) is dict
            and type(spec_raw) is dict
        ):
            return Envelope(
                kind=kind,
                sender=NodeId(sender_raw),
                seq=seq,
                round=round_,
                spec=_spec_from_wire(spec_raw, limits),
                payload=payload,
                digest=digest,
                signature=signature,
                meta=meta,
                version=PROTOCOL_VERSION,
            )
    return _envelope_field_by_field(header, payload, limits)


def _envelope_field_by_field(
    header: dict[str, Any], payload: memoryview, limits: Limits
) -> Envelope:
    """:func:`_envelope_from_header` one field at a time, raising on the first defect."""
    version = _field(header, "v", int)
    if version != PROTOCOL_VERSION:
        raise UnsupportedVersion(f"protocol version {version}; this node speaks {PROTOCOL_VERSION}")
    if set(header) != _FIELDS:
        raise DecodeError(f"header fields {sorted(header, key=repr)} != {sorted(_FIELDS)}")
    kind_number = _field(header, "k", int)
    try:
        kind = MessageKind(kind_number)
    except ValueError as exc:
        raise UnknownKind(f"message kind {kind_number} is not in the registry") from exc
    sender_raw = _field(header, "s", bytes)
    signature = _field(header, "sig", bytes)
    digest = _field(header, "h", bytes)
    if len(sender_raw) != NODE_ID_BYTES:
        raise DecodeError("sender is not a 32-byte key")
    if len(signature) != SIGNATURE_BYTES:
        raise DecodeError("signature is not 64 bytes")
    if len(digest) != DIGEST_BYTES:
        raise DecodeError("digest is not 32 bytes")
    seq = _field(header, "q", int)
    round_ = _field(header, "r", int)
    if not 0 <= seq <= MAX_SEQ or not 0 <= round_ <= MAX_ROUND:
        raise DecodeError("seq or round out of range")
    meta = _field(header, "m", dict)
    spec = _spec_from_wire(_field(header, "p", dict), limits)
    return Envelope(
        kind=kind,
        sender=NodeId(sender_raw),
        seq=seq,
        round=round_,
        spec=spec,
        payload=payload,
        digest=digest,
        signature=signature,
        meta=meta,
        version=version,
    )


def _spec_from_wire(raw: dict[str, Any], limits: Limits) -> PayloadSpec:
    # As for the header: the acceptable shape in one expression, anything else field by field.
    if raw.keys() == _SPEC_FIELDS:
        codec, dtype, samples, shape_raw = raw["c"], raw["d"], raw["n"], raw["s"]
        if (
            type(codec) is str
            and type(dtype) is str
            and type(samples) is int
            and samples >= 0
            and type(shape_raw) is list
            and len(shape_raw) <= limits.max_shape_dims
        ):
            shape = tuple(shape_raw)
            shape_elements(shape, limits.max_elements)
            return PayloadSpec(codec=codec, dtype=dtype, shape=shape, samples=samples)
    return _spec_field_by_field(raw, limits)


def _spec_field_by_field(raw: dict[str, Any], limits: Limits) -> PayloadSpec:
    """:func:`_spec_from_wire` one field at a time, raising on the first defect."""
    if set(raw) != _SPEC_FIELDS:
        raise DecodeError(f"payload spec fields {sorted(raw, key=repr)} != {sorted(_SPEC_FIELDS)}")
    codec = _field(raw, "c", str)
    dtype = _field(raw, "d", str)
    samples = _field(raw, "n", int)
    shape_raw = _field(raw, "s", list)
    if len(shape_raw) > limits.max_shape_dims:
        raise DecodeError(f"shape has {len(shape_raw)} dims, limit {limits.max_shape_dims}")
    if samples < 0:
        raise DecodeError("sample count is negative")
    shape = tuple(shape_raw)
    shape_elements(shape, limits.max_elements)
    return PayloadSpec(codec=codec, dtype=dtype, shape=shape, samples=samples)


def shape_elements(shape: tuple[int, ...], max_elements: int) -> int:
    """The element count of ``shape``, checked whatever the order of its dimensions.

    A zero dimension makes the count 0 but does not excuse the others: a tensor's strides
    are products of its non-zero dimensions, so ``[0, 2**63]`` is refused like ``[2**63]``.

    Raises:
        DecodeError: a dimension is not a non-negative integer.
        FrameTooLarge: the product of the non-zero dimensions exceeds ``max_elements``.
    """
    if len(shape) == 1:  # a model vector: one comparison (the general loop below costs 1 µs)
        (dim,) = shape
        if type(dim) is int and 0 <= dim <= max_elements:
            return dim
    if not all(isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 for dim in shape):
        raise DecodeError("shape entries must be non-negative integers")
    spanned = 1
    for dim in shape:
        if dim:
            spanned *= dim
            if spanned > max_elements:
                raise FrameTooLarge(
                    f"payload shape {list(shape)} exceeds {max_elements} elements "
                    "(counting every non-zero dimension)"
                )
    return 0 if 0 in shape else spanned


class ReplayWindow:
    """Accepts each sequence number of one sender at most once, within a sliding window.

    Like IPsec's anti-replay window: numbers above the highest seen always pass; numbers up
    to ``size - 1`` below it pass once; older ones are refused.
    """

    __slots__ = ("_highest", "_seen", "size")

    def __init__(self, size: int = 1024) -> None:
        if size < 1:
            raise ValueError("replay window size must be >= 1")
        self.size = size
        self._highest = -1
        self._seen = 0

    def check(self, seq: int) -> None:
        """Record ``seq``.

        Raises:
            Replayed: ``seq`` was seen already or lies below the window.
        """
        if seq > self._highest:
            shift = seq - self._highest
            self._seen = (
                ((self._seen << shift) | 1) & ((1 << self.size) - 1) if shift < self.size else 1
            )
            self._highest = seq
            return
        offset = self._highest - seq
        if offset >= self.size:
            raise Replayed(f"sequence {seq} is below the replay window (highest {self._highest})")
        bit = 1 << offset
        if self._seen & bit:
            raise Replayed(f"sequence {seq} was already received")
        self._seen |= bit
