"""Frames and envelopes: round trips, hostile bytes, limits, canonical form, replay window.

Frames are built two ways: through the public API (``seal`` / ``encode_frame``) and by hand
(``canonical`` + ``frame_of`` below, independent of ``wire``'s internals) so that a header can
carry a wrong value under a *valid* signature and the specific check is the one exercised.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pfl import wire as wire_internals
from p2pfl.errors import (
    BadSignature,
    DecodeError,
    FrameTooLarge,
    Replayed,
    UnknownKind,
    UnsupportedVersion,
    WireError,
)
from p2pfl.identity import Identity
from p2pfl.wire import (
    DEFAULT_LIMITS,
    MAX_ROUND,
    MAX_SEQ,
    PROTOCOL_VERSION,
    SIGNING_CONTEXT,
    Envelope,
    Limits,
    MessageKind,
    PayloadSpec,
    ReplayWindow,
    decode_body,
    decode_frame,
    encode_frame,
    encode_header,
    frame_parts,
    parse_frame,
    read_length,
    seal,
    signed_bytes,
)

ALICE = Identity.from_seed(b"\x01" * 32)
MALLORY = Identity.from_seed(b"\x02" * 32)
U32 = struct.Struct(">I")
SMALL_ALLOCATION = 64 * 1024


# --------------------------------------------------------------------------- helpers


def canonical(obj: Any) -> bytes:
    """The canonical msgpack form, written independently of ``p2pfl.wire``."""

    def sort(value: Any) -> Any:
        if isinstance(value, dict):
            # str before bytes so that hostile maps with mixed keys can still be packed here.
            order = sorted(value, key=lambda k: (isinstance(k, bytes), k))
            return {key: sort(value[key]) for key in order}
        if isinstance(value, list | tuple):
            return [sort(item) for item in value]
        return value

    return msgpack.packb(sort(obj), use_bin_type=True)


def frame_of(header: bytes, payload: bytes = b"") -> bytes:
    """A well-formed frame (both lengths right) around arbitrary header bytes."""
    body = U32.pack(len(header)) + header + payload
    return U32.pack(len(body)) + body


def base_fields(payload: bytes = b"", **overrides: Any) -> dict[str, Any]:
    """Header fields (without ``sig``) of a valid MODEL_UPDATE from ALICE, with overrides."""
    fields: dict[str, Any] = {
        "h": hashlib.sha256(payload).digest(),
        "k": int(MessageKind.MODEL_UPDATE),
        "m": {"note": "hi"},
        "p": {"c": "dense", "d": "float32", "n": 5, "s": [len(payload) // 4]},
        "q": 7,
        "r": 3,
        "s": ALICE.node_id.raw,
        "v": PROTOCOL_VERSION,
    }
    fields.update(overrides)
    return fields


def signed_header(fields: dict[str, Any], identity: Identity = ALICE) -> dict[str, Any]:
    """``fields`` plus a valid ``sig`` over their canonical form."""
    return {**fields, "sig": identity.sign(SIGNING_CONTEXT + canonical(fields))}


def signed_frame(payload: bytes = b"", identity: Identity = ALICE, **overrides: Any) -> bytes:
    return frame_of(canonical(signed_header(base_fields(payload, **overrides), identity)), payload)


@contextmanager
def peak_allocation() -> Iterator[list[int]]:
    """Yields a one-element list that holds the traced peak (bytes) after the block."""
    result = [0]
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        yield result
    finally:
        result[0] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


def assert_envelopes_equal(got: Envelope, want: Envelope) -> None:
    assert got.version == want.version == PROTOCOL_VERSION
    assert got.kind is want.kind
    assert got.sender == want.sender
    assert got.seq == want.seq
    assert got.round == want.round
    assert got.spec == want.spec
    assert got.digest == want.digest
    assert got.signature == want.signature
    assert dict(got.meta) == dict(want.meta)
    # Equality alone would let True == 1 and 1.0 == 1 pass: compare the encodings too.
    assert canonical(dict(got.meta)) == canonical(dict(want.meta))
    assert bytes(got.payload) == bytes(want.payload)


# ----------------------------------------------------------------------- strategies

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
small_keys = st.text(max_size=8)
level1 = scalars | st.lists(scalars, max_size=4) | st.dictionaries(small_keys, scalars, max_size=4)
level2 = level1 | st.lists(level1, max_size=3) | st.dictionaries(small_keys, level1, max_size=3)
metas = st.dictionaries(small_keys, level2, max_size=5)

# Every shape here stays within max_elements (2**24): 256**3 == 8**8 == 2**24.
shapes = (
    st.lists(st.integers(0, 256), max_size=3)
    | st.lists(st.integers(0, 8), max_size=8)
    | st.tuples(st.integers(0, DEFAULT_LIMITS.max_elements))
)
specs = st.builds(
    PayloadSpec,
    codec=st.text(max_size=12),
    dtype=st.text(max_size=12),
    shape=shapes.map(tuple),
    samples=st.integers(0, 2**64 - 1),
)
kinds = st.sampled_from(list(MessageKind))
payloads = st.binary(max_size=4096)


@st.composite
def envelopes(draw: st.DrawFn) -> Envelope:
    return seal(
        ALICE,
        draw(kinds),
        seq=draw(st.integers(0, MAX_SEQ)),
        round=draw(st.integers(0, MAX_ROUND)),
        payload=draw(payloads),
        spec=draw(specs),
        meta=draw(metas),
    )


# Arbitrary msgpack values, including what the codec must refuse (bytes keys, wide ints).
hostile_keys = st.sampled_from(["h", "k", "m", "p", "q", "r", "s", "sig", "v", "c", "d", "n"])
any_keys = hostile_keys | st.text(max_size=4) | st.binary(max_size=4)
any_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(any_keys, children, max_size=4)
    ),
    max_leaves=12,
)


# ------------------------------------------------------------------------ round trip


@given(envelopes())
def test_every_valid_envelope_round_trips(envelope: Envelope) -> None:
    frame = encode_frame(envelope)

    decoded = decode_frame(frame)
    assert_envelopes_equal(decoded, envelope)

    # The zero-copy writer path produces the same bytes ...
    head, payload_view = frame_parts(envelope)
    assert head + payload_view.tobytes() == frame
    # ... and the streaming reader path (prefix, then body) decodes the same envelope.
    total = read_length(frame[:4])
    assert total == len(frame) - 4
    assert_envelopes_equal(decode_body(bytearray(frame[4:])), envelope)


@given(envelopes())
def test_hand_built_canonical_header_matches_encoder(envelope: Envelope) -> None:
    # Pins the canonical form the signature covers to an independent implementation.
    fields = envelope.header_fields()
    assert encode_header(envelope) == canonical({**fields, "sig": envelope.signature})
    envelope.sender.verify(envelope.signature, SIGNING_CONTEXT + canonical(fields))


@given(envelopes())
def test_the_shortcuts_give_the_bytes_of_the_general_encoders(envelope: Envelope) -> None:
    # seal keeps the header it made; parse_frame cuts the signed bytes out of the header. Both
    # must equal what the encoders give for the same fields from scratch.
    fresh = dataclasses.replace(envelope)  # a new envelope: nothing kept from seal
    assert encode_header(envelope) == encode_header(fresh)
    assert encode_frame(envelope) == encode_frame(fresh)
    parsed, signed = parse_frame(encode_frame(envelope))
    assert signed == SIGNING_CONTEXT + canonical(envelope.header_fields())
    assert signed == signed_bytes(parsed.header_fields())


def recursive_sort_canonical(obj: Any) -> bytes:
    """The encoder ``p2pfl.wire`` used before its no-sort fast path, kept as the reference."""

    def sort(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: sort(item) for key, item in sorted(value.items(), key=lambda kv: kv[0])}
        if isinstance(value, list | tuple):
            return [sort(item) for item in value]
        return value

    return msgpack.packb(sort(obj), use_bin_type=True)


def _encoded_or_error(encode: Callable[[Any], bytes], obj: Any) -> bytes | type[Exception]:
    try:
        return encode(obj)
    except (TypeError, OverflowError, ValueError) as exc:
        return type(exc)


@given(st.dictionaries(any_keys, any_values, max_size=10) | any_values)
def test_canonical_encoder_matches_the_recursive_sort(header: Any) -> None:
    # Same bytes for every input, in any key order, and the same refusal (a map mixing str
    # and bytes keys has no order; ints beyond 64 bits do not pack).
    new = _encoded_or_error(wire_internals._canonical, header)
    assert new == _encoded_or_error(recursive_sort_canonical, header)


@given(envelopes(), st.randoms(use_true_random=False))
def test_header_encoder_matches_the_recursive_sort(envelope: Envelope, rng: Any) -> None:
    fields = envelope.header_fields()
    shuffled = list(fields.items())
    rng.shuffle(shuffled)
    header = {**dict(shuffled), "sig": envelope.signature}
    assert encode_header(envelope) == recursive_sort_canonical(header)
    assert wire_internals.signed_bytes(
        dict(shuffled)
    ) == SIGNING_CONTEXT + recursive_sort_canonical(fields)


def test_meta_keys_out_of_order_are_rejected() -> None:
    header = signed_header(base_fields(m={"a": 1, "b": 2}))
    entries = _replace(_entries(header), "m", b"\x82\xa1b\x02\xa1a\x01")
    assert msgpack.unpackb(_map9(entries), raw=False) == header
    with pytest.raises(DecodeError, match="canonical"):
        decode_frame(frame_of(_map9(entries)))
    decode_frame(frame_of(canonical(header)))


def test_decoded_payload_is_a_view_into_the_frame() -> None:
    frame = bytearray(encode_frame(seal(ALICE, MessageKind.HELLO, seq=0, round=0, payload=b"xy")))
    decoded = decode_frame(frame)
    assert isinstance(decoded.payload, memoryview)
    frame[-1:] = b"Z"
    assert bytes(decoded.payload) == b"xZ"


def test_seal_rejects_out_of_range_arguments() -> None:
    with pytest.raises(ValueError):
        seal(ALICE, MessageKind.HELLO, seq=-1, round=0, payload=b"")
    with pytest.raises(ValueError):
        seal(ALICE, MessageKind.HELLO, seq=MAX_SEQ + 1, round=0, payload=b"")
    with pytest.raises(ValueError):
        seal(ALICE, MessageKind.HELLO, seq=0, round=-1, payload=b"")
    with pytest.raises(ValueError):
        seal(ALICE, MessageKind.HELLO, seq=0, round=0, payload=b"", meta={1: "x"})  # type: ignore[dict-item]
    with pytest.raises(ValueError):
        seal(ALICE, 99, seq=0, round=0, payload=b"")  # type: ignore[arg-type]


# ------------------------------------------------------------- hostile bytes: only WireError


def assert_only_wire_error(data: bytes | bytearray) -> None:
    """Decoding may succeed (only for a frame ALICE really signed) or raise WireError."""
    try:
        envelope = decode_frame(data)
    except WireError:
        return
    assert envelope.sender == ALICE.node_id


@given(st.binary(max_size=512))
def test_arbitrary_bytes_raise_only_wire_error(data: bytes) -> None:
    with pytest.raises(WireError):
        decode_frame(data)


@given(st.binary(max_size=512))
def test_arbitrary_body_with_correct_length_raises_only_wire_error(body: bytes) -> None:
    with pytest.raises(WireError):
        decode_frame(U32.pack(len(body)) + body)


@given(st.binary(max_size=512), st.binary(max_size=64))
def test_arbitrary_header_bytes_in_well_formed_frame_raise_only_wire_error(
    header: bytes, payload: bytes
) -> None:
    with pytest.raises(WireError):
        decode_frame(frame_of(header, payload))


@given(any_values, st.binary(max_size=64))
def test_arbitrary_msgpack_header_raises_only_wire_error(header: Any, payload: bytes) -> None:
    with pytest.raises(WireError):
        decode_frame(frame_of(msgpack.packb(header, use_bin_type=True), payload))


@given(st.dictionaries(any_keys, any_values, max_size=10), st.booleans(), st.binary(max_size=64))
def test_arbitrary_msgpack_map_header_raises_only_wire_error(
    header: dict[Any, Any], with_version: bool, payload: bytes
) -> None:
    if with_version:  # get past the version check to the field checks
        header = {**header, "v": PROTOCOL_VERSION}
    with pytest.raises(WireError):
        decode_frame(frame_of(msgpack.packb(header, use_bin_type=True), payload))


@given(
    st.data(),
    st.lists(st.sampled_from(["h", "k", "m", "p", "q", "r", "s", "v", "x"]), max_size=3),
    st.booleans(),
)
def test_properly_signed_headers_with_random_field_values_raise_only_wire_error(
    data: st.DataObject, keys: list[str], drop: bool
) -> None:
    # Valid header, some fields replaced (or dropped) by arbitrary values, then *re-signed*,
    # so the decoder's field checks run past the signature gate as well as before it.
    payload = data.draw(st.binary(max_size=32))
    fields = base_fields(payload)
    for key in keys:
        if drop and key in fields:
            del fields[key]
        else:
            fields[key] = data.draw(any_values)
    frame = frame_of(canonical(signed_header(fields)), payload)
    # Compared as bytes, not with ==: True == 1 in Python, but a bool is not an int on the wire.
    if canonical(fields) == canonical(base_fields(payload)):
        decode_frame(frame)  # nothing changed: must still decode
    else:
        assert_only_wire_error(frame)


@given(st.dictionaries(st.text(max_size=4), any_values, max_size=5))
def test_signed_meta_with_any_values_raises_only_wire_error(meta: dict[str, Any]) -> None:
    assert_only_wire_error(signed_frame(m=meta))


@pytest.mark.parametrize("where", ["header", "spec", "meta", "meta list"])
@given(
    str_part=st.dictionaries(st.text(max_size=4), scalars, min_size=1, max_size=4),
    bytes_part=st.dictionaries(st.binary(max_size=4), scalars, min_size=1, max_size=4),
)
def test_maps_with_mixed_str_and_bytes_keys_are_wire_errors(
    where: str, str_part: dict[str, Any], bytes_part: dict[bytes, Any]
) -> None:
    # Mixed key types have no sorted order: the decoder must say DecodeError, not TypeError.
    mixed = {**str_part, **bytes_part}
    if where == "header":
        frame = frame_of(canonical({**signed_header(base_fields()), **mixed, "v": 1}))
    elif where == "spec":
        frame = signed_frame(p={**base_fields()["p"], **mixed})
    elif where == "meta":
        frame = signed_frame(m=mixed)
    else:
        frame = signed_frame(m={"list": [1, mixed]})
    with pytest.raises(DecodeError):
        decode_frame(frame)


# --------------------------------------------------------------- tampering is always rejected


@st.composite
def frames_and_flips(draw: st.DrawFn) -> tuple[bytes, int, int]:
    frame = encode_frame(draw(envelopes()))
    position = draw(st.integers(0, len(frame) - 1))
    mask = draw(st.integers(1, 255))
    return frame, position, mask


@given(frames_and_flips())
def test_any_flipped_byte_is_rejected(case: tuple[bytes, int, int]) -> None:
    frame, position, mask = case
    tampered = bytearray(frame)
    tampered[position] ^= mask
    with pytest.raises(WireError):
        decode_frame(tampered)


@given(st.data())
def test_any_truncation_or_extension_is_rejected(data: st.DataObject) -> None:
    frame = encode_frame(data.draw(envelopes()))
    cut = data.draw(st.integers(0, len(frame) - 1))
    with pytest.raises(WireError):
        decode_frame(frame[:cut])
    with pytest.raises(WireError):
        decode_frame(frame + data.draw(st.binary(min_size=1, max_size=8)))


def test_frame_signed_by_someone_else_is_rejected() -> None:
    # MALLORY signs a header that claims ALICE as sender.
    with pytest.raises(BadSignature):
        decode_frame(signed_frame(identity=MALLORY))


def test_payload_swapped_under_valid_header_is_rejected() -> None:
    header = canonical(signed_header(base_fields(b"good")))
    decode_frame(frame_of(header, b"good"))
    with pytest.raises(BadSignature, match="digest"):
        decode_frame(frame_of(header, b"evil"))


# ----------------------------------------------------------------- sizes and allocation


@pytest.mark.parametrize("declared", [DEFAULT_LIMITS.max_frame_bytes - 3, 2**31, 2**32 - 1])
def test_oversized_declared_frame_is_refused_before_allocation(declared: int) -> None:
    prefix = U32.pack(declared)
    with peak_allocation() as peak, pytest.raises(FrameTooLarge):
        read_length(prefix)
    assert peak[0] < SMALL_ALLOCATION
    with peak_allocation() as peak, pytest.raises(FrameTooLarge):
        decode_frame(prefix)
    assert peak[0] < SMALL_ALLOCATION


def test_frame_limit_boundary() -> None:
    frame = signed_frame(b"\x00" * 16)
    assert read_length(frame[:4], Limits(max_frame_bytes=len(frame))) == len(frame) - 4
    decode_frame(frame, Limits(max_frame_bytes=len(frame)))
    with pytest.raises(FrameTooLarge):
        decode_frame(frame, Limits(max_frame_bytes=len(frame) - 1))
    with pytest.raises(FrameTooLarge):
        read_length(frame[:4], Limits(max_frame_bytes=len(frame) - 1))


@pytest.mark.parametrize("prefix", [b"", b"\x00", b"\x00\x00\x00", b"\x00" * 5])
def test_read_length_needs_exactly_four_bytes(prefix: bytes) -> None:
    with pytest.raises(DecodeError):
        read_length(prefix)


@pytest.mark.parametrize("total", [0, 1, 3])
def test_frame_too_short_for_header_length(total: int) -> None:
    with pytest.raises(DecodeError):
        read_length(U32.pack(total))


def test_declared_header_above_limit_is_refused_before_allocation() -> None:
    for header_len in (DEFAULT_LIMITS.max_header_bytes + 1, 2**31, 2**32 - 1):
        with peak_allocation() as peak, pytest.raises(FrameTooLarge):
            decode_body(U32.pack(header_len))
        assert peak[0] < SMALL_ALLOCATION
        # In a frame whose outer length is consistent, the header limit still comes first.
        with pytest.raises(FrameTooLarge):
            decode_frame(U32.pack(8) + U32.pack(header_len) + b"\x80\x00\x00\x00")


def test_real_header_above_custom_limit_is_refused() -> None:
    frame = signed_frame()
    header_len = U32.unpack(frame[4:8])[0]
    decode_frame(frame, Limits(max_header_bytes=header_len))
    with pytest.raises(FrameTooLarge):
        decode_frame(frame, Limits(max_header_bytes=header_len - 1))


def test_shape_over_max_elements_is_refused() -> None:
    huge = {"c": "dense", "d": "float32", "n": 0, "s": [2**20, 2**20]}
    frame = signed_frame(p=huge)
    with peak_allocation() as peak, pytest.raises(FrameTooLarge):
        decode_frame(frame)
    assert peak[0] < SMALL_ALLOCATION
    # Exactly at the limit is fine; one more element is not.
    limit = DEFAULT_LIMITS.max_elements
    decode_frame(signed_frame(p={**huge, "s": [limit]}))
    with pytest.raises(FrameTooLarge):
        decode_frame(signed_frame(p={**huge, "s": [limit + 1]}))
    with pytest.raises(FrameTooLarge):
        decode_frame(signed_frame(p={**huge, "s": [2, 3]}), Limits(max_elements=5))


@pytest.mark.parametrize(
    "shape",
    [[1] * (DEFAULT_LIMITS.max_shape_dims + 1), [-1], [1, True], [1.0], ["3"], [[2]]],
)
def test_malformed_shapes_are_decode_errors(shape: list[Any]) -> None:
    spec = {"c": "dense", "d": "float32", "n": 0, "s": shape}
    with pytest.raises(DecodeError):
        decode_frame(signed_frame(p=spec))


# ------------------------------------------------ version and kind, under a valid signature


def test_hand_built_frame_is_valid_control() -> None:
    # The helpers below only prove something if an unaltered hand-built frame decodes.
    payload = b"\x00" * 8
    envelope = decode_frame(signed_frame(payload))
    assert envelope.kind is MessageKind.MODEL_UPDATE
    assert envelope.seq == 7
    assert envelope.spec == PayloadSpec("dense", "float32", (2,), 5)


@given(st.integers(-(2**63), 2**64 - 1).filter(lambda v: v != PROTOCOL_VERSION))
def test_other_version_is_unsupported(version: int) -> None:
    with pytest.raises(UnsupportedVersion):
        decode_frame(signed_frame(v=version))


@given(st.integers(-(2**63), 2**64 - 1).filter(lambda k: k not in set(MessageKind)))
def test_unknown_kind_is_refused(kind: int) -> None:
    with pytest.raises(UnknownKind):
        decode_frame(signed_frame(k=kind))


@pytest.mark.parametrize("version", ["1", 1.0, True, None, b"\x01"])
def test_version_of_wrong_type_is_a_decode_error(version: Any) -> None:
    with pytest.raises(DecodeError):
        decode_frame(signed_frame(v=version))


@pytest.mark.parametrize("kind", ["10", 10.0, True, None, b"\x0a"])
def test_kind_of_wrong_type_is_a_decode_error(kind: Any) -> None:
    with pytest.raises(DecodeError):
        decode_frame(signed_frame(k=kind))


@pytest.mark.parametrize(
    "overrides",
    [
        {"q": -1},
        {"r": -1},
        {"q": True},
        {"s": b"\x00" * 31},
        {"h": b"\x00" * 31},
        {"m": []},
        {"p": {"c": "dense", "d": "float32", "n": -1, "s": []}},
        {"p": {"c": "dense", "d": "float32", "s": []}},
        {"p": {"c": "dense", "d": "float32", "n": 0, "s": [], "x": 1}},
        {"x": 1},
    ],
    ids=repr,
)
def test_signed_header_with_bad_field_is_a_decode_error(overrides: dict[str, Any]) -> None:
    with pytest.raises(DecodeError):
        decode_frame(signed_frame(**overrides))


def test_short_signature_is_a_decode_error() -> None:
    header = signed_header(base_fields())
    header["sig"] = header["sig"][:63]
    with pytest.raises(DecodeError):
        decode_frame(frame_of(canonical(header)))


# ------------------------------------------------------------------ canonical encoding only


def _entries(header: dict[str, Any]) -> list[tuple[bytes, bytes]]:
    return [
        (msgpack.packb(key), msgpack.packb(header[key], use_bin_type=True))
        for key in sorted(header)
    ]


def _map9(entries: list[tuple[bytes, bytes]]) -> bytes:
    return bytes([0x80 | len(entries)]) + b"".join(k + v for k, v in entries)


def _replace(
    entries: list[tuple[bytes, bytes]], key: str, value: bytes
) -> list[tuple[bytes, bytes]]:
    packed_key = msgpack.packb(key)
    assert any(k == packed_key for k, _ in entries)
    return [(k, value if k == packed_key else v) for k, v in entries]


def _noncanonical_variants() -> dict[str, Callable[[dict[str, Any]], bytes]]:
    return {
        "keys in reverse order": lambda h: _map9(list(reversed(_entries(h)))),
        "map16 for a 9-entry map": lambda h: b"\xde\x00\x09" + _map9(_entries(h))[1:],
        "seq as uint64": lambda h: _map9(
            _replace(_entries(h), "q", b"\xcf" + struct.pack(">Q", h["q"]))
        ),
        "round as int8": lambda h: _map9(_replace(_entries(h), "r", b"\xd0" + bytes([h["r"]]))),
        "version as uint16": lambda h: _map9(_replace(_entries(h), "v", b"\xcd\x00\x01")),
        "meta string as str8": lambda h: _map9(
            _replace(_entries(h), "m", b"\x81\xa4note\xd9\x02hi")
        ),
        "sender as bin16": lambda h: _map9(_replace(_entries(h), "s", b"\xc5\x00\x20" + h["s"])),
        "meta float as float32": lambda h: _map9(
            _replace(_entries(h), "m", b"\x81\xa4note\xca" + struct.pack(">f", 0.5))
        ),
        "duplicate meta key": lambda h: _map9(
            _replace(_entries(h), "m", b"\x82\xa4note\xa2hi\xa4note\xa2hi")
        ),
    }


def test_canonical_builder_control() -> None:
    fields = base_fields(m={"note": "hi"})
    header = signed_header(fields)
    assert _map9(_entries(header)) == canonical(header)
    decode_frame(frame_of(_map9(_entries(header))))


@pytest.mark.parametrize("variant", sorted(_noncanonical_variants()))
def test_non_canonical_header_is_rejected(variant: str) -> None:
    meta: dict[str, Any] = {"note": 0.5} if "float" in variant else {"note": "hi"}
    header = signed_header(base_fields(m=meta))
    encoded = _noncanonical_variants()[variant](header)
    assert encoded != canonical(header)
    # Same logical content: msgpack reads back exactly what was signed ...
    assert msgpack.unpackb(encoded, raw=False) == header
    # ... yet only the one canonical byte form is accepted.
    with pytest.raises(DecodeError, match="canonical"):
        decode_frame(frame_of(encoded))


# ----------------------------------------------------------- nesting bombs, huge declarations


def _depth_meta(depth: int) -> dict[str, Any]:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return {"a": value}


def test_meta_nesting_limit_boundary() -> None:
    # header -> m -> "a" -> four lists -> scalar sits exactly at max_depth = 6.
    ok = seal(ALICE, MessageKind.HELLO, seq=0, round=0, payload=b"", meta=_depth_meta(4))
    assert decode_frame(encode_frame(ok)).meta == _depth_meta(4)
    deep = seal(ALICE, MessageKind.HELLO, seq=0, round=0, payload=b"", meta=_depth_meta(5))
    with pytest.raises(DecodeError, match="deep"):
        decode_frame(encode_frame(deep))


@pytest.mark.parametrize("container", ["list", "map"])
def test_container_length_limit_boundary(container: str) -> None:
    cap = DEFAULT_LIMITS.max_container_len

    def meta(n: int) -> dict[str, Any]:
        return {"a": list(range(n)) if container == "list" else {str(i): i for i in range(n)}}

    decode_frame(signed_frame(m=meta(cap)))
    with pytest.raises(DecodeError, match="exceeds max"):
        decode_frame(signed_frame(m=meta(cap + 1)))
    with pytest.raises(DecodeError):
        decode_frame(signed_frame(m=meta(4)), Limits(max_container_len=3))


BOMBS = {
    "nested arrays x60000": b"\x81\xa1m" + b"\x91" * 60_000 + b"\xc0",
    "nested arrays x1000": b"\x81\xa1m" + b"\x91" * 1_000 + b"\xc0",
    "nested maps x10000": b"\x81\xa1m" + b"\x81\xa1a" * 10_000 + b"\xc0",
    "array32 of 2**32-1": b"\x81\xa1m\xdd\xff\xff\xff\xff",
    "map32 of 2**32-1": b"\xdf\xff\xff\xff\xff",
    "array16 over cap": b"\x81\xa1m\xdc" + struct.pack(">H", 2000) + b"\xc0" * 2000,
    "bin32 of 2**32-1": b"\x81\xa1m\xc6\xff\xff\xff\xff",
    "str32 of 2**32-1": b"\x81\xa1m\xdb\xff\xff\xff\xff",
    "ext32 of 2**32-1": b"\x81\xa1m\xc9\xff\xff\xff\xff\x01",
    "timestamp ext": b"\x81\xa1m\xd6\xff\x00\x00\x00\x01",
    "array of 1000 deep arrays": b"\x81\xa1m\xdc\x03\xe8" + (b"\x91" * 40 + b"\xc0") * 1000,
}


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_header_bombs_are_rejected_quickly(name: str) -> None:
    frame = frame_of(BOMBS[name])
    assert len(frame) < DEFAULT_LIMITS.max_header_bytes  # within every size limit
    # CPU time of this process, not wall time: other work on a shared machine must not make
    # a linear-time rejection look slow (the slowest bomb takes ~0.2 s here, most < 10 ms).
    started = time.process_time()
    with pytest.raises(WireError):
        decode_frame(frame)
    elapsed = time.process_time() - started
    assert elapsed < 1.0, f"{name} took {elapsed:.3f}s of CPU"
    # Tracing slows the decoder down, so memory is measured on a second, untimed run.
    with peak_allocation() as peak, pytest.raises(WireError):
        decode_frame(frame)
    assert peak[0] < 4 * 1024 * 1024, f"{name} allocated {peak[0]} bytes"


# ---------------------------------------------------------------------- replay window


def test_replay_window_accepts_increasing() -> None:
    window = ReplayWindow(size=8)
    for seq in (0, 1, 2, 10, 11, 1000, 2**63 - 1):
        window.check(seq)


def test_replay_window_rejects_duplicates() -> None:
    window = ReplayWindow(size=8)
    window.check(5)
    with pytest.raises(Replayed, match="already"):
        window.check(5)
    window.check(3)  # older but inside the window, first time: fine
    with pytest.raises(Replayed):
        window.check(3)


def test_replay_window_rejects_older_than_window() -> None:
    window = ReplayWindow(size=8)
    window.check(100)
    window.check(93)  # 100 - 7: the oldest number inside the window
    with pytest.raises(Replayed, match="below"):
        window.check(92)
    window.check(10_000)  # a jump larger than the window forgets everything older
    with pytest.raises(Replayed):
        window.check(100)
    window.check(9_999)


def test_replay_window_size_must_be_positive() -> None:
    with pytest.raises(ValueError):
        ReplayWindow(size=0)
    window = ReplayWindow(size=1)
    window.check(4)
    with pytest.raises(Replayed):
        window.check(3)
    window.check(5)


class ReplayModel:
    """The specification: accept iff not seen and seq > highest - size."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.seen: set[int] = set()
        self.highest = -1

    def accepts(self, seq: int) -> bool:
        if seq in self.seen or seq <= self.highest - self.size:
            return False
        self.seen.add(seq)
        self.highest = max(self.highest, seq)
        return True


