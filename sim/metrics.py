"""Per-node, per-round metrics and the files a run writes.

A node's round r is recorded when its core asks to checkpoint round r+1. Rows of a round are
completed together once every node has reported it (or at the end of the run), because two
columns need all of them: test accuracy is evaluated for the whole round in one batched call,
and the consensus distance is the mean squared distance of the round's models to their mean.
Rows are written in (round, node) order with ``repr`` floats, so one seed gives one byte string.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

COLUMNS = (
    "round",
    "node",
    "honest",
    "virtual_time",
    "train_loss",
    "test_loss",
    "test_accuracy",
    "distance_to_mean",
    "consensus_distance",
    "bytes_sent",
    "bytes_received",
    "messages_sent",
    "messages_received",
    "rejected",
)

Evaluator = Callable[[Tensor], tuple[Tensor, Tensor]]


@dataclass(slots=True)
class Traffic:
    """Cumulative traffic counters of one node."""

    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0
    rejected: int = 0

    def snapshot(self) -> tuple[int, int, int, int, int]:
        return (
            self.bytes_sent,
            self.bytes_received,
            self.messages_sent,
            self.messages_received,
            self.rejected,
        )


@dataclass(slots=True)
class _Pending:
    node: int
    virtual_time: float
    train_loss: float
    vector: Tensor
    traffic: tuple[int, int, int, int, int]


@dataclass(slots=True)
class RoundSummary:
    round: int
    nodes: int
    mean_test_accuracy: float
    min_test_accuracy: float
    max_test_accuracy: float
    consensus_distance: float
    virtual_time: float


@dataclass
class MetricsRecorder:
    """Collects round records and turns complete rounds into CSV rows."""

    num_nodes: int
    evaluate: Evaluator
    honest: list[bool] = field(default_factory=list)
    rows: list[tuple[object, ...]] = field(default_factory=list)
    rounds: list[RoundSummary] = field(default_factory=list)
    _pending: dict[int, list[_Pending]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.honest:
            self.honest = [True] * self.num_nodes

    def record(
        self,
        round_: int,
        node: int,
        *,
        now: float,
        train_loss: float,
        vector: Tensor,
        traffic: Traffic,
    ) -> None:
        """A node finished ``round_`` with model ``vector``."""
        entries = self._pending.setdefault(round_, [])
        entries.append(_Pending(node, now, train_loss, vector, traffic.snapshot()))
        if len(entries) == self.num_nodes:
            self._complete(round_)

    def flush(self) -> None:
        """Complete every round still waiting for nodes (end of run)."""
        for round_ in sorted(self._pending):
            self._complete(round_)

    def _complete(self, round_: int) -> None:
        entries = sorted(self._pending.pop(round_), key=lambda entry: entry.node)
        vectors = torch.stack([entry.vector for entry in entries])
        test_loss, test_accuracy = self.evaluate(vectors)
        mean = vectors.mean(dim=0)
        distances = (vectors - mean).pow(2).sum(dim=1).to(torch.float64)
        consensus = float(distances.mean())
        for entry, loss, accuracy, distance in zip(
            entries, test_loss.tolist(), test_accuracy.tolist(), distances.tolist(), strict=True
        ):
            self.rows.append(
                (
                    round_,
                    entry.node,
                    int(self.honest[entry.node]),
                    entry.virtual_time,
                    entry.train_loss,
                    loss,
                    accuracy,
                    distance,
                    consensus,
                    *entry.traffic,
                )
            )
        honest_accuracy = [
            accuracy
            for entry, accuracy in zip(entries, test_accuracy.tolist(), strict=True)
            if self.honest[entry.node]
        ] or [float("nan")]
        self.rounds.append(
            RoundSummary(
                round=round_,
                nodes=len(entries),
                mean_test_accuracy=sum(honest_accuracy) / len(honest_accuracy),
                min_test_accuracy=min(honest_accuracy),
                max_test_accuracy=max(honest_accuracy),
                consensus_distance=consensus,
                virtual_time=max(entry.virtual_time for entry in entries),
            )
        )

    def csv_text(self) -> str:
        """All rows as CSV, sorted by (round, node)."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(COLUMNS)
        for row in sorted(self.rows, key=lambda row: (row[0], row[1])):
            writer.writerow([repr(value) if isinstance(value, float) else value for value in row])
        return buffer.getvalue()
