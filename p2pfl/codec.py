"""Flat parameter vectors <-> payload bytes, through a registry of codecs.

Theory of operation
-------------------
A payload's ``PayloadSpec.codec`` names the codec that made it; :func:`decode_vector` looks the
name up in :data:`CODECS` and hands back a float32 tensor of ``spec.shape``. Decoding depends
only on the spec and the bytes (every parameter a sender chose travels in the payload, so
nodes configured differently still understand each other). Encoding is done by a
:class:`Codec` instance built from :class:`CodecSettings`.

Shipped codecs:

- ``dense``: the tensor's little-endian element bytes in a wire dtype (float32, float16,
  bfloat16). Encoding exposes the tensor's own memory (no copy when it is already contiguous
  in the wire dtype); decoding wraps the received buffer with ``torch.frombuffer`` (no copy for
  float32 from a writable buffer).
- ``int8``: affine 8-bit quantisation per tensor: each segment keeps its minimum (the zero
  point, a float32) and a float32 scale ``(max - min) / 255``; an element is
  ``min + q * scale`` with ``q`` one unsigned byte. A *segment* is one parameter tensor of the
  model when the sender knows its layout (the tensors' sizes are passed as ``bounds``), else
  a run of ``CodecSettings.chunk`` elements (4096), so one outlier spoils at most one
  segment's resolution. About a quarter of dense float32, plus 12 bytes per segment.
- ``topk`` (a *delta* codec): the ``k`` entries of largest magnitude of each segment, as
  strictly increasing uint32 positions and float32 values; the rest are 0.
  ``k = count`` when ``count > 0`` else ``ceil(fraction * segment size)``.
- ``fedzip`` (a *delta* codec, after FEDZIP, Malekijoo et al. 2021): top-z as ``topk``, then
  per segment (layer) one-dimensional k-means with ``clusters`` centroids (3 by default) so a
  kept value is one small cluster id, then positions as gaps (difference encoding, LEB128
  varints) and ids as bytes, the whole body compressed with the standard library's ``zlib``
  (deflate: LZ77 then Huffman coding, level 9). k-means is a fixed number of Lloyd steps from
  centroids at evenly spaced quantiles, in float64: deterministic with no random seed.

A *delta* codec encodes a difference between two models, never a model: a meaningful
sparse model does not exist, a sparse change does. Which difference, and how receivers add it
back, is :mod:`p2pfl.protocol.compression`'s business; here a delta decodes like any other
payload, to a dense float32 tensor.

Decoders treat the bytes as hostile: every declared count is checked against the payload's
length and ``Limits`` *before* anything of that size is allocated, compressed bodies are
inflated with a hard output bound, and any defect raises :class:`~p2pfl.errors.DecodeError`
or :class:`~p2pfl.errors.FrameTooLarge` (both ``WireError``). No decoder allocates more than
a small multiple of ``spec.shape``'s element count (itself bounded by ``limits.max_elements``)
plus the payload's size.

Plug-in codecs subclass :class:`Codec` and register with :func:`register_codec`; a scenario or
node then names them in ``protocol.codec``.
"""

from __future__ import annotations

import abc
import math
import struct
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final, NamedTuple, TypeVar

import numpy as np
import torch

from p2pfl.errors import DecodeError, FrameTooLarge
from p2pfl.wire import DEFAULT_LIMITS, Limits, PayloadSpec, shape_elements

DENSE: Final = "dense"
WIRE_DTYPES: Final[dict[str, torch.dtype]] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_LITTLE_ENDIAN = sys.byteorder == "little"

MAX_CLUSTERS: Final = 16
"""The most k-means centroids per segment a ``fedzip`` payload may declare."""
MAX_SEGMENTS: Final = 1 << 16
"""The most segments (tensors or chunks) an ``int8`` or ``fedzip`` payload may declare."""

