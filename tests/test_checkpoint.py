"""Checkpoints: round trip, atomic 0600 writes, and refusal of every corruption."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pfl.checkpoint import (
    MAGIC,
    MAX_HEADER_BYTES,
    TRAILER_BYTES,
    checkpoint_path,
    load_checkpoint,
    read_header,
    save_checkpoint,
    vector_digest,
)
from p2pfl.errors import ConfigError, DecodeError

NODE = "ab" * 32


def saved(tmp_path: Path, vector: torch.Tensor | None = None, round_: int = 3) -> Path:
    path = checkpoint_path(tmp_path / "state")
    save_checkpoint(
        path,
        round=round_,
        vector=torch.arange(10, dtype=torch.float32) / 7 if vector is None else vector,
        node=NODE,
        info={"saved_at": 1.5, "note": "x"},
    )
    return path


def test_round_trip_keeps_round_vector_and_header(tmp_path: Path) -> None:
    vector = torch.randn(257, generator=torch.Generator().manual_seed(0))
    path = saved(tmp_path, vector, round_=7)
    loaded = load_checkpoint(path, expected_shape=(257,), expected_node=NODE)
    assert loaded.round == 7
    assert torch.equal(loaded.vector, vector)
    assert loaded.vector.dtype == torch.float32
    assert loaded.header.node == NODE
    assert loaded.header.info == {"saved_at": 1.5, "note": "x"}
    assert loaded.header.sha256.hex() == vector_digest(vector)
    loaded.vector.add_(1)  # the result is writable and owned by the caller


def test_file_is_private_and_replaced_atomically(tmp_path: Path) -> None:
    path = saved(tmp_path, round_=1)
    path = saved(tmp_path, torch.zeros(4), round_=2)
    assert path.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp files left
    assert load_checkpoint(path).round == 2


def test_file_layout_is_magic_header_data_trailer(tmp_path: Path) -> None:
    path = saved(tmp_path, torch.ones(3))
    raw = path.read_bytes()
    assert raw.startswith(MAGIC)
    (header_len,) = struct.unpack_from(">I", raw, len(MAGIC))
    header = msgpack.unpackb(raw[len(MAGIC) + 4 : len(MAGIC) + 4 + header_len])
    assert header["format"] == 1 and header["dtype"] == "float32" and header["shape"] == [3]
    data = raw[len(MAGIC) + 4 + header_len : -TRAILER_BYTES]
    assert data == struct.pack("<3f", 1.0, 1.0, 1.0)
    assert b"pickle" not in raw


def test_empty_vector(tmp_path: Path) -> None:
    path = saved(tmp_path, torch.zeros(0))
    assert load_checkpoint(path).vector.shape == (0,)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda raw: b"NOTACKPT" + raw[8:], "magic"),
        (lambda raw: raw[:5], "magic"),
        (lambda raw: raw[:-1], "bytes"),
        (lambda raw: raw + b"\0", "bytes"),
        (
            lambda raw: raw[: len(MAGIC)] + struct.pack(">I", MAX_HEADER_BYTES + 1) + raw[12:],
            "exceeds",
        ),
        (lambda raw: raw[: len(MAGIC)] + struct.pack(">I", 3) + raw[12:], "msgpack"),
    ],
)
def test_corrupt_files_raise_decode_error(
    tmp_path: Path, mutate: Callable[[bytes], bytes], message: str
) -> None:
    path = saved(tmp_path)
    path.write_bytes(mutate(path.read_bytes()))
    with pytest.raises(DecodeError, match=message):
        load_checkpoint(path)


def forged(tmp_path: Path, **changes: object) -> Path:
    """A checkpoint whose header says something else than its data."""
    header = {
        "format": 1,
        "round": 1,
        "dtype": "float32",
        "shape": [2],
        "sha256": b"\0" * 32,
        "node": NODE,
        "info": {},
    }
    header.update(changes)
    encoded = msgpack.packb(header, use_bin_type=True)
    path = tmp_path / "forged.ckpt"
    path.write_bytes(MAGIC + struct.pack(">I", len(encoded)) + encoded + b"\0" * 8 + b"\0" * 32)
    return path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"shape": [2**40]}, "exceeds"),  # refused before allocating anything
        ({"shape": [0, 2**63]}, "exceeds"),  # a zero dimension does not excuse a huge one
        ({"shape": [0, 2**62, 2**62]}, "exceeds"),
        ({"shape": [1_000_000]}, "bytes"),  # size does not match: not read
        ({"format": 2}, "format"),
        ({"dtype": "float64"}, "dtype"),
        ({"round": -1}, "round"),
        ({"shape": "2"}, "shape"),
        ({"extra": 1}, "keys"),
        ({}, "sha256"),  # all checks pass but the digests
    ],
)
def test_forged_headers_raise_decode_error(
    tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    with pytest.raises(DecodeError, match=message):
        load_checkpoint(forged(tmp_path, **changes))


def test_intact_checkpoint_of_another_model_or_node_is_a_config_error(tmp_path: Path) -> None:
    path = saved(tmp_path)
    with pytest.raises(ConfigError, match=r"node\.checkpoint_dir"):
        load_checkpoint(path, expected_shape=(11,))
    with pytest.raises(ConfigError, match=r"node\.checkpoint_dir"):
        load_checkpoint(path, expected_node="cd" * 32)


def test_read_header_does_not_need_the_data(tmp_path: Path) -> None:
    path = saved(tmp_path, torch.zeros(5), round_=4)
    header, offset = read_header(path)
    assert header.round == 4 and header.shape == (5,)
    assert path.stat().st_size == offset + 5 * 4 + TRAILER_BYTES


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_flipped_byte_is_detected(tmp_path: Path, data: st.DataObject) -> None:
    path = saved(tmp_path, torch.linspace(-1, 1, 6))
    raw = bytearray(path.read_bytes())
    index = data.draw(st.integers(0, len(raw) - 1), label="index")
    raw[index] ^= data.draw(st.integers(1, 255), label="xor")
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(bytes(raw))
    with pytest.raises(DecodeError):
        load_checkpoint(corrupt)