seq_streams = st.lists(
    st.integers(0, 300) | st.integers(0, MAX_SEQ),
    max_size=200,
)


@given(st.integers(1, 70), seq_streams)
def test_replay_window_matches_set_model(size: int, seqs: list[int]) -> None:
    window = ReplayWindow(size=size)
    model = ReplayModel(size)
    for seq in seqs:
        expected = model.accepts(seq)
        try:
            window.check(seq)
        except Replayed:
            accepted = False
        else:
            accepted = True
        assert accepted == expected, (seq, size)


@given(st.integers(1, 70), st.lists(st.integers(0, 500), unique=True, max_size=100))
def test_replay_window_accepts_any_unseen_order_within_window(size: int, seqs: list[int]) -> None:
    # Sorted, distinct numbers always pass; replaying any of them afterwards never does.
    window = ReplayWindow(size=size)
    for seq in sorted(seqs):
        window.check(seq)
    for seq in seqs:
        with pytest.raises(Replayed):
            window.check(seq)


def _too_deep_reference(obj: Any, budget: int) -> bool:
    """The depth rule: every value, scalars included, one level below its container."""
    if budget < 0:
        return True
    children = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else []
    return any(_too_deep_reference(child, budget - 1) for child in children)


@given(any_values, st.integers(0, 4))
def test_depth_check_counts_scalars_like_containers(value: Any, depth: int) -> None:
    header = {"m": {"a": value}}
    limits = Limits(max_depth=depth)
    packed = msgpack.packb(header, use_bin_type=True)
    try:
        wire_internals._unpack_header(memoryview(packed), limits)
    except DecodeError as exc:
        assert "deep" in str(exc) and _too_deep_reference(header, depth)
    else:
        assert not _too_deep_reference(header, depth)


