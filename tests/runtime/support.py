"""Helpers shared by the runtime tests."""

from __future__ import annotations

import errno
import math
import os
import threading

import torch
import trio
import trio.testing

from p2pfl.identity import NodeId
from p2pfl.learn.base import EvalResult, Learner, TrainResult
from p2pfl.params import ParamLayout

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


class MemoryListener(trio.abc.Listener[trio.abc.Stream]):
    """A listener whose connections come from :meth:`MemoryNetwork.connect`."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[trio.abc.Stream](math.inf)
        self.closed = False

    def deliver(self, stream: trio.abc.Stream) -> None:
        self._send.send_nowait(stream)

    async def accept(self) -> trio.abc.Stream:
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise trio.ClosedResourceError("listener closed") from None

    async def aclose(self) -> None:
        self.closed = True
        self._receive.close()
        await trio.lowlevel.checkpoint()


class MemoryNetwork:
    """Nodes of one trio run linked by in-memory streams instead of sockets, so that they
    run on trio's ``MockClock``: one :class:`MemoryListener` per port, and per node a
    :class:`MemoryLinks` policy whose dials reach those listeners."""

    def __init__(self) -> None:
        self.listeners: dict[int, MemoryListener] = {}

    def listen(self, port: int) -> MemoryListener:
        listener = self.listeners[port] = MemoryListener()
        return listener

    def connect(self, port: int) -> trio.abc.Stream:
        """A stream to the listener on ``port``, like a TCP connect on one host.

        Raises:
            ConnectionRefusedError: nothing listens on ``port``.
        """
        listener = self.listeners.get(port)
        if listener is None or listener.closed:
            raise ConnectionRefusedError(errno.ECONNREFUSED, os.strerror(errno.ECONNREFUSED))
        ours, theirs = trio.testing.memory_stream_pair()
        listener.deliver(theirs)
        return ours


class MemoryLinks:
    """One node's :class:`~p2pfl.runtime.policy.LinkPolicy` on a :class:`MemoryNetwork`;
    links to the keys in ``cut_peers`` are down."""

    def __init__(self, network: MemoryNetwork) -> None:
        self.network = network
        self.cut_peers: set[NodeId] = set()
        self.dials: list[int] = []

    def link_up(self, peer: NodeId) -> bool:
        return peer not in self.cut_peers

    async def open_stream(self, host: str, port: int) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        self.dials.append(port)
        return self.network.connect(port)
