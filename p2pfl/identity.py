"""Ed25519 identities: keypairs, key files and the :class:`NodeId` every peer is known by.

A node's identity *is* its public key: ``NodeId`` wraps the 32 raw public-key bytes, so a
signature check needs nothing but the id. Private keys are stored as unencrypted PKCS#8 PEM,
written atomically with mode 0600; a key file that group or others can read is refused.
"""

from __future__ import annotations

import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from p2pfl.errors import BadSignature, ConfigError, IdentityError

NODE_ID_BYTES = 32
SIGNATURE_BYTES = 64
SHORT_ID_HEX_CHARS = 12


@dataclass(frozen=True, slots=True, order=True)
class NodeId:
    """A peer's identity: its 32-byte Ed25519 public key."""

    raw: bytes

    # Hand-written because ids are dictionary keys on every message path: the generated
    # versions build a tuple per call, these reuse the hash that ``bytes`` caches.
    def __eq__(self, other: object) -> bool:
        return isinstance(other, NodeId) and self.raw == other.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def __post_init__(self) -> None:
        if not isinstance(self.raw, bytes) or len(self.raw) != NODE_ID_BYTES:
            raise ValueError(f"NodeId needs exactly {NODE_ID_BYTES} bytes")

    @classmethod
    def from_hex(cls, text: str, *, key: str = "public_key") -> NodeId:
        """Parse the 64-hex-character form used in config files.

        Raises:
            ConfigError: ``text`` is not 64 hex characters.
        """
        try:
            raw = bytes.fromhex(text.strip())
        except ValueError:
            raw = b""
        if len(raw) != NODE_ID_BYTES:
            raise ConfigError(key, text, f"a {2 * NODE_ID_BYTES}-character hex Ed25519 public key")
        return cls(raw)

    def hex(self) -> str:
        """The full 64-hex-character form."""
        return self.raw.hex()

    def short(self) -> str:
        """A short printable form for logs and tables (not unique by construction)."""
        return self.raw.hex()[:SHORT_ID_HEX_CHARS]

    def __str__(self) -> str:
        return self.short()

    def __repr__(self) -> str:
        return f"NodeId({self.short()}…)"

    def verify(self, signature: bytes, message: bytes) -> None:
        """Check ``signature`` over ``message`` against this key.

        Raises:
            BadSignature: the signature does not verify (or the key bytes are not a valid point).
        """
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, message)
        except (InvalidSignature, ValueError) as exc:
            raise BadSignature(f"signature from {self.short()} does not verify") from exc


class Identity:
    """A private Ed25519 key and the :class:`NodeId` it belongs to."""

    __slots__ = ("_private", "node_id")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private = private_key
        raw = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.node_id = NodeId(raw)

    @classmethod
    def generate(cls) -> Identity:
        """A fresh random keypair from the operating system's CSPRNG."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """A deterministic keypair from 32 seed bytes (simulations and tests only)."""
        if len(seed) != 32:
            raise ValueError("an Ed25519 seed is exactly 32 bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    def sign(self, message: bytes) -> bytes:
        """Sign ``message``; Ed25519 is deterministic, so equal inputs give equal signatures."""
        return self._private.sign(message)

    def private_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM."""
        return self._private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        """Write the private key atomically with mode 0600.

        Raises:
            IdentityError: the file exists and ``overwrite`` is false.
        """
        target = Path(path)
        if target.exists() and not overwrite:
            raise IdentityError(f"{target} exists; refusing to overwrite a key (delete it first)")
        write_private_file(target, self.private_pem())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Identity:
        """Read a private key written by :meth:`save`.

        Raises:
            IdentityError: the file is missing, readable by group or others, or not an
                Ed25519 private key.
        """
        source = Path(path)
        try:
            mode = source.stat().st_mode
        except FileNotFoundError as exc:
            raise IdentityError(
                f"key file {source} does not exist (create one with `p2pfl keygen --out {source}`)"
            ) from exc
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise IdentityError(
                f"key file {source} has mode {stat.S_IMODE(mode):04o}, readable by others; "
                f"fix it with `chmod 600 {source}`"
            )
        try:
            key = serialization.load_pem_private_key(source.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise IdentityError(f"key file {source} is not an unencrypted PEM private key") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(
                f"key file {source} holds a {type(key).__name__}, not an Ed25519 key"
            )
        return cls(key)


def write_private_file(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` atomically (temp file, fsync, rename) with mode 0600."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
