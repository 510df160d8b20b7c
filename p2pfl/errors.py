"""The p2pfl error tree, grouped by cause.

Every error p2pfl raises on purpose derives from :class:`P2PFLError`. Third-party errors are
wrapped at the boundary (``raise DecodeError(...) from exc``); any other exception leaving a
protocol core is a bug.
"""

from __future__ import annotations


class P2PFLError(Exception):
    """Base class of every error p2pfl raises on purpose."""


class ConfigError(P2PFLError, ValueError):
    """A scenario or config value is wrong; the message names the key, the value and what is allowed."""

    def __init__(self, key: str, value: object, allowed: str) -> None:
        self.key = key
        self.value = value
        self.allowed = allowed
        super().__init__(f"{key} = {value!r}: {allowed}")


class IdentityError(P2PFLError):
    """A key file is missing, malformed or unsafely stored."""


class WireError(P2PFLError):
    """Bytes from the network are unusable."""


class FrameTooLarge(WireError):
    """A frame, header or payload declares a size above the configured limit."""


class DecodeError(WireError):
    """Bytes do not form a well-shaped frame, header or payload."""


class UnsupportedVersion(WireError):
    """The frame's protocol version is not one this node speaks."""


class UnknownKind(WireError):
    """The frame's message kind is not in the registry."""


class BadSignature(WireError):
    """The signature or the payload digest does not verify against the sender's key."""


class Replayed(WireError):
    """The sequence number was already seen or lies outside the replay window."""


class ProtocolError(P2PFLError):
    """A protocol rule was broken."""


class InsufficientInputs(ProtocolError, ValueError):
    """A merge rule was given fewer inputs than its guarantee needs (e.g. Krum with n <= 2f+2).

    Not a fault of anyone: a node with few neighbours, or a round where some timed out, meets
    it. The protocol keeps the own model for that round instead of merging.
    """


class LocalProtocolError(ProtocolError):
    """The caller misused a protocol core (a bug in the driver)."""


class RemoteProtocolError(ProtocolError):
    """A peer misbehaved; never escapes ``handle()``, becomes a ``PeerMisbehaved`` action."""


class TopologyError(P2PFLError, ValueError):
    """Invalid topology generator arguments; the message names the allowed range."""


class NodeClosedError(P2PFLError):
    """The operation was attempted on a node or connection that this side closed."""


class TransportBroken(P2PFLError):
    """The network broke a connection (reset, EOF mid-frame, timeout)."""


class HandshakeFailed(TransportBroken):
    """A peer failed the nonce handshake or presented an unexpected key."""