Payload = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class CodecSettings:
    """What a sender chose for its payloads (``protocol.codec*`` and ``protocol.wire_dtype``).

    Attributes:
        name: a key of :data:`CODECS`.
        wire_dtype: element dtype of ``dense`` payloads (and of a delta codec's keyframes).
        fraction: ``topk``/``fedzip``: share of each segment's entries kept, in (0, 1].
        count: ``topk``/``fedzip``: entries kept per segment; 0 means use ``fraction``.
        clusters: ``fedzip``: k-means centroids per segment, 1..``MAX_CLUSTERS``.
        chunk: ``int8``: segment length when the model's tensor sizes are unknown.
    """

    name: str = DENSE
    wire_dtype: str = "float32"
    fraction: float = 0.01
    count: int = 0
    clusters: int = 3
    chunk: int = 4096


class Encoded(NamedTuple):
    """An encoded tensor: its description, its bytes, and what a receiver will decode."""

    spec: PayloadSpec
    payload: Payload
    approx: torch.Tensor | None
    """The float32 tensor :func:`decode_vector` gives for these bytes (bit for bit), when the
    codec loses information; None when decoding gives back the input (float32 ``dense``)."""


class Codec(abc.ABC):
    """One way of turning a flat float tensor into payload bytes and back."""

    name: ClassVar[str]
    lossy: ClassVar[bool] = False
    """Whether decoding may differ from the input (error feedback applies)."""
    delta: ClassVar[bool] = False
    """Whether payloads are meant to carry differences between models (sparse codecs)."""

    def __init__(self, settings: CodecSettings) -> None:
        self.settings = settings

    @abc.abstractmethod
    def encode(
        self, vector: torch.Tensor, *, samples: int = 0, bounds: Sequence[int] = ()
    ) -> Encoded:
        """Encode a 1-D float tensor.

        ``bounds`` are the sizes of the model's tensors in vector order (summing to
        ``vector.numel()``), or empty when unknown.

        Raises:
            ValueError: ``vector`` is not a floating-point tensor, or ``bounds`` does not
                add up to its size.
        """

    @classmethod
    def decode_owned(cls, spec: PayloadSpec, payload: Payload, limits: Limits) -> torch.Tensor:
        """:meth:`decode` into memory of its own (``decode_vector``'s ``owned``): a codec may
        view the payload, so this copies what it gives unless the codec knows better.

        Raises:
            DecodeError: as :meth:`decode`.
            FrameTooLarge: as :meth:`decode`.
        """
        return cls.decode(spec, payload, limits).clone()

    @staticmethod
    @abc.abstractmethod
    def decode(spec: PayloadSpec, payload: Payload, limits: Limits) -> torch.Tensor:
        """Decode a payload of this codec into a float32 tensor of ``spec.shape``.

        Raises:
            DecodeError: the bytes or the spec are malformed.
            FrameTooLarge: a declared size exceeds ``limits``.
        """


CODECS: dict[str, type[Codec]] = {}
"""The codec registry: name -> class."""

_C = TypeVar("_C", bound=type[Codec])


def register_codec(cls: _C) -> _C:
    """Class decorator: make ``cls`` available under ``cls.name``.

    Raises:
        ValueError: another class already holds that name.
    """
    existing = CODECS.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"codec {cls.name!r} is already registered by {existing.__qualname__}")
    CODECS[cls.name] = cls
    return cls


def make_codec(settings: CodecSettings) -> Codec:
    """The codec ``settings.name`` configured by ``settings``.

    Raises:
        KeyError: no codec of that name is registered.
    """
    return CODECS[settings.name](settings)


# ----------------------------------------------------------------------------- dense


