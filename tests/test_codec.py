"""Parameter vectors <-> payload bytes: exactness, zero copy, and refusal of bad payloads."""

from __future__ import annotations

import ctypes
import struct
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from p2pfl.codec import DENSE, WIRE_DTYPES, decode_vector, encode_vector
from p2pfl.errors import DecodeError, FrameTooLarge, WireError
from p2pfl.identity import Identity
from p2pfl.wire import (
    DEFAULT_LIMITS,
    Limits,
    MessageKind,
    PayloadSpec,
    decode_frame,
    encode_frame,
    frame_parts,
    seal,
)

ALICE = Identity.from_seed(b"\x03" * 32)

float32_values = st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True)
vectors = st.lists(float32_values, max_size=300).map(
    lambda values: torch.tensor(values, dtype=torch.float32)
)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.int32)


def _buffer_address(buffer: bytearray) -> int:
    return ctypes.addressof((ctypes.c_char * len(buffer)).from_buffer(buffer))


# ------------------------------------------------------------------------ round trips


@given(vectors)
def test_float32_round_trip_is_bit_exact(vector: torch.Tensor) -> None:
    spec, payload = encode_vector(vector, dtype="float32", samples=3)
    assert spec == PayloadSpec(DENSE, "float32", tuple(vector.shape), 3)
    assert payload.nbytes == 4 * vector.numel()
    decoded = decode_vector(spec, bytes(payload))
    assert decoded.dtype == torch.float32
    assert decoded.shape == vector.shape
    # Bit comparison: NaN payloads, -0.0 and subnormals all survive unchanged.
    assert torch.equal(_bits(decoded), _bits(vector))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@given(vector=vectors)
def test_narrow_dtypes_round_trip_like_a_cast(dtype: str, vector: torch.Tensor) -> None:
    spec, payload = encode_vector(vector, dtype=dtype)
    assert spec.dtype == dtype
    assert payload.nbytes == 2 * vector.numel()
    decoded = decode_vector(spec, bytes(payload))
    expected = vector.to(WIRE_DTYPES[dtype]).to(torch.float32)
    assert decoded.dtype == torch.float32
    torch.testing.assert_close(decoded, expected, rtol=0, atol=0, equal_nan=True)


def test_narrow_dtypes_actually_lose_precision() -> None:
    # Guards the test above against a codec that silently sends float32.
    vector = torch.tensor([1.0 + 2**-20], dtype=torch.float32)
    for dtype in ("float16", "bfloat16"):
        spec, payload = encode_vector(vector, dtype=dtype)
        assert decode_vector(spec, bytes(payload)).item() == 1.0


@pytest.mark.parametrize("dtype", sorted(WIRE_DTYPES))
def test_encoding_is_little_endian(dtype: str) -> None:
    spec, payload = encode_vector(torch.tensor([1.0, -2.0]), dtype=dtype)
    expected = {
        "float32": struct.pack("<2f", 1.0, -2.0),
        "float16": struct.pack("<2e", 1.0, -2.0),
        "bfloat16": struct.pack("<2f", 1.0, -2.0)[2:4] + struct.pack("<2f", 1.0, -2.0)[6:8],
    }[dtype]
    assert bytes(payload) == expected


@pytest.mark.parametrize("shape", [(0,), (3, 4), (2, 0, 5), (1, 1, 1, 7), ()])
@pytest.mark.parametrize("dtype", sorted(WIRE_DTYPES))
def test_shapes_round_trip(shape: tuple[int, ...], dtype: str) -> None:
    vector = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
    spec, payload = encode_vector(vector, dtype=dtype)
    assert spec.shape == shape
    decoded = decode_vector(spec, bytes(payload))
    assert decoded.shape == vector.shape
    assert torch.equal(decoded, vector)  # small integers are exact in every wire dtype


def test_non_contiguous_and_float64_inputs_are_encoded() -> None:
    base = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    view = base.t()  # non-contiguous, float64
    spec, payload = encode_vector(view)
    assert torch.equal(decode_vector(spec, bytes(payload)), view.to(torch.float32))


# ------------------------------------------------------------------------- zero copy


