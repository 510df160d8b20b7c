"""The lossy codecs (int8, topk, fedzip): what they keep, and that hostile bytes only ever give
a tensor or a wire error, with allocations bounded by the declared, checked sizes."""

from __future__ import annotations

import math
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfl.codec import CODECS, MAX_CLUSTERS, CodecSettings, decode_vector, make_codec
from p2pfl.errors import DecodeError, FrameTooLarge, WireError
from p2pfl.wire import Limits, PayloadSpec

LOSSY = ("int8", "topk", "fedzip")
SMALL = Limits(max_elements=4096, max_frame_bytes=1 << 20)

finite = st.floats(-1e6, 1e6, width=32, allow_nan=False, allow_subnormal=False)


@st.composite
def vectors_with_bounds(draw: st.DrawFn) -> tuple[torch.Tensor, tuple[int, ...]]:
    sizes = draw(st.lists(st.integers(0, 60), min_size=0, max_size=5))
    values = draw(st.lists(finite, min_size=sum(sizes), max_size=sum(sizes)))
    vector = torch.tensor(values, dtype=torch.float32)
    return vector, tuple(sizes) if draw(st.booleans()) else ()


def _segments(vector: torch.Tensor, bounds: tuple[int, ...], chunk: int) -> list[torch.Tensor]:
    if bounds:
        return [part for part in torch.split(vector, list(bounds)) if part.numel()]
    return list(torch.split(vector, chunk)) if vector.numel() else []


# --------------------------------------------------------------------- what each keeps


@pytest.mark.parametrize("name", LOSSY)
@given(case=vectors_with_bounds(), fraction=st.floats(0.01, 1.0))
def test_approx_is_exactly_what_the_receiver_decodes(
    name: str, case: tuple[torch.Tensor, tuple[int, ...]], fraction: float
) -> None:
    # Error feedback relies on it: the sender's residual is computed from `approx`.
    vector, bounds = case
    encoded = make_codec(CodecSettings(name=name, fraction=fraction, chunk=7)).encode(
        vector, samples=5, bounds=bounds
    )
    assert encoded.spec.codec == name and encoded.spec.samples == 5
    decoded = decode_vector(encoded.spec, bytes(encoded.payload))
    assert encoded.approx is not None
    assert decoded.shape == vector.shape
    assert torch.equal(decoded, encoded.approx)


@given(case=vectors_with_bounds())
def test_int8_error_is_half_a_step_of_its_segment(
    case: tuple[torch.Tensor, tuple[int, ...]],
) -> None:
    vector, bounds = case
    encoded = make_codec(CodecSettings(name="int8", chunk=7)).encode(vector, bounds=bounds)
    decoded = decode_vector(encoded.spec, bytes(encoded.payload))
    for original, got in zip(
        _segments(vector, bounds, 7), _segments(decoded, bounds, 7), strict=True
    ):
        step = (original.max() - original.min()).item() / 255
        tolerance = step / 2 + 1e-6 * (1 + original.abs().max().item())
        assert (original - got).abs().max().item() <= tolerance


def test_int8_is_a_quarter_of_dense_plus_a_header_per_tensor() -> None:
    vector = torch.randn(10_000)
    encoded = make_codec(CodecSettings(name="int8")).encode(vector, bounds=(6000, 4000))
    assert len(bytes(encoded.payload)) == 4 + 2 * 12 + 10_000
    # One tensor of huge values does not cost the small tensor its resolution.
    vector[:6000] *= 1000
    encoded = make_codec(CodecSettings(name="int8")).encode(vector, bounds=(6000, 4000))
    small = encoded.approx
    assert small is not None
    assert (small[6000:] - vector[6000:]).abs().max() < 0.05


@given(case=vectors_with_bounds(), count=st.integers(1, 10))
def test_topk_keeps_the_largest_entries_of_each_tensor(
    case: tuple[torch.Tensor, tuple[int, ...]], count: int
) -> None:
    vector, bounds = case
    encoded = make_codec(CodecSettings(name="topk", count=count)).encode(vector, bounds=bounds)
    decoded = decode_vector(encoded.spec, bytes(encoded.payload))
    parts = _segments(vector, bounds, max(1, vector.numel()))
    got_parts = _segments(decoded, bounds, max(1, vector.numel()))
    for original, got in zip(parts, got_parts, strict=True):
        kept = got != 0
        assert int(kept.sum()) <= min(count, original.numel())
        assert torch.equal(got[kept], original[kept])
        dropped = original[~kept].abs()
        if kept.any() and dropped.numel():
            # Nothing dropped is larger than anything kept (ties may go either way).
            assert dropped.max() <= original[kept].abs().min() or int(kept.sum()) < count