def encode_vector(
    vector: torch.Tensor, *, dtype: str = "float32", samples: int = 0
) -> tuple[PayloadSpec, memoryview]:
    """Describe and expose a tensor's bytes for the wire (the ``dense`` codec).

    Raises:
        ValueError: ``dtype`` is not one of ``WIRE_DTYPES``, or ``vector`` is not floating point.
    """
    if (
        dtype == "float32"
        and vector.dtype is torch.float32
        and vector.dim() == 1
        and _LITTLE_ENDIAN
        and not vector.requires_grad
        and vector.device.type == "cpu"
        and vector.is_contiguous()
        and not vector.is_neg()
    ):
        # A model vector as every core holds one: its memory is already the payload (the
        # general path below gives the same view, through five tensor calls).
        spec = PayloadSpec(codec=DENSE, dtype=dtype, shape=(vector.shape[0],), samples=samples)
        own: Any = vector.numpy()  # (numpy's stubs do not declare the buffer protocol)
        return spec, memoryview(own).cast("B")
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"dtype {dtype!r} not in {sorted(WIRE_DTYPES)}")
    _check_float(vector)
    # reshape(-1): a 0-dim tensor cannot be viewed as bytes; the shape travels in the spec.
    wire = vector.detach().to(device="cpu", dtype=WIRE_DTYPES[dtype]).contiguous().reshape(-1)
    raw = wire.view(torch.uint8) if wire.numel() else torch.empty(0, dtype=torch.uint8)
    if not _LITTLE_ENDIAN:
        raw = _swap_bytes(wire).view(torch.uint8)
    spec = PayloadSpec(codec=DENSE, dtype=dtype, shape=tuple(vector.shape), samples=samples)
    array: Any = raw.numpy()
    return spec, memoryview(array).cast("B")


def decode_vector(
    spec: PayloadSpec, payload: Payload, limits: Limits = DEFAULT_LIMITS, *, owned: bool = False
) -> torch.Tensor:
    """Turn a verified payload into a float32 tensor of ``spec.shape``, by its codec.

    The result may share memory with ``payload`` (dense float32 from a writable buffer)
    unless ``owned`` is set: then it is a contiguous tensor of its own, as a receiver needs to
    keep it beyond the receive buffer's life. Callers that keep a result decoded without
    ``owned`` beyond the buffer's life must own the buffer.

    Raises:
        DecodeError: unknown codec or dtype, a malformed shape, or bytes the codec refuses.
        FrameTooLarge: the shape spans more than ``limits.max_elements`` (zero dimensions
            aside: see :func:`p2pfl.wire.shape_elements`), or another declared size exceeds
            ``limits``.
    """
    codec = CODECS.get(spec.codec)
    if codec is None:
        raise DecodeError(f"payload codec {spec.codec!r} is not one of {sorted(CODECS)}")
    if not owned:
        return codec.decode(spec, payload, limits)
    return codec.decode_owned(spec, payload, limits)


@register_codec
class Dense(Codec):
    """Element bytes in ``settings.wire_dtype``: exact for float32."""

    name = DENSE
    lossy = False

    def encode(
        self, vector: torch.Tensor, *, samples: int = 0, bounds: Sequence[int] = ()
    ) -> Encoded:
        dtype = self.settings.wire_dtype
        spec, payload = encode_vector(vector, dtype=dtype, samples=samples)
        approx = None
        if dtype != "float32":
            approx = vector.detach().to(WIRE_DTYPES[dtype]).to(torch.float32)
        return Encoded(spec, payload, approx)

    @staticmethod
    def decode(spec: PayloadSpec, payload: Payload, limits: Limits) -> torch.Tensor:
        torch_dtype, elements, view = Dense._opened(spec, payload, limits)
        if elements == 0:
            return torch.zeros(spec.shape, dtype=torch.float32)
        buffer: Payload = view if not view.readonly else bytearray(view)
        flat = torch.frombuffer(buffer, dtype=torch_dtype, count=elements)
        if not _LITTLE_ENDIAN:
            flat = _swap_bytes(flat)
        return flat.to(torch.float32).reshape(spec.shape)

    @classmethod
    def decode_owned(cls, spec: PayloadSpec, payload: Payload, limits: Limits) -> torch.Tensor:
        """:meth:`decode` into memory of its own, copying the payload once.

        Raises:
            DecodeError: as :meth:`decode`.
            FrameTooLarge: as :meth:`decode`.
        """
        torch_dtype, elements, view = Dense._opened(spec, payload, limits)
        if torch_dtype is not torch.float32 or not _LITTLE_ENDIAN or elements == 0:
            # A conversion (or zeros) is a new tensor already.
            return Dense.decode(spec, payload, limits)
        # The payload bytes copied once, into a bytearray that only the tensor holds (a
        # memoryview assignment into a fresh tensor's memory is ten times slower here, and a
        # clone after torch.frombuffer would copy twice).
        flat = torch.frombuffer(bytearray(view), dtype=torch.float32, count=elements)
        # (a model vector is 1-D already: reshape costs more than the copy)
        return flat if len(spec.shape) == 1 else flat.reshape(spec.shape)

    @staticmethod
    def _opened(
        spec: PayloadSpec, payload: Payload, limits: Limits
    ) -> tuple[torch.dtype, int, memoryview]:
        """The wire dtype, the checked element count and the payload's bytes.

        Raises:
            DecodeError: an unknown dtype, a malformed shape, or a byte count the shape
                and dtype do not need.
            FrameTooLarge: the shape spans more than ``limits.max_elements``.
        """
        torch_dtype = WIRE_DTYPES.get(spec.dtype)
        if torch_dtype is None:
            raise DecodeError(f"payload dtype {spec.dtype!r} not in {sorted(WIRE_DTYPES)}")
        elements = _elements(spec, limits)
        view = memoryview(payload).cast("B")
        itemsize = _ITEMSIZES[torch_dtype]
        if view.nbytes != elements * itemsize:
            raise DecodeError(
                f"payload holds {view.nbytes} bytes, shape {list(spec.shape)} of {spec.dtype} "
                f"needs {elements * itemsize}"
            )
        return torch_dtype, elements, view


