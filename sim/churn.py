"""Churn traces: when each node is online, from a CSV file.

A trace has a header ``node,online_from,online_until`` and one row per online interval, times
in virtual seconds relative to the churn disruption that reads it. A node listed in the trace
is offline outside its intervals; a node not listed is not affected.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from p2pfl.errors import ConfigError

TRACE_COLUMNS = ("node", "online_from", "online_until")


def read_trace(path: Path) -> dict[int, list[tuple[float, float]]]:
    """Each listed node's online intervals, sorted and merged where they overlap.

    Raises:
        ConfigError: the file is unreadable, lacks the columns, or a row is malformed.
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError("trace", str(path), f"a readable CSV file ({exc.strerror})") from None
    reader = csv.DictReader(text.splitlines())
    if reader.fieldnames is None or not set(TRACE_COLUMNS) <= set(reader.fieldnames):
        raise ConfigError("trace", str(path), f"a CSV file with columns {', '.join(TRACE_COLUMNS)}")
    intervals: dict[int, list[tuple[float, float]]] = {}
    for line, row in enumerate(reader, start=2):
        try:
            node = int(row["node"])
            start = float(row["online_from"])
            end = float(row["online_until"])
        except (TypeError, ValueError):
            raise ConfigError(
                "trace", f"{path}:{line}", "node an int, online_from/online_until numbers"
            ) from None
        if node < 0 or not 0.0 <= start < end or math.isnan(end):
            raise ConfigError(
                "trace", f"{path}:{line}", "node >= 0 and 0 <= online_from < online_until"
            )
        intervals.setdefault(node, []).append((start, end))
    merged: dict[int, list[tuple[float, float]]] = {}
    for node, spans in sorted(intervals.items()):
        result: list[tuple[float, float]] = []
        for start, end in sorted(spans):
            if result and start <= result[-1][1]:
                result[-1] = (result[-1][0], max(result[-1][1], end))
            else:
                result.append((start, end))
        merged[node] = result
    return merged
