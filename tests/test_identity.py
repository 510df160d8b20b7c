"""Identities: key generation, key files (0600, no overwrite) and signature checks."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pfl.errors import BadSignature, ConfigError, IdentityError
from p2pfl.identity import (
    NODE_ID_BYTES,
    SHORT_ID_HEX_CHARS,
    Identity,
    NodeId,
    verifies,
    verifies_attached,
)

MESSAGE = b"round 7 model update"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_generate_save_load_round_trip(tmp_path: Path) -> None:
    original = Identity.generate()
    path = tmp_path / "keys" / "node.pem"  # parent does not exist yet
    original.save(path)

    loaded = Identity.load(path)

    assert loaded.node_id == original.node_id
    # The loaded private key signs; the *original* public key accepts it.
    original.node_id.verify(loaded.sign(MESSAGE), MESSAGE)
    # And a different identity's signature is not accepted by it.
    with pytest.raises(BadSignature):
        original.node_id.verify(Identity.generate().sign(MESSAGE), MESSAGE)


def test_generated_identities_differ() -> None:
    assert Identity.generate().node_id != Identity.generate().node_id


def test_from_seed_is_deterministic() -> None:
    seed = bytes(range(32))
    assert Identity.from_seed(seed).node_id == Identity.from_seed(seed).node_id
    assert Identity.from_seed(seed).sign(MESSAGE) == Identity.from_seed(seed).sign(MESSAGE)
    with pytest.raises(ValueError):
        Identity.from_seed(b"short")


def test_saved_file_is_mode_0600_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "node.pem"
    old_umask = os.umask(0)  # the most permissive umask must still give 0600
    try:
        Identity.generate().save(path)
    finally:
        os.umask(old_umask)
    assert _mode(path) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.pem"]


def test_save_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "node.pem"
    first = Identity.generate()
    first.save(path)
    before = path.read_bytes()

    with pytest.raises(IdentityError, match="exists"):
        Identity.generate().save(path)

    assert path.read_bytes() == before
    assert Identity.load(path).node_id == first.node_id


def test_save_overwrite_true_replaces(tmp_path: Path) -> None:
    path = tmp_path / "node.pem"
    Identity.generate().save(path)
    second = Identity.generate()
    second.save(path, overwrite=True)
    assert Identity.load(path).node_id == second.node_id
    assert _mode(path) == 0o600


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_load_refuses_group_or_world_readable(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "node.pem"
    Identity.generate().save(path)
    path.chmod(mode)
    with pytest.raises(IdentityError, match="chmod 600") as info:
        Identity.load(path)
    assert str(path) in str(info.value)


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="does not exist"):
        Identity.load(tmp_path / "absent.pem")


def _write_0600(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not a key at all",
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        bytes(range(256)),
    ],
)
def test_load_garbage_raises_identity_error(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "node.pem"
    _write_0600(path, data)
    with pytest.raises(IdentityError):
        Identity.load(path)


def test_load_non_ed25519_key_raises_identity_error(tmp_path: Path) -> None:
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path = tmp_path / "ec.pem"
    _write_0600(path, pem)
    with pytest.raises(IdentityError, match="not an Ed25519 key"):
        Identity.load(path)


def test_load_encrypted_key_raises_identity_error(tmp_path: Path) -> None:
    identity = Identity.generate()
    # Re-serialise the same key with a password through the public PEM.
    key = serialization.load_pem_private_key(identity.private_pem(), password=None)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    path = tmp_path / "enc.pem"
    _write_0600(path, pem)
    with pytest.raises(IdentityError):
        Identity.load(path)


def test_node_id_hex_round_trip() -> None:
    node_id = Identity.generate().node_id
    text = node_id.hex()
    assert len(text) == 2 * NODE_ID_BYTES
    assert NodeId.from_hex(text) == node_id
    assert NodeId.from_hex(f"  {text.upper()}\n") == node_id


@pytest.mark.parametrize(
    "text",
    ["", "zz" * 32, "ab" * 31, "ab" * 33, "abc", "0x" + "ab" * 31],
)
def test_node_id_from_hex_error_names_the_key(text: str) -> None:
    key = "peers[3].public_key"
    with pytest.raises(ConfigError) as info:
        NodeId.from_hex(text, key=key)
    assert isinstance(info.value, ValueError)
    assert info.value.key == key
    assert str(info.value).startswith(key)
    assert "64-character hex" in str(info.value)


def test_node_id_from_hex_default_key() -> None:
    with pytest.raises(ConfigError, match="public_key"):
        NodeId.from_hex("nope")


def test_node_id_rejects_wrong_length() -> None:
    with pytest.raises(ValueError):
        NodeId(b"\x00" * 31)
    with pytest.raises(ValueError):
        NodeId(bytearray(32))  # type: ignore[arg-type]


def test_short_form() -> None:
    node_id = Identity.generate().node_id
    assert len(node_id.short()) == SHORT_ID_HEX_CHARS
    assert node_id.hex().startswith(node_id.short())
    assert str(node_id) == node_id.short()
    assert node_id.short() in repr(node_id)
    assert node_id.hex() not in repr(node_id)


def test_verify_accepts_good_signature() -> None:
    identity = Identity.generate()
    identity.node_id.verify(identity.sign(MESSAGE), MESSAGE)  # does not raise


@pytest.mark.parametrize("position", [0, 31, 32, 63])
def test_verify_rejects_flipped_signature(position: int) -> None:
    identity = Identity.generate()
    signature = bytearray(identity.sign(MESSAGE))
    signature[position] ^= 0x01
    with pytest.raises(BadSignature):
        identity.node_id.verify(bytes(signature), MESSAGE)


def test_verify_rejects_other_message_and_bad_lengths() -> None:
    identity = Identity.generate()
    signature = identity.sign(MESSAGE)
    with pytest.raises(BadSignature):
        identity.node_id.verify(signature, MESSAGE + b"!")
    with pytest.raises(BadSignature):
        identity.node_id.verify(signature[:-1], MESSAGE)
    with pytest.raises(BadSignature):
        identity.node_id.verify(b"", MESSAGE)


@pytest.mark.parametrize("raw", [b"\x02" + b"\x00" * 31, b"\xff" * 32])
def test_verify_with_arbitrary_key_bytes_raises_bad_signature(raw: bytes) -> None:
    # Whatever the backend makes of bytes that are no real key, only BadSignature escapes.
    with pytest.raises(BadSignature):
        NodeId(raw).verify(b"\x00" * 64, MESSAGE)


@pytest.mark.parametrize("length", [0, 31, 38, 137, 138, 139, 4096])
def test_libsodium_and_openssl_agree_on_signatures(length: int) -> None:
    # Signing and verifying run in libsodium; key files in cryptography (OpenSSL). Ed25519 is
    # deterministic: both give the same bytes, and each accepts the other's.
    seed = bytes(range(1, 33))
    message = bytes(index % 251 for index in range(length))
    openssl = Ed25519PrivateKey.from_private_bytes(seed)
    ours = Identity.from_seed(seed)
    assert ours.sign(message) == openssl.sign(message)
    openssl.public_key().verify(ours.sign(message), message)  # does not raise
    ours.node_id.verify(openssl.sign(message), message)
    assert ours.node_id.raw == openssl.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def test_verifies_refuses_malformed_input_without_raising() -> None:
    identity = Identity.from_seed(bytes(range(32)))
    signature = identity.sign(MESSAGE)
    key = identity.node_id.raw
    assert verifies(key, signature, MESSAGE)
    assert verifies_attached(key, signature + MESSAGE)
    assert verifies_attached(key, memoryview(bytearray(signature + MESSAGE)))
    assert not verifies(key[:31], signature, MESSAGE)  # libsodium would read past a short key
    assert not verifies_attached(key + b"\x00", signature + MESSAGE)
    assert not verifies(key, signature[:63], MESSAGE)
    assert not verifies(key, signature + b"\x00", MESSAGE)
    assert not verifies_attached(key, signature[:63])
    assert not verifies_attached(key, b"")
    # Any bytes-like key, as the old OpenSSL path took
    assert verifies(bytearray(key), signature, MESSAGE)
    assert verifies_attached(memoryview(key), signature + MESSAGE)