# ------------------------------------------- fast header checks agree with the field-by-field


def _outcome(build: Callable[[], object]) -> object:
    try:
        return ("accepted", build())
    except WireError as exc:
        return (type(exc), str(exc))


TRICKY = [True, False, 1, 0, -1, MAX_SEQ, MAX_SEQ + 1, 2**64, 1.0, None, "", b"", [], {}]
HEADER_KEYS = ["h", "k", "m", "p", "q", "r", "s", "sig", "v", "x", "pc", "pd", "pn", "ps", "px"]


def _assert_paths_agree(keys: list[str], value_of: Callable[[], Any], drop: bool) -> None:
    # The decoder checks the one acceptable header shape in one go and leaves anything else
    # to the field-by-field path: both must accept the same headers, build equal envelopes,
    # and refuse the rest with the same error.
    payload = b"\x00" * 8
    header = signed_header(base_fields(payload))
    spec = header["p"] = dict(header["p"])
    for key in keys:
        target, name = (spec, key[1]) if len(key) == 2 else (header, key)
        if drop and name in target:
            del target[name]
        else:
            target[name] = value_of()
    view = memoryview(payload)
    fast = _outcome(lambda: wire_internals._envelope_from_header(header, view, DEFAULT_LIMITS))
    slow = _outcome(lambda: wire_internals._envelope_field_by_field(header, view, DEFAULT_LIMITS))
    assert fast == slow
    if not keys:
        assert fast[0] == "accepted"  # type: ignore[index]
    if isinstance(header.get("p"), dict):
        fast = _outcome(lambda: wire_internals._spec_from_wire(header["p"], DEFAULT_LIMITS))
        slow = _outcome(lambda: wire_internals._spec_field_by_field(header["p"], DEFAULT_LIMITS))
        assert fast == slow


