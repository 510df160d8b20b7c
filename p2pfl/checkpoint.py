"""Model checkpoints: a small self-describing file, no pickle.

Layout::

    MAGIC (8 bytes) | u32 big-endian header length | msgpack header | raw float32 data | trailer

The trailer is the SHA-256 of every byte before it, so a flipped bit anywhere, header
included (a wrong ``round`` would silently resume the wrong round), is detected.

The header is a msgpack map::

    {"format": 1, "round": int, "dtype": "float32", "shape": [int, ...],
     "sha256": 32 bytes (digest of the data), "node": "<64 hex>", "info": {str: scalar}}

``round`` is the next round the node will run and the data the model it runs it on (the
``SaveCheckpoint`` action's meaning). Data are little-endian float32, whatever the host.

Writes are atomic (temporary file in the same directory, fsync, rename, fsync of the
directory) with mode 0600, so a crash leaves either the old or the new checkpoint (and
perhaps a temporary file, which :func:`prepare_checkpoint_dir` removes at the next start). Reads
check the magic, bound the header before reading it, check that the file holds exactly
the bytes the shape needs before allocating them, and check both digests; any defect raises
:class:`~p2pfl.errors.DecodeError` naming the file. A well-formed checkpoint that does not
fit the model or the node raises :class:`~p2pfl.errors.ConfigError`.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import torch

from p2pfl.errors import ConfigError, DecodeError, WireError
from p2pfl.identity import write_private_file
from p2pfl.wire import shape_elements

MAGIC = b"P2PFLCK\x01"
FORMAT_VERSION = 1
HEADER_LENGTH = struct.Struct(">I")
MAX_HEADER_BYTES = 64 * 1024
MAX_ELEMENTS = 1 << 30
CHECKPOINT_FILE = "model.ckpt"
DTYPE = "float32"
TRAILER_BYTES = 32
_HEADER_KEYS = frozenset({"format", "round", "dtype", "shape", "sha256", "node", "info"})
_MAX_DIMS = 8


@dataclass(frozen=True, slots=True)
class CheckpointHeader:
    """What a checkpoint says about its data."""

    round: int
    shape: tuple[int, ...]
    sha256: bytes
    node: str
    info: Mapping[str, Any] = field(default_factory=dict)
    dtype: str = DTYPE
    format: int = FORMAT_VERSION

    @property
    def elements(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A loaded checkpoint: its header and the model vector (a new float32 tensor)."""

    header: CheckpointHeader
    vector: torch.Tensor

    @property
    def round(self) -> int:
        return self.header.round


def checkpoint_path(directory: str | os.PathLike[str]) -> Path:
    """Where a node keeps its checkpoint inside its ``checkpoint_dir``."""
    return Path(directory) / CHECKPOINT_FILE


def prepare_checkpoint_dir(directory: str | os.PathLike[str]) -> list[Path]:
    """Make ``directory`` ready before the first round: create it, remove the temporary files
    of a save that was interrupted (a crash between writing and renaming), and prove that a
    checkpoint can be written there by creating and removing one such temporary file.

    Returns:
        The leftover temporary files removed.

    Raises:
        OSError: the directory cannot be created, or written to.
    """
    target = checkpoint_path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}."  # write_private_file's temporary names
    removed = []
    for leftover in sorted(target.parent.glob(f"{prefix}*")):
        if leftover.is_file():
            leftover.unlink(missing_ok=True)
            removed.append(leftover)
    fd, probe = tempfile.mkstemp(prefix=prefix, dir=target.parent)
    os.close(fd)
    Path(probe).unlink()
    return removed


def vector_digest(vector: torch.Tensor) -> str:
    """Hex SHA-256 of a vector's little-endian float32 bytes, as a checkpoint records it."""
    return hashlib.sha256(_data_bytes(vector)).hexdigest()


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    round: int,
    vector: torch.Tensor,
    node: str,
    info: Mapping[str, Any] | None = None,
) -> CheckpointHeader:
    """Write ``vector`` as the model for ``round``, atomically, with mode 0600.

    Args:
        path: the checkpoint file; its directory is created if needed.
        round: the next round to run on ``vector`` (>= 0).
        vector: the model parameters; any floating-point tensor, stored as float32.
        node: the owner's node id in hex.
        info: extra scalars worth keeping (time saved, loss, ...).

    Raises:
        ValueError: ``round`` is negative or ``vector`` is not floating point.
        OSError: the file cannot be written.
    """
    if round < 0:
        raise ValueError(f"round {round} is negative")
    if not vector.is_floating_point():
        raise ValueError(f"cannot checkpoint a {vector.dtype} tensor")
    data = _data_bytes(vector)
    header = CheckpointHeader(
        round=int(round),
        shape=tuple(int(d) for d in vector.shape),
        sha256=hashlib.sha256(data).digest(),
        node=node,
        info=dict(info or {}),
    )
    encoded = msgpack.packb(
        {
            "format": header.format,
            "round": header.round,
            "dtype": header.dtype,
            "shape": list(header.shape),
            "sha256": header.sha256,
            "node": header.node,
            "info": dict(header.info),
        },
        use_bin_type=True,
    )
    body = MAGIC + HEADER_LENGTH.pack(len(encoded)) + encoded + data
    write_private_file(Path(path), body + hashlib.sha256(body).digest())
    return header