def test_decode_float32_from_writable_buffer_shares_memory() -> None:
    # Intended zero copy: a receiver reads a frame into its own bytearray and the merge rule
    # works on a tensor that *views* those bytes, so a 64 MiB model is never copied on the
    # way in. The price (documented on decode_vector) is that the tensor aliases the buffer.
    vector = torch.tensor([1.0, 2.0, 3.0, 4.0])
    spec, payload = encode_vector(vector)
    buffer = bytearray(payload)
    decoded = decode_vector(spec, buffer)

    start = _buffer_address(buffer)
    assert start <= decoded.data_ptr() < start + len(buffer)

    buffer[4:8] = struct.pack("<f", 42.0)
    assert decoded.tolist() == [1.0, 42.0, 3.0, 4.0]


def test_decode_float32_from_memoryview_slice_shares_memory() -> None:
    # As used after decode_frame: the payload is a memoryview into the received frame.
    frame = bytearray(b"HEAD") + bytearray(struct.pack("<3f", 1.0, 2.0, 3.0))
    decoded = decode_vector(PayloadSpec(DENSE, "float32", (3,)), memoryview(frame)[4:])
    frame[4:8] = struct.pack("<f", -1.0)
    assert decoded.tolist() == [-1.0, 2.0, 3.0]


def test_decode_from_read_only_bytes_copies_without_warning() -> None:
    spec, payload = encode_vector(torch.tensor([1.0, 2.0]))
    data = bytes(payload)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when wrapping a read-only buffer
        decoded = decode_vector(spec, data)
    decoded += 1  # owns writable memory
    assert decoded.tolist() == [2.0, 3.0]
    assert data == struct.pack("<2f", 1.0, 2.0)


def test_decode_narrow_dtype_does_not_alias_buffer() -> None:
    spec, payload = encode_vector(torch.tensor([1.0, 2.0]), dtype="float16")
    buffer = bytearray(payload)
    decoded = decode_vector(spec, buffer)
    buffer[:] = bytes(len(buffer))
    assert decoded.tolist() == [1.0, 2.0]


def test_encode_float32_exposes_tensor_memory() -> None:
    vector = torch.tensor([1.0, 2.0])
    _, payload = encode_vector(vector)
    vector[0] = 5.0
    assert bytes(payload[:4]) == struct.pack("<f", 5.0)


# ------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("delta", [-1, 1, -4, 4])
@pytest.mark.parametrize("dtype", sorted(WIRE_DTYPES))
def test_wrong_byte_count_is_a_decode_error(dtype: str, delta: int) -> None:
    spec, payload = encode_vector(torch.ones(8), dtype=dtype)
    data = bytes(payload)
    data = data[:delta] if delta < 0 else data + b"\x00" * delta
    with pytest.raises(DecodeError, match="bytes"):
        decode_vector(spec, data)


def test_empty_shape_with_bytes_is_a_decode_error() -> None:
    with pytest.raises(DecodeError):
        decode_vector(PayloadSpec(DENSE, "float32", (0,)), b"\x00" * 4)


@pytest.mark.parametrize("dtype", ["float64", "int8", "", "FLOAT32", "torch.float32"])
def test_unknown_dtype_is_a_decode_error(dtype: str) -> None:
    with pytest.raises(DecodeError, match="dtype"):
        decode_vector(PayloadSpec(DENSE, dtype, (1,)), b"\x00" * 4)


@pytest.mark.parametrize("codec", ["raw", "top-k", "INT8", "", "DENSE"])
def test_unknown_codec_is_a_decode_error(codec: str) -> None:
    with pytest.raises(DecodeError, match="codec"):
        decode_vector(PayloadSpec(codec, "float32", (1,)), b"\x00" * 4)


