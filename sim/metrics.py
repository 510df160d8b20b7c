"""Per-node, per-round metrics and the files a run writes.

A node's round r is recorded when its core asks to checkpoint round r+1. Rows of a round are
completed together once every *active* node has reported it (or at the end of the run),
because two columns need all of them: test accuracy is evaluated for the whole round in one
batched call, and the consensus distance is the mean squared distance of the round's models
to their mean. A node is active while it is online; a crashed node is never active again, an
offline (churned) node is active again once it rejoins. Nodes going inactive can complete
waiting rounds, so memory never holds more than the rounds some active node still owes.

A node that reports a round after it was completed (a churned node catching up) gets a *late*
row: its own accuracy and loss, the round's consensus distance, and ``distance_to_mean``
empty (NaN), since the round's mean is gone.

``component`` and ``component_size`` say which connected component of the live graph (online
nodes, links not cut) the node was in when it reported: the component's smallest node index
and its number of nodes. Rows are written in (round, node) order with ``repr`` floats, so one
seed gives one byte string.

``reporting`` says which nodes report rounds at all (default: every node). With a server mode
(``fedavg``) only the server does: it holds the global model, so its row *is* the round's
model and the per-round summaries are the global model's accuracy; clients' local models are
never recorded, and rounds do not wait for them.

``honest`` is 0 for Byzantine nodes (:mod:`sim.adversaries`); the per-round summaries
(mean/min/max accuracy) cover honest nodes only. ``attack_success`` is the attack success rate
of the node's model for a targeted attack (share of the attack's test inputs predicted as its
target; see :class:`sim.adversaries.AttackSuccess`), NaN when the scenario has none.
"""

from __future__ import annotations

import csv
import ctypes
import io
import platform
import sys
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
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
    "relay",
    "component",
    "component_size",
    "attack_success",
)

Evaluator = Callable[[Tensor], tuple[Tensor, Tensor]]
SuccessRate = Callable[[Tensor], Tensor]
"""Attack success rate of each of B model vectors [B, P] -> [B]."""


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
    component: int
    component_size: int


@dataclass(slots=True)
class RoundSummary:
    round: int
    nodes: int
    mean_test_accuracy: float
    min_test_accuracy: float
    max_test_accuracy: float
    consensus_distance: float
    virtual_time: float


_RELEASED = torch.empty(0)
"""What a completed round's pending entries hold instead of their models."""

_Scores = tuple[list[float], list[float], list[float]] | None
"""A round's test losses, accuracies and attack success rates (None: nothing to evaluate)."""


@dataclass(slots=True)
class _Unsettled:
    """A completed round (or late row) waiting for its evaluation to become rows."""

    evaluation: Future[_Scores]
    finish: Callable[[_Scores], None]

    def finish_now(self) -> None:
        self.finish(self.evaluation.result())


def _done(scores: _Scores) -> Future[_Scores]:
    future: Future[_Scores] = Future()
    future.set_result(scores)
    return future


TRIM_BYTES = 32 << 20
"""A round whose models take at least this much hands the C heap's free pages back to the
system once they are stacked and again once they are evaluated (:func:`trim_heap`)."""
EVALUATION_SLICE_BYTES = 128 << 20
"""Models (bytes) per slice of a large round's evaluation, with a heap trim between slices
(:meth:`MetricsRecorder._evaluation_slices`): 10,000 nodes of the standard workload are one
slice (no extra trim, each costs 50-120 ms there), 100,000 nodes eight."""
DISTANCE_CHUNK = 1 << 20
"""Parameters (rows times model size) per chunk of the distances to a round's mean."""


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library is another (musl, macOS, Windows)."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


_MALLOC_TRIM = _malloc_trim()