_ITEMSIZES: Final = {dtype: dtype.itemsize for dtype in WIRE_DTYPES.values()}


# ------------------------------------------------------------------------------ int8

_INT8_HEAD = struct.Struct("<I")
_INT8_SEGMENT = np.dtype([("length", "<u4"), ("low", "<f4"), ("scale", "<f4")])
_INT8_LEVELS = 255


@register_codec
class Int8(Codec):
    """Affine uint8 quantisation per segment (tensor, else chunk): about 4x smaller."""

    name = "int8"
    lossy = True

    def encode(
        self, vector: torch.Tensor, *, samples: int = 0, bounds: Sequence[int] = ()
    ) -> Encoded:
        flat = _flat(vector)
        lengths = _segments(flat.numel(), bounds, self.settings.chunk)
        table = np.zeros(len(lengths), dtype=_INT8_SEGMENT)
        table["length"] = lengths
        if lengths:
            starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
            values = flat.numpy()
            table["low"] = np.minimum.reduceat(values, starts)
            high = np.maximum.reduceat(values, starts)
            # float32 arithmetic throughout, exactly as the decoder does it.
            table["scale"] = (high - table["low"]) / np.float32(_INT8_LEVELS)
        low, scale = _int8_expand(table, flat.numel())
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = np.where(scale > 0, (flat.numpy() - low) / np.where(scale > 0, scale, 1), 0)
        codes = np.nan_to_num(np.rint(ratio), nan=0.0).clip(0, _INT8_LEVELS).astype(np.uint8)
        payload = _INT8_HEAD.pack(len(lengths)) + table.tobytes() + codes.tobytes()
        spec = PayloadSpec(
            codec=self.name, dtype="uint8", shape=tuple(vector.shape), samples=samples
        )
        approx = torch.from_numpy(_int8_values(codes, low, scale)).reshape(vector.shape)
        return Encoded(spec, payload, approx)

    @staticmethod
    def decode(spec: PayloadSpec, payload: Payload, limits: Limits) -> torch.Tensor:
        elements, view = _opened(spec, payload, limits, "uint8")
        (segments,) = _unpack(_INT8_HEAD, view, 0)
        if segments > min(elements, MAX_SEGMENTS):
            raise DecodeError(f"{segments} segments for {elements} elements")
        expected = _INT8_HEAD.size + segments * _INT8_SEGMENT.itemsize + elements
        if view.nbytes != expected:
            raise DecodeError(f"int8 payload holds {view.nbytes} bytes, its header says {expected}")
        table = np.frombuffer(view, dtype=_INT8_SEGMENT, count=segments, offset=_INT8_HEAD.size)
        if np.any(table["length"] == 0) or int(table["length"].sum(dtype=np.uint64)) != elements:
            raise DecodeError(f"int8 segment lengths do not add up to {elements} elements")
        if not (np.isfinite(table["low"]).all() and np.isfinite(table["scale"]).all()):
            raise DecodeError("int8 zero point or scale is not finite")
        if np.any(table["scale"] < 0):
            raise DecodeError("int8 scale is negative")
        codes = np.frombuffer(view, dtype=np.uint8, offset=expected - elements)
        low, scale = _int8_expand(table, elements)
        return torch.from_numpy(_int8_values(codes, low, scale)).reshape(spec.shape)