def test_topk_by_fraction_rounds_up_and_keeps_one_per_tensor() -> None:
    encoded = make_codec(CodecSettings(name="topk", fraction=0.01)).encode(
        torch.arange(1.0, 351.0), bounds=(300, 50)
    )
    (kept,) = struct.unpack_from("<I", bytes(encoded.payload))
    assert kept == 3 + 1


@given(case=vectors_with_bounds(), clusters=st.integers(1, MAX_CLUSTERS))
def test_fedzip_keeps_topk_positions_with_few_values_per_tensor(
    case: tuple[torch.Tensor, tuple[int, ...]], clusters: int
) -> None:
    vector, bounds = case
    setting = CodecSettings(name="fedzip", fraction=0.3, clusters=clusters)
    decoded = decode_vector(*_spec_and_bytes(make_codec(setting).encode(vector, bounds=bounds)))
    sparse = decode_vector(
        *_spec_and_bytes(
            make_codec(CodecSettings(name="topk", fraction=0.3)).encode(vector, bounds=bounds)
        )
    )
    whole = max(1, vector.numel())
    for got, top in zip(
        _segments(decoded, bounds, whole), _segments(sparse, bounds, whole), strict=True
    ):
        assert len(set(got[top != 0].tolist())) <= clusters
        assert not bool(((got != 0) & (top == 0)).any())


def test_fedzip_is_far_smaller_than_topk_on_an_update() -> None:
    generator = torch.Generator().manual_seed(3)
    update = torch.randn(100_000, generator=generator) * 0.01
    sizes = {
        name: len(
            bytes(
                make_codec(CodecSettings(name=name, fraction=0.01))
                .encode(update, bounds=(80_000, 20_000))
                .payload
            )
        )
        for name in ("topk", "fedzip")
    }
    assert sizes["topk"] == 4 + 8 * 1000
    # 1,000 positions as ~1-byte gaps and 2-bit ids, deflated: well under half of topk's.
    assert sizes["fedzip"] < sizes["topk"] / 3, sizes


def _spec_and_bytes(encoded: object) -> tuple[PayloadSpec, bytes]:
    spec, payload, _ = encoded  # type: ignore[misc]
    return spec, bytes(payload)


# -------------------------------------------------------------- hostile bytes: property

shapes = st.lists(st.integers(0, 70), min_size=0, max_size=3).map(tuple)


def _peak_allowed(payload: bytes, spec: PayloadSpec) -> int:
    elements = math.prod(spec.shape) if spec.shape else 1
    # A few element-sized arrays plus a few copies of the payload, plus fixed overhead.
    return 64 * elements + 16 * len(payload) + 256 * 1024


@pytest.mark.parametrize("name", sorted(CODECS))
@settings(max_examples=150)
@given(shape=shapes, payload=st.binary(max_size=600), dtype=st.sampled_from(["float32", "uint8"]))
def test_arbitrary_bytes_give_a_tensor_or_a_wire_error(
    name: str, shape: tuple[int, ...], payload: bytes, dtype: str
) -> None:
    _decode_hostile(PayloadSpec(name, dtype, shape), payload)


@pytest.mark.parametrize("name", LOSSY)
@settings(max_examples=150)
@given(
    case=vectors_with_bounds(),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
    cut=st.integers(0, 40),
)
def test_mutated_valid_payloads_give_a_tensor_or_a_wire_error(
    name: str,
    case: tuple[torch.Tensor, tuple[int, ...]],
    edits: list[tuple[int, int]],
    cut: int,
) -> None:
    # Random bytes rarely get past the first header check; mutating real payloads reaches
    # the deeper ones (segment tables, positions, inflated bodies).
    vector, bounds = case
    encoded = make_codec(CodecSettings(name=name, fraction=0.2, chunk=9)).encode(
        vector, bounds=bounds
    )
    data = bytearray(bytes(encoded.payload))
    for position, value in edits:
        if data:
            data[position % len(data)] = value
    if name == "fedzip" and len(data) > 4 and edits:
        # Mutate inside the deflated body too, re-deflated so that the parse itself is hit.
        size = struct.unpack_from("<I", data)[0]
        try:
            body = bytearray(zlib.decompress(bytes(data[4:])))
        except zlib.error:
            body = bytearray()
        if body and size == len(body):
            position, value = edits[0]
            body[position % len(body)] = value
            data = bytearray(struct.pack("<I", len(body)) + zlib.compress(bytes(body)))
    if cut:
        data = data[: max(0, len(data) - cut)] if cut % 2 else data + bytes(cut)
    _decode_hostile(encoded.spec, bytes(data))