def trim_heap() -> None:
    """Return the C heap's free pages to the system (glibc; a no-op elsewhere).

    Why: a round's models are n small tensors (one per node), freed together once they are
    stacked. glibc keeps such freed memory inside its heap, where the large tensors that
    follow (the next round's training, an evaluation's chunks) do not fit, so they are mapped
    afresh: at 10,000 nodes of the standard workload, 0.4 GB stayed freed but resident, and
    with the evaluation worker the peak RSS was 1.39-1.42 GB; trimmed once a round is stacked
    and once it is evaluated, 1.19-1.21 GB (a trim costs 50-120 ms of CPU at that size;
    docs/benchmarks.md, "Evaluation (session 4)").
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _large(vectors: Tensor) -> bool:
    return vectors.numel() * vectors.element_size() >= TRIM_BYTES


def _distances_to_mean(vectors: Tensor) -> Tensor:
    """Each row's squared distance to the rows' mean (float64 ``[n]``), a few rows at a time:
    the same bits as ``(vectors - mean).pow(2).sum(dim=1)`` (each row's sum is its own), but
    without that expression's two ``[n, P]`` temporaries, which at 10,000 nodes made the round's
    completion the run's peak of memory (and cost page faults)."""
    mean = vectors.mean(dim=0)
    rows = max(1, DISTANCE_CHUNK // max(vectors.shape[1], 1))
    parts = [
        (vectors[start : start + rows] - mean).pow_(2).sum(dim=1)
        for start in range(0, vectors.shape[0], rows)
    ]
    return torch.cat(parts).to(torch.float64)


@dataclass
class MetricsRecorder:
    """Collects round records and turns complete rounds into CSV rows."""

    num_nodes: int
    evaluate: Evaluator
    honest: list[bool] = field(default_factory=list)
    relay: list[bool] = field(default_factory=list)
    reporting: list[bool] = field(default_factory=list)
    on_complete: Callable[[int], None] | None = None
    attack_success: SuccessRate | None = None
    eval_every: int = 1
    """Evaluate (test loss, accuracy, attack success) every k-th round only, and always
    ``last_round``; other rounds' rows leave those columns NaN."""
    last_round: int | None = None
    evaluation_rows: int = 0
    """Rows ``evaluate`` scores together (0: unknown). When known, a large round is evaluated
    in slices of a multiple of it, with the heap trimmed between slices (:meth:`_evaluate`);
    every row is scored in the same company as in one call, so with the same bits."""
    executor: Executor | None = None
    """Where a completed round's evaluation runs (the engine sets a worker thread while it
    runs): the caller goes on at once and the round's rows and summary appear when the
    evaluation is done, in completion order. None: evaluated at once, in the caller."""
    _rows: list[tuple[object, ...]] = field(default_factory=list)
    _rounds: list[RoundSummary] = field(default_factory=list)
    _unsettled: deque[_Unsettled] = field(default_factory=deque)
    _pending: dict[int, list[_Pending]] = field(default_factory=dict)
    _pending_nodes: dict[int, set[int]] = field(default_factory=dict)
    """The nodes in ``_pending[round]``, so a status change costs O(rounds), not O(nodes)."""
    _reported_active: dict[int, int] = field(default_factory=dict)
    _completed: dict[int, float] = field(default_factory=dict)
    _active: list[bool] = field(default_factory=list)
    _active_count: int = 0

    def __post_init__(self) -> None:
        if not self.honest:
            self.honest = [True] * self.num_nodes
        if not self.relay:
            self.relay = [False] * self.num_nodes
        if not self.reporting:
            self.reporting = [True] * self.num_nodes
        self._active = list(self.reporting)
        self._active_count = sum(self.reporting)

    @property
    def rows(self) -> list[tuple[object, ...]]:
        """Every row so far (waits for evaluations still running)."""
        self.settle()
        return self._rows

    @property
    def rounds(self) -> list[RoundSummary]:
        """Every completed round's summary so far (waits for evaluations still running)."""
        self.settle()
        return self._rounds

    def settled_rounds(self) -> list[RoundSummary]:
        """The summaries of the rounds whose evaluation is done, without waiting (progress)."""
        self.settle(wait=False)
        return self._rounds

    def settle(self, *, wait: bool = True) -> None:
        """Turn finished evaluations into rows and summaries, oldest first; with ``wait``,
        wait for those still running."""
        while self._unsettled and (wait or self._unsettled[0].evaluation.done()):
            # Taken off the queue once its rows are in: an interrupt while waiting for the
            # evaluation leaves the round queued for the flush that saves the run.
            self._unsettled[0].finish_now()
            self._unsettled.popleft()

    def set_active(self, node: int, active: bool) -> None:
        """``node`` went offline or died (False) or came back (True)."""
        if not self.reporting[node] or self._active[node] == active:
            return
        self._active[node] = active
        self._active_count += 1 if active else -1
        step = 1 if active else -1
        for round_, nodes in self._pending_nodes.items():
            if node in nodes:
                self._reported_active[round_] += step
        if not active:
            for round_ in sorted(self._pending):
                self._complete_if_due(round_)

    def record(
        self,
        round_: int,
        node: int,
        *,
        now: float,
        train_loss: float,
        vector: Tensor,
        traffic: Traffic,
        component: int = 0,
        component_size: int = 0,
    ) -> None:
        """A node finished ``round_`` with model ``vector``."""
        entry = _Pending(
            node, now, train_loss, vector, traffic.snapshot(), component, component_size
        )
        if round_ in self._completed:
            self._late(round_, entry)
            return
        self._pending.setdefault(round_, []).append(entry)
        self._pending_nodes.setdefault(round_, set()).add(node)
        self._reported_active[round_] = self._reported_active.get(round_, 0) + int(
            self._active[node]
        )
        self._complete_if_due(round_)

    def flush(self) -> None:
        """Complete every round still waiting for nodes (end of run) and wait for every
        evaluation."""
        for round_ in sorted(self._pending):
            self._complete(round_)
        self.settle()

    def _complete_if_due(self, round_: int) -> None:
        if round_ in self._pending and self._reported_active[round_] >= self._active_count:
            self._complete(round_)

    def _row(
        self,
        round_: int,
        entry: _Pending,
        loss: float,
        accuracy: float,
        distance: float,
        consensus: float,
        success: float = float("nan"),
    ) -> tuple[object, ...]:
        return (
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
            int(self.relay[entry.node]),
            entry.component,
            entry.component_size,
            success,
        )

    def _evaluated(self, round_: int) -> bool:
        return (round_ + 1) % self.eval_every == 0 or round_ == self.last_round

    def _evaluate(self, round_: int, vectors: Tensor) -> tuple[list[float], list[float]]:
        if not self._evaluated(round_):
            skipped = [float("nan")] * vectors.shape[0]
            return skipped, skipped
        slices = self._evaluation_slices(vectors)
        losses: list[float] = []
        accuracies: list[float] = []
        for index, rows in enumerate(slices):
            if index:
                trim_heap()  # the previous slice's chunks (see _evaluation_slices)
            loss, accuracy = self.evaluate(vectors[rows])
            losses += loss.tolist()
            accuracies += accuracy.tolist()
        return losses, accuracies

    def _evaluation_slices(self, vectors: Tensor) -> list[slice]:
        """The row slices a round is evaluated in: one, unless ``evaluation_rows`` is known
        and its models take more than :data:`EVALUATION_SLICE_BYTES`; then slices of about
        that much each, a multiple of ``evaluation_rows`` long.

        Why: an evaluation's chunks are large temporaries allocated and freed thousands of
        times; once glibc's mmap threshold has risen (it follows the largest block freed, up
        to 32 MB) they come from the heap, between the loop's small objects, and the freed
        space is not always reused: at 100,000 nodes of the standard workload the last
        round's evaluation alone raised RSS by 3.4 GiB (and, by the luck of placement, by
        more in other runs), all of it free and handed back by one trim
        (docs/benchmarks.md, "Scale (session 5)").
        """
        count = vectors.shape[0]
        total = vectors.numel() * vectors.element_size()
        if not self.evaluation_rows or not count or total <= EVALUATION_SLICE_BYTES:
            return [slice(0, count)]
        chunk_bytes = total // count * self.evaluation_rows
        step = self.evaluation_rows * max(1, EVALUATION_SLICE_BYTES // max(chunk_bytes, 1))
        return [slice(start, min(start + step, count)) for start in range(0, count, step)]

    def _success(self, round_: int, vectors: Tensor) -> list[float]:
        if self.attack_success is None or not self._evaluated(round_):
            return [float("nan")] * vectors.shape[0]
        return [float(value) for value in self.attack_success(vectors).tolist()]

    def _late(self, round_: int, entry: _Pending) -> None:
        vectors = entry.vector.unsqueeze(0)
        test_loss, test_accuracy = self._evaluate(round_, vectors)
        row = self._row(
            round_,
            entry,
            float(test_loss[0]),
            float(test_accuracy[0]),
            float("nan"),
            self._completed[round_],
            self._success(round_, vectors)[0],
        )
        # Behind the rounds still being evaluated, so rows keep the order of a serial run.
        self._defer(_done(None), lambda _: self._rows.append(row))

    def _scores(self, round_: int, vectors: Tensor) -> _Scores:
        test_loss, test_accuracy = self._evaluate(round_, vectors)
        scores = test_loss, test_accuracy, self._success(round_, vectors)
        if self._evaluated(round_) and _large(vectors):
            trim_heap()  # the evaluation's chunks, freed between the loop's small objects
        return scores

    def _complete(self, round_: int) -> None:
        asynchronous = self.executor is not None and self._evaluated(round_)
        if asynchronous:
            # One evaluation in flight at most, finished before this round's models are
            # stacked: a round's [n, P] stack is the largest thing the recorder holds.
            # (Before the round leaves _pending: an interrupt in this wait loses nothing.)
            self.settle()
        entries = sorted(self._pending.pop(round_), key=lambda entry: entry.node)
        del self._pending_nodes[round_]
        del self._reported_active[round_]
        vectors = torch.stack([entry.vector for entry in entries])
        for entry in entries:
            entry.vector = _RELEASED  # the stack holds them now; rows need the rest only
        if _large(vectors):
            trim_heap()
        distances = _distances_to_mean(vectors)
        consensus = float(distances.mean())
        self._completed[round_] = consensus
        if asynchronous:
            assert self.executor is not None
            evaluation = self.executor.submit(self._scores, round_, vectors)
        else:
            evaluation = _done(self._scores(round_, vectors))
        self._defer(
            evaluation,
            lambda scores: self._finish(round_, entries, distances.tolist(), consensus, scores),
        )
        if self.on_complete is not None:
            self.on_complete(round_)

    def _defer(self, evaluation: Future[_Scores], finish: Callable[[_Scores], None]) -> None:
        self._unsettled.append(_Unsettled(evaluation, finish))
        self.settle(wait=False)

    def _finish(
        self,
        round_: int,
        entries: list[_Pending],
        distances: list[float],
        consensus: float,
        scores: _Scores,
    ) -> None:
        assert scores is not None
        test_loss, test_accuracy, successes = scores
        rows: list[tuple[object, ...]] = []
        for entry, loss, accuracy, distance, success in zip(
            entries,
            test_loss,
            test_accuracy,
            distances,
            successes,
            strict=True,
        ):
            rows.append(self._row(round_, entry, loss, accuracy, distance, consensus, success))
        honest_accuracy = [
            accuracy
            for entry, accuracy in zip(entries, test_accuracy, strict=True)
            if self.honest[entry.node]
        ] or [float("nan")]
        self._rounds.append(
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
        self._rows.extend(rows)  # added last, after everything that can fail or be interrupted

    def csv_text(self) -> str:
        """All rows as CSV, sorted by (round, node)."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(COLUMNS)
        for row in sorted(self.rows, key=lambda row: (row[0], row[1])):
            writer.writerow([repr(value) if isinstance(value, float) else value for value in row])
        return buffer.getvalue()
