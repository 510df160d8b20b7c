"""Ed25519 identities: keypairs, key files and the :class:`NodeId` every peer is known by.

A node's identity *is* its public key: ``NodeId`` wraps the 32 raw public-key bytes, so a
signature check needs nothing but the id. Private keys are stored as unencrypted PKCS#8 PEM,
written atomically with mode 0600; a key file that group or others can read is refused.

Signing and verifying run in libsodium (through PyNaCl), key files in ``cryptography``
(OpenSSL). Ed25519 signatures are deterministic, so both libraries give the same bytes for
the same key and message; libsodium's are about twice as fast here (sign 19 µs against 37,
verify 55 µs against 115, for a 138-byte frame header; see docs/benchmarks.md, "Sealing and
verification (session 5)"). Its verification is also the stricter one: besides everything
OpenSSL checks (a canonical ``S`` below the group order, a decodable key, the cofactorless
equation) it refuses non-canonical and small-order keys and small-order ``R``, which no
honest signer produces, so it accepts a subset of what OpenSSL accepts.
"""

from __future__ import annotations

import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from nacl.bindings import crypto_sign, crypto_sign_open, crypto_sign_seed_keypair
from nacl.exceptions import BadSignatureError

from p2pfl.errors import BadSignature, ConfigError, IdentityError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

# ``cryptography`` is imported where key files and key objects are handled, not here: a
# process that only verifies (the simulator's verifier child, sim.verifier) starts about
# 50 ms of CPU sooner without it.

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
        if not verifies(self.raw, signature, message):
            raise BadSignature(f"signature from {self.short()} does not verify")


def verifies(key: bytes, signature: bytes, message: bytes | bytearray | memoryview) -> bool:
    """Whether ``signature`` is ``key``'s Ed25519 signature over ``message``.

    Any ``key`` and ``signature`` are accepted as input: only a 32-byte key (a
    :class:`NodeId`'s ``raw``) and a 64-byte signature can verify.
    """
    if len(signature) != SIGNATURE_BYTES:
        return False
    return verifies_attached(key, bytes(signature) + message)


def verifies_attached(key: bytes, signed_message: bytes | bytearray | memoryview) -> bool:
    """Whether ``signed_message`` is a 64-byte Ed25519 signature by ``key`` followed by the
    message it covers (libsodium's combined form: the verifier process, :mod:`sim.verifier`,
    receives records in it). Shorter input, or a key that is not 32 bytes, never verifies."""
    if len(key) != NODE_ID_BYTES:  # libsodium reads 32 bytes of key whatever it is handed
        return False
    try:
        crypto_sign_open(bytes(signed_message), bytes(key))
    except BadSignatureError:
        return False
    return True


class Identity:
    """A private Ed25519 key and the :class:`NodeId` it belongs to."""

    __slots__ = ("_secret", "node_id")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        from cryptography.hazmat.primitives import serialization

        self._init_seed(
            private_key.private_bytes(
                serialization.Encoding.Raw,
                serialization.PrivateFormat.Raw,
                serialization.NoEncryption(),
            )
        )

    def _init_seed(self, seed: bytes) -> None:
        public, secret = crypto_sign_seed_keypair(seed)
        self._secret = secret
        """libsodium's secret key: the 32-byte seed (RFC 8032's private key), then the
        public key."""
        self.node_id = NodeId(public)

    @classmethod
    def generate(cls) -> Identity:
        """A fresh random keypair from the operating system's CSPRNG."""
        return cls.from_seed(os.urandom(32))

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """A deterministic keypair from 32 seed bytes (simulations and tests only).

        Raises:
            ValueError: ``seed`` is not 32 bytes.
        """
        if len(seed) != 32:
            raise ValueError("an Ed25519 seed is exactly 32 bytes")
        identity = cls.__new__(cls)
        identity._init_seed(bytes(seed))
        return identity

    def sign(self, message: bytes) -> bytes:
        """Sign ``message``; Ed25519 is deterministic, so equal inputs give equal signatures."""
        # The combined form is the signature followed by the message.
        return crypto_sign(message, self._secret)[:SIGNATURE_BYTES]

    def private_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        private = Ed25519PrivateKey.from_private_bytes(self._secret[:32])
        return private.private_bytes(
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
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

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