def read_header(path: str | os.PathLike[str]) -> tuple[CheckpointHeader, int]:
    """Read and check a checkpoint's header without reading its data (nor verifying digests).

    Returns:
        The header and the file offset where the data start.

    Raises:
        DecodeError: the file is not a checkpoint, or its header or size is wrong.
        OSError: the file cannot be read.
    """
    source = Path(path)
    with source.open("rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        start = handle.read(len(MAGIC) + HEADER_LENGTH.size)
        if len(start) < len(MAGIC) + HEADER_LENGTH.size or start[: len(MAGIC)] != MAGIC:
            raise DecodeError(f"{source} is not a p2pfl checkpoint (bad magic)")
        (header_len,) = HEADER_LENGTH.unpack(start[len(MAGIC) :])
        if header_len > MAX_HEADER_BYTES:
            raise DecodeError(f"{source}: header of {header_len} bytes exceeds {MAX_HEADER_BYTES}")
        raw = handle.read(header_len)
    if len(raw) != header_len:
        raise DecodeError(f"{source} is truncated inside its header")
    header = _parse_header(source, raw)
    offset = len(MAGIC) + HEADER_LENGTH.size + header_len
    expected = offset + 4 * header.elements + TRAILER_BYTES
    if size != expected:
        raise DecodeError(
            f"{source} holds {size} bytes; its header describes {expected} (truncated or padded)"
        )
    return header, offset


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    expected_shape: tuple[int, ...] | None = None,
    expected_node: str | None = None,
) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`, verify it, and check it fits.

    Raises:
        DecodeError: the file is corrupt (magic, header, size or either digest).
        ConfigError: the checkpoint is intact but for another model shape or node.
        OSError: the file cannot be read.
    """
    source = Path(path)
    header, offset = read_header(source)
    with source.open("rb") as handle:
        prefix = handle.read(offset)
        data = bytearray(4 * header.elements)
        trailer = bytearray(TRAILER_BYTES)
        if handle.readinto(data) != len(data) or handle.readinto(trailer) != TRAILER_BYTES:
            raise DecodeError(f"{source} is truncated (changed while being read?)")
    whole = hashlib.sha256(prefix)
    whole.update(data)
    if whole.digest() != trailer:
        raise DecodeError(f"{source}: file does not match its trailing sha256 (corrupt file)")
    if hashlib.sha256(data).digest() != header.sha256:
        raise DecodeError(f"{source}: data do not match the recorded sha256 (corrupt file)")
    if expected_shape is not None and header.shape != tuple(expected_shape):
        raise ConfigError(
            "node.checkpoint_dir",
            str(source),
            f"a checkpoint of shape {list(expected_shape)}, not {list(header.shape)} "
            "(move the old checkpoint away)",
        )
    if expected_node is not None and header.node != expected_node:
        raise ConfigError(
            "node.checkpoint_dir",
            str(source),
            f"a checkpoint of node {expected_node[:12]}, not of {header.node[:12]} "
            "(move the old checkpoint away)",
        )
    array = np.frombuffer(data, dtype="<f4").astype(np.float32).reshape(header.shape)
    return Checkpoint(header=header, vector=torch.from_numpy(array))


def _data_bytes(vector: torch.Tensor) -> bytes:
    array = vector.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    return array.astype("<f4", copy=False).tobytes()


def _parse_header(source: Path, raw: bytes) -> CheckpointHeader:
    try:
        header = msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            max_ext_len=0,
            max_array_len=1024,
            max_map_len=1024,
        )
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.UnpackException) as exc:
        raise DecodeError(f"{source}: header is not valid msgpack: {exc}") from exc
    if not isinstance(header, dict) or set(header) != _HEADER_KEYS:
        keys = sorted(header) if isinstance(header, dict) else type(header).__name__
        raise DecodeError(f"{source}: header keys {keys} != {sorted(_HEADER_KEYS)}")
    if header["format"] != FORMAT_VERSION:
        raise DecodeError(
            f"{source}: format {header['format']!r}, this p2pfl reads {FORMAT_VERSION}"
        )
    if header["dtype"] != DTYPE:
        raise DecodeError(f"{source}: dtype {header['dtype']!r}, expected {DTYPE!r}")
    round_ = header["round"]
    shape = header["shape"]
    digest = header["sha256"]
    if not _is_int(round_) or round_ < 0:
        raise DecodeError(f"{source}: round {round_!r} is not a non-negative integer")
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_DIMS
        or not all(_is_int(d) and d >= 0 for d in shape)
    ):
        raise DecodeError(f"{source}: shape {shape!r} is not a list of non-negative integers")
    try:
        shape_elements(tuple(shape), MAX_ELEMENTS)
    except WireError:
        raise DecodeError(
            f"{source}: shape {shape} exceeds {MAX_ELEMENTS} elements "
            "(counting every non-zero dimension)"
        ) from None
    if not isinstance(digest, bytes) or len(digest) != 32:
        raise DecodeError(f"{source}: sha256 is not 32 bytes")
    if not isinstance(header["node"], str) or not isinstance(header["info"], dict):
        raise DecodeError(f"{source}: node must be a string and info a map")
    return CheckpointHeader(
        round=round_,
        shape=tuple(shape),
        sha256=digest,
        node=header["node"],
        info=header["info"],
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
