"""What a node reports about its rounds: checkpoints, evaluation, history, the round record.

Theory of operation
-------------------
The pump tells :class:`Reporting` two things, in this order for every round: the core's
``Emit("round")`` fields (:meth:`Reporting.round_closed`), and the core's ``SaveCheckpoint``
with the training loss it carries (:meth:`Reporting.save`). ``save`` writes the checkpoint atomically, calls ``on_round``, and
queues the round for the evaluator task (:meth:`Reporting.evaluate`), which evaluates saved
models one at a time, in round order, in a worker thread, off the pump. Once a round is
evaluated it is appended to :attr:`Reporting.history`, the ``last_*`` gauges are set, and the
round is logged: **one** ``round`` record per round, whose fields are the core's round fields
together with the evaluation (``round`` is the 0-based index of the round completed, as in
the history), rendered as a line of text or one JSON object by the log handler.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import trio

from p2pfl.checkpoint import save_checkpoint
from p2pfl.errors import ConfigError
from p2pfl.identity import NodeId
from p2pfl.learn.base import Learner
from p2pfl.runtime.logs import log_event
from p2pfl.runtime.status import Metrics

log = logging.getLogger("p2pfl.node")

LOSS_GAUGES = ("last_train_loss", "last_test_loss", "last_test_accuracy")


class Reporting:
    """Checkpoints, evaluation and the per-round history of one node.

    Attributes:
        history: one dict per completed round: ``round`` (0-based index of the round just
            completed), ``loss`` (its training loss), ``test_loss``, ``test_accuracy``,
            ``peers`` (connected when it ended).
    """

    def __init__(
        self,
        node_id: NodeId,
        learner: Learner,
        metrics: Metrics,
        *,
        checkpoint_file: Path | None,
        peers: Callable[[], int],
        on_round: Callable[[int, torch.Tensor, float], None] | None = None,
    ) -> None:
        """Nothing is saved or evaluated until the pump reports a round.

        Args:
            node_id: the node's key (in the round records and the checkpoint).
            learner: evaluates the saved models.
            metrics: the node's metrics (sets the ``last_*`` gauges to NaN).
            checkpoint_file: where checkpoints go; ``None`` keeps none.
            peers: the number of connected peers now.
            on_round: see :class:`~p2pfl.runtime.node.Node`.
        """
        self.node_id = node_id
        self.learner = learner
        self.metrics = metrics
        self.checkpoint_file = checkpoint_file
        self._peers = peers
        self._on_round = on_round
        self.history: list[dict[str, Any]] = []
        self._changed = trio.Event()
        self._stopped = False
        self._round_fields: dict[str, Any] = {}
        self._evals_send, self._evals_receive = trio.open_memory_channel[
            tuple[int, torch.Tensor, float, int, dict[str, Any]]
        ](math.inf)
        for name in LOSS_GAUGES:
            metrics.set(name, math.nan)

    def round_closed(self, fields: Mapping[str, Any]) -> None:
        """The core's ``round`` record; logged with the next saved round's evaluation."""
        self._round_fields = dict(fields)

    async def save(self, round_: int, vector: torch.Tensor, loss: float) -> None:
        """Checkpoint ``vector`` as the start of round ``round_`` (``loss``: the training loss
        the core reports with it), then queue its evaluation.

        Raises:
            ConfigError: the checkpoint directory can no longer be written.
        """
        target = self.checkpoint_file
        if target is not None:
            info = {"saved_at": time.time(), "loss": loss}
            try:
                await trio.to_thread.run_sync(
                    lambda: save_checkpoint(
                        target, round=round_, vector=vector, node=self.node_id.hex(), info=info
                    )
                )
            except OSError as exc:
                # The directory was writable at start (prepare_checkpoint_dir); it no longer
                # is. Going on would lose every round from here on a restart.
                raise ConfigError(
                    "node.checkpoint_dir",
                    str(target.parent),
                    f"a directory this node can write (saving round {round_} failed: "
                    f"{exc.strerror or exc}); the node stopped",
                ) from None
        if self._on_round is not None:
            self._on_round(round_ - 1, vector, loss)
        fields, self._round_fields = self._round_fields, {}
        self._evals_send.send_nowait((round_, vector, loss, self._peers(), fields))

    def close(self) -> None:
        """No more rounds: the evaluator ends once it has evaluated those queued."""
        self._evals_send.close()

    def stopped(self) -> None:
        """The node stopped: wake every :meth:`wait_rounds`."""
        self._stopped = True
        self._changed.set()

    async def wait_rounds(self, count: int) -> None:
        """Return once :attr:`history` holds at least ``count`` rounds (or the node stopped)."""
        while len(self.history) < count and not self._stopped:
            await self._changed.wait()

    async def evaluate(self, done: trio.Event) -> None:
        """Evaluate saved models one at a time, in round order, off the pump; set ``done``
        when the queue is closed and empty."""
        try:
            async for round_, vector, loss, peers, fields in self._evals_receive:
                result = await trio.to_thread.run_sync(self.learner.evaluate, vector)
                completed = round_ - 1
                entry: dict[str, Any] = {
                    "round": completed,
                    "loss": loss,
                    "test_loss": result.loss,
                    "test_accuracy": result.accuracy,
                    "peers": peers,
                }
                self.history.append(entry)
                self._changed.set()
                self._changed = trio.Event()
                self.metrics.set("last_train_loss", entry["loss"])
                self.metrics.set("last_test_loss", result.loss)
                self.metrics.set("last_test_accuracy", result.accuracy)
                log_event(
                    log,
                    logging.INFO,
                    "round",
                    "node %s round=%d loss=%.4f test_loss=%.4f test_accuracy=%.4f peers=%d",
                    self.node_id,
                    completed,
                    entry["loss"],
                    result.loss,
                    result.accuracy,
                    peers,
                    **{**fields, "node": self.node_id.short(), **entry},
                )
        finally:
            done.set()
