"""A node's defences: strikes and bans of keys, failed handshakes and bans of addresses, and
each peer's rate limit.

Theory of operation
-------------------
:class:`Defences` holds every table the node keeps about bad traffic, each bounded (bans,
failure counters, strikes, token buckets of connected peers only), and counts what it refuses
in the node's :class:`~p2pfl.runtime.status.Metrics`. It does no I/O: when a key is banned it
calls ``on_ban`` (the node closes that peer's connection and forgets it in the peer book).

* A *strike* (:meth:`Defences.strike`) is one piece of misbehaviour of an authenticated peer:
  an unusable frame, a frame over its rate, a ``PeerMisbehaved`` from the core.
  ``strikes_to_ban`` strikes within ``STRIKE_WINDOW`` ban the key for ``ban_interval``
  seconds.
* Each connected peer has a token bucket sized from the protocol
  (:func:`~p2pfl.runtime.limits.peer_allowance`): ``peer_message_rate`` and
  ``peer_message_burst`` plus what the mode sends, credited per round this node completes
  (:meth:`Defences.credit_rounds`). A frame the bucket refuses is a strike.
* A failed handshake counts against the remote IP (``ip_failures_to_ban`` within
  ``ip_failure_window`` ban it), except the refusal of a key the node knows
  (``KEY_REFUSALS``): honest peers may share the address of a banned or surplus key.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from p2pfl.config import LimitsConfig
from p2pfl.errors import BadSignature, FrameTooLarge, HandshakeFailed, WireError
from p2pfl.identity import NodeId
from p2pfl.runtime.limits import BanList, FailureCounter, PeerAllowance, TokenBucket
from p2pfl.runtime.logs import log_event
from p2pfl.runtime.status import Metrics

log = logging.getLogger("p2pfl.node")

STRIKES_TO_DISCONNECT = 3
"""The default of ``node.strikes_to_ban``."""
STRIKE_WINDOW = 600.0
"""Strikes older than this (seconds) are forgotten."""
MAX_STRIKE_ENTRIES = 1024
MAX_IP_ENTRIES = 4096
"""Remote IPs whose handshake failures are counted at once (least recent forgotten)."""
KEY_REFUSALS = frozenset({"banned_key", "peer_limit", "wrong_direction"})
"""Refusals of a key the node knows; they never count against the remote IP."""


class Defences:
    """Strikes, bans and rate limits of one node (see the module docstring).

    Attributes:
        key_bans: banned peer keys.
        ip_bans: banned remote IPs.
        allowance: what a peer may send (per round, per second, burst).
    """

    def __init__(
        self,
        limits: LimitsConfig,
        allowance: PeerAllowance,
        metrics: Metrics,
        on_ban: Callable[[NodeId], None],
    ) -> None:
        self.limits = limits
        self.allowance = allowance
        self.metrics = metrics
        self._on_ban = on_ban
        self._strikes = FailureCounter[NodeId](MAX_STRIKE_ENTRIES, STRIKE_WINDOW)
        self.key_bans = BanList[NodeId](limits.max_bans)
        self.ip_bans = BanList[str](limits.max_bans)
        self._ip_failures = FailureCounter[str](MAX_IP_ENTRIES, limits.ip_failure_window)
        self._buckets: dict[NodeId, TokenBucket] = {}

    # -- keys -------------------------------------------------------------------------------

    def is_banned(self, peer: NodeId) -> bool:
        return self.key_bans.is_banned(peer, trio.current_time())

    def banned_until(self, peer: NodeId) -> float | None:
        """When the ban of ``peer`` ends (trio time), or ``None`` if it is not banned."""
        return self.key_bans.banned_until(peer, trio.current_time())

    def reject(self, reason: str) -> None:
        """Count one refused frame or connection under ``reason`` (``REJECT_REASONS``)."""
        self.metrics.inc("frames_rejected_total", label=reason)

    def strike(self, peer: NodeId, reason: str) -> None:
        """Count a strike against ``peer``; the last one allowed bans it (``on_ban``)."""
        self.metrics.inc("strikes_total")
        now = trio.current_time()
        needed = self.limits.strikes_to_ban
        strikes = self._strikes.record(peer, now)
        log_event(
            log,
            logging.WARNING,
            "strike",
            "peer %s misbehaved (%d/%d): %s",
            peer,
            strikes,
            needed,
            reason,
            peer=peer.hex(),
            strikes=strikes,
            reason=reason,
        )
        if strikes < needed:
            return
        self._strikes.forget(peer)
        self.key_bans.ban(peer, now + self.limits.ban_interval, now=now)
        self.metrics.inc("bans_total", label="key")
        log_event(
            log,
            logging.WARNING,
            "banned",
            "banned peer %s for %g s after %d strikes",
            peer,
            self.limits.ban_interval,
            needed,
            peer=peer.hex(),
            kind="key",
            seconds=self.limits.ban_interval,
        )
        self._on_ban(peer)

    def wire_error(self, peer: NodeId, exc: WireError) -> None:
        """An unusable frame from an authenticated peer: a rejection and a strike."""
        self.metrics.inc("wire_errors_total")
        self.reject(wire_reason(exc, default="malformed"))
        self.strike(peer, f"unusable frame: {exc}")

    # -- rates ------------------------------------------------------------------------------

    def open_peer(self, peer: NodeId) -> None:
        """A connection to ``peer`` starts: a full bucket."""
        self._buckets[peer] = self.allowance.bucket(trio.current_time())

    def close_peer(self, peer: NodeId) -> None:
        self._buckets.pop(peer, None)

    def admit(self, peer: NodeId) -> bool:
        """Whether ``peer``'s frame fits its rate; one that does not is refused and struck."""
        bucket = self._buckets.get(peer)
        if bucket is None or bucket.take(trio.current_time()):
            return True
        self.reject("rate")
        self.strike(
            peer,
            f"more frames than the protocol sends ({self.allowance.per_round:g} per round "
            f"and {self.allowance.per_second:g}/s, burst {self.allowance.burst:g})",
        )
        return False

    def credit_rounds(self, rounds: int) -> None:
        """This node completed ``rounds`` more rounds: each peer earns what a round sends."""
        tokens = rounds * self.allowance.per_round
        if tokens:
            for bucket in self._buckets.values():
                bucket.credit(tokens)

    # -- addresses --------------------------------------------------------------------------

    def refuse_address(self, ip: str | None, handshakes: int) -> str | None:
        """Why an accepted socket is closed before its handshake, or ``None`` to go on."""
        if ip is not None and self.ip_bans.is_banned(ip, trio.current_time()):
            return "banned_ip"
        if handshakes >= self.limits.max_handshakes:
            return "handshake_limit"
        return None

    def handshake_failed(
        self, exc: HandshakeFailed, refusal: str | None, address: str, ip: str | None
    ) -> None:
        """Count an accepted connection's failed handshake; enough ban its IP (unless the
        node refused a key it knows, ``KEY_REFUSALS``)."""
        self.metrics.inc("handshakes_failed_total")
        if refusal == "wrong_direction":
            self.reject("handshake")  # a configured peer that should wait to be dialled
        else:
            self.reject(refusal or wire_reason(exc.__cause__, default="handshake"))
        log_event(
            log,
            logging.INFO,
            "handshake_failed",
            "refused connection from %s: %s",
            address,
            exc,
            address=address,
            reason=str(exc),
        )
        threshold = self.limits.ip_failures_to_ban
        if ip is None or threshold == 0 or refusal in KEY_REFUSALS:
            # A key this node refuses by policy (banned, no slot) signed its HELLO: its
            # redials are not failures of the address, which honest peers may share.
            return
        now = trio.current_time()
        if self._ip_failures.record(ip, now) >= threshold:
            self._ip_failures.forget(ip)
            self.ip_bans.ban(ip, now + self.limits.ban_interval, now=now)
            self.metrics.inc("bans_total", label="ip")
            log_event(
                log,
                logging.WARNING,
                "banned",
                "banned IP %s for %g s after %d failed handshakes",
                ip,
                self.limits.ban_interval,
                threshold,
                ip=ip,
                kind="ip",
                seconds=self.limits.ban_interval,
            )


def wire_reason(exc: BaseException | None, *, default: str) -> str:
    """The ``frames_rejected_total`` reason for a wire error."""
    if isinstance(exc, FrameTooLarge):
        return "oversized"
    if isinstance(exc, BadSignature):
        return "bad_signature"
    if isinstance(exc, WireError):
        return "malformed"
    return default
