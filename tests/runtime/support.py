"""Helpers shared by the runtime tests."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
import trio

from p2pfl.learn.base import EvalResult, Learner, TrainResult
from p2pfl.params import ParamLayout
from p2pfl.runtime.policy import LinkPolicy
from p2pfl.testing import MemoryLinks, MemoryNetwork

GATE_TIMEOUT = 90.0


class GatedLearner:
    """A learner whose training number ``gate_at`` (0-based) waits, in its worker thread,
    for ``gate`` to open; ``started`` is set when that training begins."""

    def __init__(self, inner: Learner, gate: threading.Event, gate_at: int = 0) -> None:
        self.inner = inner
        self.gate = gate
        self.gate_at = gate_at
        self.trainings = 0
        self.started = threading.Event()

    @property
    def layout(self) -> ParamLayout:
        return self.inner.layout

    @property
    def num_samples(self) -> int:
        return self.inner.num_samples

    def initial_vector(self) -> torch.Tensor:
        return self.inner.initial_vector()

    def train(self, vector: torch.Tensor, steps: int, *, round: int | None = None) -> TrainResult:
        if self.trainings == self.gate_at:
            self.started.set()
            assert self.gate.wait(GATE_TIMEOUT), "the gate never opened"
        self.trainings += 1
        return self.inner.train(vector, steps, round=round)

    def evaluate(self, vector: torch.Tensor) -> EvalResult:
        return self.inner.evaluate(vector)


Listeners = Sequence[trio.abc.Listener[trio.abc.Stream]]


async def bind_nodes(
    n: int, network: MemoryNetwork | None, *, base_port: int
) -> tuple[list[int], list[Listeners]]:
    """Ports and listeners for ``n`` nodes, bound before any node runs: on ``network``
    (ports ``base_port + i``) or, without one, TCP on 127.0.0.1 (ports the OS picks)."""
    if network is not None:
        ports = [base_port + i for i in range(n)]
        return ports, [[network.listen(port)] for port in ports]
    sockets = [await trio.open_tcp_listeners(0, host="127.0.0.1") for _ in range(n)]
    return [int(listeners[0].socket.getsockname()[1]) for listeners in sockets], list(sockets)


def links_on(network: MemoryNetwork | None) -> LinkPolicy | None:
    """A node's link policy: dials through ``network``, or TCP (the node's default)."""
    return MemoryLinks(network) if network is not None else None