def _decode_hostile(spec: PayloadSpec, payload: bytes) -> None:
    tracemalloc.start()
    try:
        decoded = decode_vector(spec, payload, SMALL)
    except WireError:
        return
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak <= _peak_allowed(payload, spec)
    assert decoded.dtype == torch.float32
    assert tuple(decoded.shape) == tuple(spec.shape)


# -------------------------------------------------------- declared sizes, before allocation


@pytest.mark.parametrize("name", sorted(CODECS))
def test_a_huge_declared_shape_is_refused_before_allocation(name: str) -> None:
    for dtype in ("float32", "uint8"):
        with pytest.raises(WireError):
            decode_vector(PayloadSpec(name, dtype, (2**20, 2**20)), b"\x00" * 16)


def test_int8_segment_count_beyond_the_payload_is_refused() -> None:
    spec = PayloadSpec("int8", "uint8", (100,))
    with pytest.raises(DecodeError, match="segments"):
        decode_vector(spec, struct.pack("<I", 2**31) + bytes(100))
    with pytest.raises(DecodeError, match="holds"):
        decode_vector(spec, struct.pack("<I", 50) + bytes(100))


def test_int8_lengths_must_cover_the_shape_and_scales_be_finite() -> None:
    spec = PayloadSpec("int8", "uint8", (4,))
    table = struct.pack("<Iff", 3, 0.0, 1.0)
    with pytest.raises(DecodeError, match="add up"):
        decode_vector(spec, struct.pack("<I", 1) + table + bytes(4))
    nan = struct.pack("<Iff", 4, float("nan"), 1.0)
    with pytest.raises(DecodeError, match="finite"):
        decode_vector(spec, struct.pack("<I", 1) + nan + bytes(4))


def test_topk_positions_must_be_strictly_increasing_and_in_range() -> None:
    spec = PayloadSpec("topk", "float32", (10,))

    def payload(positions: list[int]) -> bytes:
        count = len(positions)
        return struct.pack(f"<I{count}I{count}f", count, *positions, *([1.0] * count))

    assert decode_vector(spec, payload([1, 4, 9])).nonzero().flatten().tolist() == [1, 4, 9]
    for bad in ([4, 1], [3, 3], [1, 10], [2**32 - 1]):
        with pytest.raises(DecodeError, match="strictly increasing"):
            decode_vector(spec, payload(bad))
    with pytest.raises(DecodeError, match="keeps"):
        decode_vector(spec, struct.pack("<I", 11) + bytes(88))


def test_fedzip_body_size_is_bounded_before_inflating() -> None:
    spec = PayloadSpec("fedzip", "float32", (100,))
    with pytest.raises(FrameTooLarge):
        decode_vector(spec, struct.pack("<I", 2**31) + zlib.compress(b""))


def test_fedzip_stream_longer_than_declared_is_refused_without_inflating_it() -> None:
    # A deflate bomb: 64 MiB of zeros compress to ~64 KiB; the body claims 100 bytes.
    bomb = zlib.compress(bytes(64 << 20), 9)
    spec = PayloadSpec("fedzip", "float32", (100,))
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError, match="deflate stream"):
            decode_vector(spec, struct.pack("<I", 100) + bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * len(bomb) + (1 << 20)


def test_fedzip_cluster_ids_and_gaps_are_checked() -> None:
    spec = PayloadSpec("fedzip", "float32", (8,))

    def payload(gaps: bytes, ids: bytes, clusters: int = 2, kept: int = 2) -> bytes:
        body = struct.pack("<IIIB", 1, 8, kept, clusters)
        body += np.array([-1.0, 1.0][:clusters], dtype="<f4").tobytes() + gaps + ids
        return struct.pack("<I", len(body)) + zlib.compress(body)

    good = decode_vector(spec, payload(b"\x02\x03", b"\x00\x01"))
    assert good.tolist() == [0, -1, 0, 0, 1, 0, 0, 0]
    with pytest.raises(DecodeError, match="cluster id"):
        decode_vector(spec, payload(b"\x02\x03", b"\x00\x02"))
    with pytest.raises(DecodeError, match="strictly increasing"):
        decode_vector(spec, payload(b"\x02\x00", b"\x00\x01"))
    with pytest.raises(DecodeError, match="strictly increasing"):
        decode_vector(spec, payload(b"\x02\x07", b"\x00\x01"))
    with pytest.raises(DecodeError, match="5 bytes"):
        decode_vector(spec, payload(b"\x82\x80\x80\x80\x80\x00\x01", b"\x00\x01", kept=2))
    with pytest.raises(DecodeError, match="clusters"):
        decode_vector(spec, payload(b"\x02\x03", b"\x00\x01", clusters=0))