def test_shape_over_max_elements_is_frame_too_large_before_allocation() -> None:
    # An empty payload: the byte-count check would fail too, but the size check comes first,
    # and nothing of the declared size is ever allocated.
    with pytest.raises(FrameTooLarge):
        decode_vector(PayloadSpec(DENSE, "float32", (2**20, 2**20)), b"")
    with pytest.raises(FrameTooLarge):
        decode_vector(PayloadSpec(DENSE, "float32", (DEFAULT_LIMITS.max_elements + 1,)), b"")
    limits = Limits(max_elements=10)
    with pytest.raises(FrameTooLarge):
        decode_vector(PayloadSpec(DENSE, "float32", (11,)), b"\x00" * 44, limits)
    assert decode_vector(PayloadSpec(DENSE, "float32", (10,)), b"\x00" * 40, limits).numel() == 10


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.uint8, torch.bool])
def test_non_float_tensor_is_a_value_error(dtype: torch.dtype) -> None:
    with pytest.raises(ValueError, match="cannot encode"):
        encode_vector(torch.zeros(3, dtype=dtype))


@pytest.mark.parametrize("dtype", ["float64", "int8", "FLOAT32"])
def test_unknown_encode_dtype_is_a_value_error(dtype: str) -> None:
    with pytest.raises(ValueError, match="dtype"):
        encode_vector(torch.zeros(3), dtype=dtype)


# ------------------------------------------------------------------------ end to end


@pytest.mark.parametrize("dtype", sorted(WIRE_DTYPES))
@pytest.mark.parametrize("writable", [True, False])
def test_end_to_end_through_a_signed_frame(dtype: str, writable: bool) -> None:
    generator = torch.Generator().manual_seed(1234)
    vector = torch.randn(100_000, generator=generator)
    spec, payload = encode_vector(vector, dtype=dtype, samples=640)

    envelope = seal(ALICE, MessageKind.MODEL_UPDATE, seq=1, round=9, payload=payload, spec=spec)
    head, body = frame_parts(envelope)
    frame = encode_frame(envelope)
    assert frame == head + body.tobytes()

    received = decode_frame(bytearray(frame) if writable else frame)
    assert received.sender == ALICE.node_id
    assert received.spec == PayloadSpec(DENSE, dtype, (100_000,), 640)

    decoded = decode_vector(received.spec, received.payload)
    assert decoded.shape == (100_000,)
    expected = vector.to(WIRE_DTYPES[dtype]).to(torch.float32)
    assert torch.equal(decoded, expected)
    if dtype == "float32":
        assert torch.equal(decoded, vector)


# ------------------------------------------------------------- any shape, signed (issue 12)

dims = st.one_of(
    st.just(0),
    st.integers(1, 5),
    st.integers(0, 2**64 - 1),
    st.integers(2**62, 2**64 - 1),  # near 2**64: strides overflow int64 if admitted
    st.integers(2**24 - 2, 2**24 + 2),  # around the element limit
)


@given(
    shape=st.lists(dims, max_size=10),
    dtype=st.sampled_from(sorted(WIRE_DTYPES)),
    extra=st.integers(-3, 3),
)
def test_every_signed_frame_decodes_to_a_tensor_or_raises_a_wire_error(
    shape: list[int], dtype: str, extra: int
) -> None:
    """Whatever shape a (validly signed) frame declares, decoding it yields a float32 tensor
    of that shape or a ``WireError``; never a plain exception from msgpack or torch."""
    itemsize = torch.empty((), dtype=WIRE_DTYPES[dtype]).element_size()
    spanned = 1
    for dim in shape:
        spanned *= max(dim, 1)
    elements = 0 if 0 in shape else spanned
    length = max(0, elements * itemsize + extra) if spanned <= 4096 else 16
    spec = PayloadSpec(DENSE, dtype, tuple(shape), 1)
    envelope = seal(
        ALICE, MessageKind.MODEL_UPDATE, seq=1, round=0, payload=bytes(length), spec=spec
    )
    try:
        decoded = decode_vector(decode_frame(encode_frame(envelope)).spec, envelope.payload)
    except WireError:
        return
    assert decoded.dtype == torch.float32
    assert tuple(decoded.shape) == tuple(shape)
    assert spanned <= DEFAULT_LIMITS.max_elements  # only shapes within the limit decode