def _int8_expand(table: np.ndarray, elements: int) -> tuple[np.ndarray, np.ndarray]:
    repeats = table["length"].astype(np.int64)
    low = np.repeat(table["low"].astype(np.float32), repeats)
    scale = np.repeat(table["scale"].astype(np.float32), repeats)
    return low.reshape(elements), scale.reshape(elements)


def _int8_values(codes: np.ndarray, low: np.ndarray, scale: np.ndarray) -> np.ndarray:
    values: np.ndarray = (low + codes.astype(np.float32) * scale).astype(np.float32)
    return values


# ------------------------------------------------------------------------------ topk

_COUNT = struct.Struct("<I")


@register_codec
class TopK(Codec):
    """The largest-magnitude entries of each segment, with their positions."""

    name = "topk"
    lossy = True
    delta = True

    def encode(
        self, vector: torch.Tensor, *, samples: int = 0, bounds: Sequence[int] = ()
    ) -> Encoded:
        flat = _flat(vector)
        positions = _top_positions(flat, bounds, self.settings)
        values = flat[torch.from_numpy(positions.astype(np.int64))].numpy().astype("<f4")
        payload = _COUNT.pack(len(positions)) + positions.astype("<u4").tobytes() + values.tobytes()
        spec = PayloadSpec(
            codec=self.name, dtype="float32", shape=tuple(vector.shape), samples=samples
        )
        approx = _scatter(flat.numel(), positions, values).reshape(vector.shape)
        return Encoded(spec, payload, approx)

    @staticmethod
    def decode(spec: PayloadSpec, payload: Payload, limits: Limits) -> torch.Tensor:
        elements, view = _opened(spec, payload, limits, "float32")
        (kept,) = _unpack(_COUNT, view, 0)
        if kept > elements:
            raise DecodeError(f"topk payload keeps {kept} of {elements} entries")
        if view.nbytes != _COUNT.size + 8 * kept:
            raise DecodeError(f"topk payload of {kept} entries holds {view.nbytes} bytes")
        positions = np.frombuffer(view, dtype="<u4", count=kept, offset=_COUNT.size)
        _check_positions(positions, elements)
        values = np.frombuffer(view, dtype="<f4", count=kept, offset=_COUNT.size + 4 * kept)
        return _scatter(elements, positions, values).reshape(spec.shape)


def _top_positions(
    flat: torch.Tensor, bounds: Sequence[int], settings: CodecSettings
) -> np.ndarray:
    """Sorted positions of the largest-magnitude entries of each segment."""
    found = []
    start = 0
    magnitude = flat.abs().nan_to_num(nan=math.inf)  # a NaN is sent, not hidden
    for length in _segments(flat.numel(), bounds, flat.numel() or 1):
        keep = _kept(length, settings)
        segment = magnitude[start : start + length]
        chosen = torch.topk(segment, keep, sorted=False).indices if keep < length else None
        local = np.arange(length) if chosen is None else np.sort(chosen.numpy())
        found.append(local + start)
        start += length
    return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)


def _kept(length: int, settings: CodecSettings) -> int:
    if settings.count > 0:
        return min(length, settings.count)
    return min(length, max(1, math.ceil(settings.fraction * length)))


