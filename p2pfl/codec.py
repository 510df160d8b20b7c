"""Flat parameter vectors <-> payload bytes.

Dense payloads are the tensor's little-endian element bytes in a named dtype. Encoding
exposes the tensor's own memory (no copy when it is already contiguous in the wire dtype);
decoding wraps the received buffer with ``torch.frombuffer`` (no copy for float32 from a
writable buffer) and always hands the caller float32, the dtype merge rules work in.
"""

from __future__ import annotations

import sys
from typing import Any, Final

import torch

from p2pfl.errors import DecodeError
from p2pfl.wire import DEFAULT_LIMITS, Limits, PayloadSpec, shape_elements

DENSE: Final = "dense"
WIRE_DTYPES: Final[dict[str, torch.dtype]] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_LITTLE_ENDIAN = sys.byteorder == "little"


def encode_vector(
    vector: torch.Tensor, *, dtype: str = "float32", samples: int = 0
) -> tuple[PayloadSpec, memoryview]:
    """Describe and expose a tensor's bytes for the wire.

    Raises:
        ValueError: ``dtype`` is not one of ``WIRE_DTYPES``, or ``vector`` is not floating point.
    """
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"dtype {dtype!r} not in {sorted(WIRE_DTYPES)}")
    if not vector.is_floating_point():
        raise ValueError(f"cannot encode a {vector.dtype} tensor as model parameters")
    # reshape(-1): a 0-dim tensor cannot be viewed as bytes; the shape travels in the spec.
    wire = vector.detach().to(device="cpu", dtype=WIRE_DTYPES[dtype]).contiguous().reshape(-1)
    raw = wire.view(torch.uint8) if wire.numel() else torch.empty(0, dtype=torch.uint8)
    if not _LITTLE_ENDIAN:
        raw = _swap_bytes(wire).view(torch.uint8)
    spec = PayloadSpec(codec=DENSE, dtype=dtype, shape=tuple(vector.shape), samples=samples)
    array: Any = raw.numpy()
    return spec, memoryview(array).cast("B")


def decode_vector(
    spec: PayloadSpec,
    payload: bytes | bytearray | memoryview,
    limits: Limits = DEFAULT_LIMITS,
) -> torch.Tensor:
    """Turn a verified payload into a float32 tensor of ``spec.shape``.

    The result may share memory with ``payload`` (float32 from a writable buffer); callers
    that keep it beyond the buffer's life must own the buffer.

    Raises:
        DecodeError: unknown codec or dtype, a malformed shape, or a byte count that does
            not match the shape.
        FrameTooLarge: the shape spans more than ``limits.max_elements`` (zero dimensions
            aside: see :func:`p2pfl.wire.shape_elements`).
    """
    if spec.codec != DENSE:
        raise DecodeError(f"payload codec {spec.codec!r} is not supported (known: {DENSE!r})")
    torch_dtype = WIRE_DTYPES.get(spec.dtype)
    if torch_dtype is None:
        raise DecodeError(f"payload dtype {spec.dtype!r} not in {sorted(WIRE_DTYPES)}")
    if len(spec.shape) > limits.max_shape_dims:
        raise DecodeError(f"shape has {len(spec.shape)} dims, limit {limits.max_shape_dims}")
    elements = shape_elements(tuple(spec.shape), limits.max_elements)
    view = memoryview(payload).cast("B")
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    if view.nbytes != elements * itemsize:
        raise DecodeError(
            f"payload holds {view.nbytes} bytes, shape {list(spec.shape)} of {spec.dtype} needs "
            f"{elements * itemsize}"
        )
    if elements == 0:
        return torch.zeros(spec.shape, dtype=torch.float32)
    buffer: bytes | bytearray | memoryview = view if not view.readonly else bytearray(view)
    flat = torch.frombuffer(buffer, dtype=torch_dtype, count=elements)
    if not _LITTLE_ENDIAN:
        flat = _swap_bytes(flat)
    return flat.to(torch.float32).reshape(spec.shape)


def _swap_bytes(tensor: torch.Tensor) -> torch.Tensor:
    size = tensor.element_size()
    return tensor.view(torch.uint8).reshape(-1, size).flip(1).contiguous().view(tensor.dtype)