@pytest.mark.parametrize(
    "shape", [[0, 2**63], [0, 2**64 - 1], [0, 2**62, 2**62], [0, 2**40], [2**40, 0]]
)
def test_zero_dimensions_do_not_excuse_huge_ones(shape: list[int]) -> None:
    spec = PayloadSpec(DENSE, "float32", tuple(shape), 1)
    frame = encode_frame(
        seal(ALICE, MessageKind.MODEL_UPDATE, seq=1, round=0, payload=b"", spec=spec)
    )
    with pytest.raises(FrameTooLarge):
        decode_frame(frame)  # the wire refuses it, in either dimension order
    with pytest.raises(FrameTooLarge):
        decode_vector(spec, b"")  # and so does the codec, for a spec built any other way


def test_a_zero_dimension_beside_allowed_ones_decodes_to_an_empty_tensor() -> None:
    spec = PayloadSpec(DENSE, "float32", (0, DEFAULT_LIMITS.max_elements), 1)
    assert decode_vector(spec, b"").shape == (0, DEFAULT_LIMITS.max_elements)


# ------------------------------------------------------- fast paths against general ones


def _general_encoding(vector: torch.Tensor) -> tuple[PayloadSpec, bytes]:
    # A non-contiguous view of the same values: encode_vector's general path.
    spaced = torch.empty(vector.numel() * 2, dtype=vector.dtype)[::2]
    spaced.copy_(vector.reshape(-1))
    spec, payload = encode_vector(spaced.reshape(vector.shape), dtype="float32", samples=5)
    return spec, bytes(payload)


@given(vectors)
def test_the_model_vector_fast_path_encodes_as_the_general_path(vector: torch.Tensor) -> None:
    spec, payload = encode_vector(vector, dtype="float32", samples=5)
    assert (spec, bytes(payload)) == _general_encoding(vector)
    assert payload.format == "B" and payload.nbytes == 4 * vector.numel()


@pytest.mark.parametrize(
    "vector",
    [
        torch.tensor(2.5),  # 0-dim
        torch.arange(6, dtype=torch.float32).reshape(2, 3),
        torch.ones(4, requires_grad=True),
        torch.ones(4, dtype=torch.float64),
        -torch.ones(3),
    ],
)
def test_other_tensors_take_the_general_path_to_the_same_bytes(vector: torch.Tensor) -> None:
    spec, payload = encode_vector(vector, dtype="float32", samples=5)
    expected = vector.detach().to(torch.float32).reshape(-1)
    assert spec == PayloadSpec(DENSE, "float32", tuple(vector.shape), 5)
    assert bytes(payload) == expected.numpy().astype("<f4").tobytes()


@pytest.mark.parametrize("dtype", sorted(WIRE_DTYPES))
@pytest.mark.parametrize("writable", [False, True])
def test_owned_decode_equals_decode_and_never_shares_the_buffer(dtype: str, writable: bool) -> None:
    vector = torch.randn(37)
    spec, payload = encode_vector(vector, dtype=dtype)
    data: bytes | bytearray = bytearray(payload) if writable else bytes(payload)
    owned = decode_vector(spec, data, owned=True)
    assert torch.equal(_bits(owned), _bits(decode_vector(spec, data)))
    assert owned.is_contiguous() and owned.dtype == torch.float32
    if isinstance(data, bytearray):
        data[:] = b"\xff" * len(data)  # a receive buffer reused for the next frame
        assert torch.equal(_bits(owned), _bits(decode_vector(spec, bytes(payload))))


@pytest.mark.parametrize(
    ("spec", "data", "error"),
    [
        (PayloadSpec(DENSE, "float32", (8,)), b"\x00" * 31, DecodeError),
        (PayloadSpec(DENSE, "float64", (1,)), b"\x00" * 4, DecodeError),
        (PayloadSpec("raw", "float32", (1,)), b"\x00" * 4, DecodeError),
        (PayloadSpec(DENSE, "float32", (2**20, 2**20)), b"", FrameTooLarge),
        (PayloadSpec(DENSE, "float32", (0,)), b"\x00" * 4, DecodeError),
    ],
)
def test_owned_decode_refuses_what_decode_refuses_with_the_same_message(
    spec: PayloadSpec, data: bytes, error: type[WireError]
) -> None:
    with pytest.raises(error) as general:
        decode_vector(spec, data)
    with pytest.raises(error) as owned:
        decode_vector(spec, bytearray(data), owned=True)
    assert str(owned.value) == str(general.value)