def _check_positions(positions: np.ndarray, elements: int) -> None:
    if positions.size and (
        int(positions[-1]) >= elements or bool(np.any(positions[1:] <= positions[:-1]))
    ):
        raise DecodeError("sparse positions are not strictly increasing and below the size")


def _scatter(elements: int, positions: np.ndarray, values: np.ndarray) -> torch.Tensor:
    out = np.zeros(elements, dtype=np.float32)
    out[positions.astype(np.int64)] = values
    return torch.from_numpy(out)


# ---------------------------------------------------------------------------- fedzip

_FEDZIP_HEAD = struct.Struct("<I")  # length of the inflated body
_LAYER = struct.Struct("<IIB")  # segment size, entries kept, centroids
_KMEANS_STEPS = 8
_VARINT_BYTES = 5  # a uint32 needs at most 5 LEB128 bytes


@register_codec
class FedZip(Codec):
    """FEDZIP: top-z, k-means per layer, then difference and deflate (Huffman) coding."""

    name = "fedzip"
    lossy = True
    delta = True

    def encode(
        self, vector: torch.Tensor, *, samples: int = 0, bounds: Sequence[int] = ()
    ) -> Encoded:
        flat = _flat(vector)
        settings = self.settings
        lengths = _segments(flat.numel(), bounds, flat.numel() or 1)
        positions = _top_positions(flat, lengths, settings)
        values = flat.numpy()[positions.astype(np.int64)].astype(np.float64)
        head = [struct.pack("<I", len(lengths))]
        gaps, ids, decoded = [], [], []
        start = cursor = 0
        for length in lengths:
            kept = _kept(length, settings)
            local = positions[cursor : cursor + kept]
            centroids, labels = _kmeans(values[cursor : cursor + kept], settings.clusters)
            head.append(_LAYER.pack(length, kept, len(centroids)))
            head.append(centroids.astype("<f4").tobytes())
            gaps.append(np.diff(local, prepend=start - 1))
            ids.append(labels.astype(np.uint8))
            decoded.append(centroids.astype(np.float32)[labels])
            start += length
            cursor += kept
        gap_all = np.concatenate(gaps) if gaps else np.zeros(0, dtype=np.int64)
        body = b"".join(head) + _varints(gap_all) + b"".join(ids_.tobytes() for ids_ in ids)
        payload = _FEDZIP_HEAD.pack(len(body)) + zlib.compress(body, 9)
        spec = PayloadSpec(
            codec=self.name, dtype="float32", shape=tuple(vector.shape), samples=samples
        )
        kept_values = np.concatenate(decoded) if decoded else np.zeros(0, dtype=np.float32)
        approx = _scatter(flat.numel(), positions, kept_values).reshape(vector.shape)
        return Encoded(spec, payload, approx)

    @staticmethod
    def decode(spec: PayloadSpec, payload: Payload, limits: Limits) -> torch.Tensor:
        elements, view = _opened(spec, payload, limits, "float32")
        (size,) = _unpack(_FEDZIP_HEAD, view, 0)
        layers = min(elements, MAX_SEGMENTS)
        bound = 4 + layers * (_LAYER.size + 4 * MAX_CLUSTERS) + elements * (_VARINT_BYTES + 1)
        if size > min(bound, limits.max_frame_bytes):
            raise FrameTooLarge(
                f"fedzip body of {size} bytes exceeds {min(bound, limits.max_frame_bytes)}"
            )
        inflater = zlib.decompressobj()
        try:
            # max_length bounds the output whatever the stream claims (no zip bomb).
            body = inflater.decompress(view[_FEDZIP_HEAD.size :], size)
        except zlib.error as exc:
            raise DecodeError(f"fedzip body does not inflate: {exc}") from exc
        if (
            len(body) != size
            or not inflater.eof
            or inflater.unconsumed_tail
            or inflater.unused_data
        ):
            raise DecodeError(f"fedzip body is not one deflate stream of {size} bytes")
        return _fedzip_parse(memoryview(body), elements).reshape(spec.shape)


