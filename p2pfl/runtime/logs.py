"""Log records with an event name and fields, and the two formats ``p2pfl node`` writes.

Runtime code logs through :func:`log_event`, which attaches an event name (``round``,
``peer_connected``, ``banned``...) and a flat dict of fields to an ordinary
:class:`logging.LogRecord`. The human format prints the message as before; the JSON format
(``--log-format json``) prints one object per line::

    {"time": "2025-01-01T12:00:00.123456+00:00", "level": "INFO", "logger": "p2pfl.node",
     "event": "round", "message": "...", "fields": {"round": 3, "loss": 0.41, ...}}

Records logged without an event (third-party code, plain ``log.info``) get ``"event":
"log"`` and empty fields, so every line parses the same way.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import sys
from collections.abc import Mapping
from typing import IO, Any

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_event(
    logger: logging.Logger, level: int, event: str, message: str, *args: object, **fields: Any
) -> None:
    """Log ``message % args`` as ``event`` with ``fields`` (JSON-able scalars)."""
    if logger.isEnabledFor(level):
        logger.log(level, message, *args, extra={"event": event, "fields": fields})


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, event, message, fields."""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        document: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "event": getattr(record, "event", "log"),
            "message": record.getMessage(),
            "fields": _plain(fields) if isinstance(fields, Mapping) else {},
        }
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, allow_nan=False, separators=(",", ":"))


def configure_logging(level: str, fmt: str = "text", stream: IO[str] | None = None) -> None:
    """Send every record at ``level`` or above to ``stream`` (stderr) in format ``fmt``.

    Raises:
        ValueError: ``fmt`` is not one of ``LOG_FORMATS``.
    """
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format {fmt!r}: one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level))
