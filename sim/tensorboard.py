"""TensorBoard scalars per round (``p2pfl-sim run --tensorboard DIR``).

An optional dependency: the ``tensorboard`` package (``pip install
'p2pfl-gossip[tensorboard]'``), written through ``torch.utils.tensorboard``. Each completed
round ``r`` becomes step ``r`` of these scalars:

* ``accuracy/mean``, ``accuracy/min``, ``accuracy/max``: test accuracy over the honest nodes
  (left out for a round not evaluated, see ``metrics.eval_every``);
* ``consensus_distance``: mean squared distance of the models to their mean;
* ``virtual_time``: when the round completed (wall seconds in live mode);
* ``traffic/megabytes_sent``: megabytes sent by all nodes so far;
* ``nodes``: nodes that reported the round.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from sim.metrics import RoundSummary

EXTRA_HINT = "--tensorboard needs the tensorboard package: pip install 'p2pfl-gossip[tensorboard]'"


class RoundScalars:
    """Writes each completed round's scalars into an event file under ``logdir``.

    Raises:
        ImportError: the ``tensorboard`` package is not installed; the message names the
            extra to install.
    """

    def __init__(self, logdir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError(EXTRA_HINT) from exc
        self._writer = SummaryWriter(log_dir=str(logdir))

    def write(self, rounds: Sequence[RoundSummary], *, bytes_sent: int) -> None:
        """Add the scalars of ``rounds`` (completed since the last call); ``bytes_sent`` is
        the traffic total now, recorded at the last of them."""
        for summary in rounds:
            step = summary.round
            scalars = {
                "accuracy/mean": summary.mean_test_accuracy,
                "accuracy/min": summary.min_test_accuracy,
                "accuracy/max": summary.max_test_accuracy,
                "consensus_distance": summary.consensus_distance,
                "virtual_time": summary.virtual_time,
                "nodes": float(summary.nodes),
            }
            for tag, value in scalars.items():
                if math.isfinite(value):
                    self._writer.add_scalar(tag, value, global_step=step)
        if rounds:
            self._writer.add_scalar(
                "traffic/megabytes_sent", bytes_sent / 1e6, global_step=rounds[-1].round
            )
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