def _fedzip_parse(body: memoryview, elements: int) -> torch.Tensor:
    (layers,) = _unpack(_COUNT, body, 0)
    if layers > min(elements, MAX_SEGMENTS):
        raise DecodeError(f"{layers} fedzip layers for {elements} elements")
    offset = _COUNT.size
    sizes, kepts, tables = [], [], []
    for _ in range(layers):
        length, kept, clusters = _unpack(_LAYER, body, offset)
        offset += _LAYER.size
        if length == 0 or kept > length or clusters > MAX_CLUSTERS or (kept and not clusters):
            raise DecodeError(
                f"fedzip layer of {length} entries keeps {kept} in {clusters} clusters"
            )
        if offset + 4 * clusters > body.nbytes:
            raise DecodeError("fedzip layer table runs past the body")
        centroids = np.frombuffer(body, dtype="<f4", count=clusters, offset=offset)
        offset += 4 * clusters
        sizes.append(length)
        kepts.append(kept)
        tables.append(centroids)
    if sum(sizes) != elements:
        raise DecodeError(f"fedzip layer sizes do not add up to {elements} elements")
    total = sum(kepts)
    gaps, offset = _read_varints(body, offset, total)
    if body.nbytes - offset != total:
        raise DecodeError(f"fedzip body holds {body.nbytes - offset} cluster ids, needs {total}")
    ids = np.frombuffer(body, dtype=np.uint8, count=total, offset=offset)
    positions = np.empty(total, dtype=np.int64)
    values = np.empty(total, dtype=np.float32)
    start = cursor = 0
    for length, kept, centroids in zip(sizes, kepts, tables, strict=True):
        local = np.cumsum(gaps[cursor : cursor + kept]) - 1
        if kept and (local[-1] >= length or np.any(gaps[cursor : cursor + kept] == 0)):
            raise DecodeError("fedzip positions are not strictly increasing within their layer")
        if kept:
            labels = ids[cursor : cursor + kept]
            if int(labels.max()) >= centroids.size:
                raise DecodeError("fedzip cluster id beyond the layer's centroids")
            positions[cursor : cursor + kept] = local + start
            values[cursor : cursor + kept] = centroids[labels]
        start += length
        cursor += kept
    return _scatter(elements, positions, values)


def _kmeans(values: np.ndarray, clusters: int) -> tuple[np.ndarray, np.ndarray]:
    """1-D k-means: centroids and each value's label; deterministic (quantile start)."""
    if values.size == 0:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    finite = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    count = min(clusters, values.size)
    centroids = np.quantile(finite, (np.arange(count) + 0.5) / count)
    labels = np.zeros(values.size, dtype=np.int64)
    for _ in range(_KMEANS_STEPS):
        labels = np.abs(finite[:, None] - centroids[None, :]).argmin(axis=1)
        sums = np.bincount(labels, weights=finite, minlength=count)
        counts = np.bincount(labels, minlength=count)
        centroids = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
    # Labels against the centroids as sent (float32), so encoder and decoder agree.
    sent = centroids.astype(np.float32).astype(np.float64)
    labels = np.abs(finite[:, None] - sent[None, :]).argmin(axis=1)
    return sent, labels


def _varints(values: np.ndarray) -> bytes:
    """LEB128 encoding of non-negative integers below 2**32."""
    numbers = values.astype(np.uint64)
    sizes = np.ones(numbers.size, dtype=np.int64)
    for byte in range(1, _VARINT_BYTES):
        sizes += (numbers >> np.uint64(7 * byte)) > 0
    out = np.empty(int(sizes.sum()), dtype=np.uint8)
    starts = np.cumsum(sizes) - sizes
    for byte in range(_VARINT_BYTES):
        chosen = sizes > byte
        low = (numbers[chosen] >> np.uint64(7 * byte)) & np.uint64(0x7F)
        more = (sizes[chosen] > byte + 1).astype(np.uint64) << np.uint64(7)
        out[starts[chosen] + byte] = (low | more).astype(np.uint8)
    return out.tobytes()