@pytest.mark.parametrize("key", HEADER_KEYS)
def test_each_field_checked_alike_by_both_header_paths(key: str) -> None:
    _assert_paths_agree([], lambda: None, drop=False)
    _assert_paths_agree([key], lambda: None, drop=True)
    for value in TRICKY:
        _assert_paths_agree([key], lambda value=value: value, drop=False)  # type: ignore[misc]


@given(st.data(), st.lists(st.sampled_from(HEADER_KEYS), max_size=3), st.booleans())
def test_header_checks_agree_with_the_field_by_field_path(
    data: st.DataObject, keys: list[str], drop: bool
) -> None:
    _assert_paths_agree(keys, lambda: data.draw(st.sampled_from(TRICKY) | any_values), drop)


@given(
    st.one_of(
        st.integers(-(2**70), 2**70),
        st.booleans(),
        st.floats(allow_nan=False),
        st.just(DEFAULT_LIMITS.max_elements),
        st.just(DEFAULT_LIMITS.max_elements + 1),
    )
)
def test_one_dimension_counts_as_the_general_rule(dim: Any) -> None:
    # (dim,) takes a shortcut; (dim, 1) the general path, which must agree with it.
    def outcome(shape: tuple[Any, ...]) -> int | type[Exception]:
        try:
            return wire_internals.shape_elements(shape, DEFAULT_LIMITS.max_elements)
        except (DecodeError, FrameTooLarge) as exc:
            return type(exc)

    assert outcome((dim,)) == outcome((dim, 1))
