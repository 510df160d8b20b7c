"""A node's counters and gauges, rendered in the Prometheus text format, and the endpoint
that serves them on localhost.

Theory of operation
-------------------
:class:`Metrics` holds a fixed set of families (declared in ``FAMILIES``), each a counter or
a gauge, optionally with one label (e.g. ``reason``). Label values come from a closed set the
node chooses (rejection reasons, ban kinds), never from the network, so the number of series
is bounded. :meth:`Metrics.render` writes text format 0.0.4.

:func:`serve_status` is a minimal HTTP/1.0 responder on trio: it reads one request of at most
``MAX_REQUEST_BYTES`` within ``REQUEST_TIMEOUT`` seconds, answers ``GET /metrics`` with the
rendered metrics (``200``), any other path with ``404``, any other method with ``405`` and a
request that does not end within the size limit with ``431``, then closes the connection. At most ``MAX_CLIENTS`` requests are served at once; more are
closed unanswered. The node binds it to 127.0.0.1 unless its config says otherwise.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import trio

MAX_REQUEST_BYTES = 4096
REQUEST_TIMEOUT = 5.0
MAX_CLIENTS = 8
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True, slots=True)
class Family:
    """One metric family: name (without the ``p2pfl_`` prefix), type, help, label name."""

    name: str
    kind: Literal["counter", "gauge"]
    help: str
    label: str | None = None


FAMILIES: tuple[Family, ...] = (
    Family("round", "gauge", "Rounds completed (the next round to run)."),
    Family("rounds_total", "gauge", "Rounds this node runs in all."),
    Family("last_train_loss", "gauge", "Training loss of the last completed round."),
    Family("last_test_loss", "gauge", "Test loss of the last evaluated round."),
    Family("last_test_accuracy", "gauge", "Test accuracy of the last evaluated round."),
    Family("peers_connected", "gauge", "Authenticated peer connections now."),
    Family("peers_configured", "gauge", "Peers in the node's config."),
    Family("peers_known", "gauge", "Peers learned through peer exchange and remembered."),
    Family("handshakes_in_progress", "gauge", "Unauthenticated connections in the handshake."),
    Family("frames_in_total", "counter", "Frames received on authenticated connections."),
    Family("frames_out_total", "counter", "Frames written to peers."),
    Family("bytes_in_total", "counter", "Frame bytes received on authenticated connections."),
    Family("bytes_out_total", "counter", "Frame bytes written to peers."),
    Family("frames_rejected_total", "counter", "Frames or connections refused.", "reason"),
    Family("connections_accepted_total", "counter", "TCP connections accepted."),
    Family("handshakes_failed_total", "counter", "Handshakes that failed or timed out."),
    Family("strikes_total", "counter", "Misbehaviour strikes against peers."),
    Family("bans_total", "counter", "Bans imposed.", "kind"),
    Family("bans_active", "gauge", "Bans in force now.", "kind"),
    Family("queue_drops_total", "counter", "Frames dropped from full per-peer send queues."),
    Family("event_queue_drops_total", "counter", "Events dropped because the loop lagged."),
    Family("peer_exchange_learned_total", "counter", "New peers learned from neighbours."),
    Family("messages_received_total", "counter", "Protocol messages passed to the core."),
    Family("sends_unconnected_total", "counter", "Sends dropped: no connection, no dial."),
    Family("dials_on_demand_total", "counter", "Dials of peers the core sent to unconnected."),
    Family("wire_errors_total", "counter", "Unusable frames on authenticated connections."),
)

REJECT_REASONS = (
    "banned_ip",
    "banned_key",
    "handshake_limit",
    "peer_limit",
    "handshake",
    "oversized",
    "malformed",
    "bad_signature",
    "rate",
    "idle",
    "unexpected_kind",
    "protocol",
)
"""The closed set of ``reason`` label values of ``frames_rejected_total``."""

BAN_KINDS = ("key", "ip")


class Metrics:
    """The node's metric values; cheap to update, rendered on demand."""

    __slots__ = ("_families", "_values", "gauge_sources")

    def __init__(self) -> None:
        self._families = {family.name: family for family in FAMILIES}
        self._values: dict[tuple[str, str], float] = {}
        self.gauge_sources: dict[tuple[str, str], Callable[[], float]] = {}
        for family in FAMILIES:
            labels: tuple[str, ...] = ("",)
            if family.name == "frames_rejected_total":
                labels = REJECT_REASONS
            elif family.label == "kind":
                labels = BAN_KINDS
            for label in labels:
                self._values[(family.name, label)] = 0.0

    def inc(self, name: str, amount: float = 1.0, label: str = "") -> None:
        """Add to a counter.

        Raises:
            KeyError: ``name``/``label`` is not declared (a bug in the caller).
        """
        key = (name, label)
        if key not in self._values:
            raise KeyError(f"undeclared metric {name}{{{label}}}")
        self._values[key] += amount

    def set(self, name: str, value: float, label: str = "") -> None:
        """Set a gauge.

        Raises:
            KeyError: ``name``/``label`` is not declared.
        """
        key = (name, label)
        if key not in self._values:
            raise KeyError(f"undeclared metric {name}{{{label}}}")
        self._values[key] = float(value)

    def get(self, name: str, label: str = "") -> float:
        source = self.gauge_sources.get((name, label))
        return float(source()) if source is not None else self._values[(name, label)]

    def bind(self, name: str, source: Callable[[], float], label: str = "") -> None:
        """Read gauge ``name`` from ``source`` at render time."""
        if (name, label) not in self._values:
            raise KeyError(f"undeclared metric {name}{{{label}}}")
        self.gauge_sources[(name, label)] = source

    def render(self, node: str = "") -> str:
        """The Prometheus text exposition (format 0.0.4) of every family."""
        lines: list[str] = []
        for family in FAMILIES:
            full = f"p2pfl_{family.name}"
            lines.append(f"# HELP {full} {family.help}")
            lines.append(f"# TYPE {full} {family.kind}")
            for (name, label), _ in self._values.items():
                if name != family.name:
                    continue
                labels = []
                if node:
                    labels.append(f'node="{_escape(node)}"')
                if family.label is not None:
                    labels.append(f'{family.label}="{_escape(label)}"')
                rendered = "{" + ",".join(labels) + "}" if labels else ""
                lines.append(f"{full}{rendered} {_number(self.get(name, label))}")
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Samples of a Prometheus text exposition as ``(name, labels, value)``; comments skipped.

    Only what :meth:`Metrics.render` writes is understood (used by ``p2pfl status``).
    """
    samples: list[tuple[str, dict[str, str], float]] = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value_text = line.rpartition(" ")
        name, _, label_text = head.partition("{")
        labels: dict[str, str] = {}
        for part in label_text.rstrip("}").split(","):
            key, sep, value = part.partition("=")
            if sep:
                labels[key] = value.strip('"')
        try:
            number = float(value_text)
        except ValueError:
            continue
        samples.append((name, labels, number))
    return samples


# -- the endpoint ----------------------------------------------------------------------------


def respond(request: bytes, render: Callable[[], str]) -> bytes:
    """The whole HTTP/1.0 response to one request head (everything before the blank line)."""
    line = request.split(b"\r\n", 1)[0].split(b"\n", 1)[0]
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
        return _response(400, "Bad Request", "bad request\n")
    method, target = parts[0], parts[1]
    if method != b"GET":
        return _response(405, "Method Not Allowed", "only GET\n", extra="Allow: GET\r\n")
    if target.split(b"?", 1)[0] != b"/metrics":
        return _response(404, "Not Found", "try /metrics\n")
    return _response(200, "OK", render(), content_type=CONTENT_TYPE)


def _response(
    status: int, reason: str, body: str, *, content_type: str = "text/plain", extra: str = ""
) -> bytes:
    data = body.encode("utf-8")
    head = (
        f"HTTP/1.0 {status} {reason}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(data)}\r\n"
        f"{extra}Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + data


async def serve_status(
    listeners: list[trio.SocketListener],
    render: Callable[[], str],
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer ``GET /metrics`` on ``listeners`` until cancelled (see the module docstring)."""
    clients = trio.Semaphore(MAX_CLIENTS)

    async def handle(stream: trio.SocketStream) -> None:
        try:
            if clients.value == 0:
                return
            async with clients:
                request = await _read_request(stream)
                if request is None:
                    return
                answer = (
                    respond(request, render)
                    if b"\n\n" in request.replace(b"\r\n", b"\n")
                    else _response(431, "Request Header Fields Too Large", "request too large\n")
                )
                with trio.move_on_after(REQUEST_TIMEOUT):
                    await stream.send_all(answer)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            with contextlib.suppress(trio.BrokenResourceError, OSError):
                await stream.aclose()

    await trio.serve_listeners(handle, listeners, task_status=task_status)


async def _read_request(stream: trio.abc.ReceiveStream) -> bytes | None:
    buffer = bytearray()
    with trio.move_on_after(REQUEST_TIMEOUT):
        while b"\r\n\r\n" not in buffer and b"\n\n" not in buffer:
            chunk = await stream.receive_some(MAX_REQUEST_BYTES - len(buffer))
            if not chunk:
                break
            buffer += chunk
            if len(buffer) >= MAX_REQUEST_BYTES:
                break
        return bytes(buffer) if buffer else None
    return None