def _read_varints(body: memoryview, offset: int, count: int) -> tuple[np.ndarray, int]:
    """``count`` LEB128 integers from ``body[offset:]`` and the offset after them.

    Raises:
        DecodeError: fewer than ``count`` terminated varints, or one longer than 5 bytes.
    """
    if count == 0:
        return np.zeros(0, dtype=np.int64), offset
    # At most 5 bytes each: never look further (bounds the work by the declared count).
    window = np.frombuffer(body, dtype=np.uint8, offset=offset)[: count * _VARINT_BYTES]
    ends = np.flatnonzero(window < 0x80)
    if ends.size < count:
        raise DecodeError(f"fedzip body holds fewer than {count} positions")
    stop = int(ends[count - 1]) + 1
    data = window[:stop].astype(np.uint64)
    group_starts = np.concatenate(([0], ends[: count - 1] + 1))
    lengths = ends[:count] + 1 - group_starts
    if np.any(lengths > _VARINT_BYTES):
        raise DecodeError("fedzip position gap longer than 5 bytes")
    shifts = (np.arange(stop) - np.repeat(group_starts, lengths)).astype(np.uint64) * np.uint64(7)
    numbers = np.add.reduceat((data & np.uint64(0x7F)) << shifts, group_starts)
    if np.any(numbers >= 1 << 32):
        raise DecodeError("fedzip position gap beyond 32 bits")
    return numbers.astype(np.int64), offset + stop


# --------------------------------------------------------------------------- helpers


def _check_float(vector: torch.Tensor) -> None:
    if not vector.is_floating_point():
        raise ValueError(f"cannot encode a {vector.dtype} tensor as model parameters")


def _flat(vector: torch.Tensor) -> torch.Tensor:
    _check_float(vector)
    return vector.detach().to(device="cpu", dtype=torch.float32).contiguous().reshape(-1)


def _segments(elements: int, bounds: Sequence[int], chunk: int) -> list[int]:
    """Segment lengths (all > 0) covering ``elements``: the non-empty ``bounds``, else chunks.

    Raises:
        ValueError: ``bounds`` is given and does not add up to ``elements``.
    """
    if bounds:
        if sum(bounds) != elements:
            raise ValueError(f"tensor sizes add up to {sum(bounds)}, the vector has {elements}")
        lengths = [int(length) for length in bounds if length > 0]
    else:
        lengths = [min(chunk, elements - start) for start in range(0, elements, chunk)]
    if len(lengths) > MAX_SEGMENTS:  # a model of very many tiny tensors: merge neighbours
        per = math.ceil(len(lengths) / MAX_SEGMENTS)
        lengths = [sum(lengths[i : i + per]) for i in range(0, len(lengths), per)]
    return lengths


def _elements(spec: PayloadSpec, limits: Limits) -> int:
    if len(spec.shape) > limits.max_shape_dims:
        raise DecodeError(f"shape has {len(spec.shape)} dims, limit {limits.max_shape_dims}")
    return shape_elements(tuple(spec.shape), limits.max_elements)


def _opened(
    spec: PayloadSpec, payload: Payload, limits: Limits, dtype: str
) -> tuple[int, memoryview]:
    """The checked element count of ``spec`` and the payload as bytes.

    Raises:
        DecodeError: ``spec.dtype`` is not ``dtype``, or the shape is malformed.
        FrameTooLarge: the shape spans more than ``limits.max_elements``.
    """
    if spec.dtype != dtype:
        raise DecodeError(f"{spec.codec} payload dtype {spec.dtype!r}, expected {dtype!r}")
    return _elements(spec, limits), memoryview(payload).cast("B")


def _unpack(layout: struct.Struct, view: memoryview, offset: int) -> tuple[int, ...]:
    if view.nbytes < offset + layout.size:
        raise DecodeError(f"payload of {view.nbytes} bytes too short for its header")
    values: tuple[int, ...] = layout.unpack_from(view, offset)
    return values


def _swap_bytes(tensor: torch.Tensor) -> torch.Tensor:
    size = tensor.element_size()
    return tensor.view(torch.uint8).reshape(-1, size).flip(1).contiguous().view(tensor.dtype)
