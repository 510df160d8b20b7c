"""The discrete-event engine: many protocol cores in deterministic virtual time.

Theory of operation
-------------------
The engine is a driver, like the trio runtime: it owns no protocol logic. It keeps one heap
of ``(time, sequence, node, item)`` entries; the sequence number makes ties resolve in
insertion order, so a run is a pure function of the scenario and its seed. Popping an entry
turns it into a core event and carries out the actions the core returns:

* ``Send``: the envelope is framed once and verified once per process (every receiver of the
  same envelope shares the bytes and the verified result), then delivered to each receiver
  after a latency drawn for that link.
* ``StartTraining``: the training is parked and its completion scheduled at
  ``now + steps * step_time``. When the first parked training's completion comes due, every
  parked training is computed in one batched call (:mod:`sim.batched`); a training depends
  only on its inputs at its start, so deferring it changes nothing but speed.
* ``DeadlineReached``: after each ``handle`` the engine re-reads ``next_deadline()``; a timer
  entry whose time no longer matches the core's deadline is stale and skipped.
* ``SaveCheckpoint`` marks the end of a node's round for the metrics.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from p2pfl.errors import WireError
from p2pfl.protocol import Core
from p2pfl.protocol.actions import (
    Disconnect,
    Emit,
    PeerMisbehaved,
    SaveCheckpoint,
    Send,
    StartTraining,
    Stop,
)
from p2pfl.protocol.events import (
    DeadlineReached,
    Event,
    MessageReceived,
    PeerConnected,
    Started,
    TrainingFinished,
)
from p2pfl.wire import Envelope, decode_frame, encode_frame
from sim.batched import BatchedMLP
from sim.metrics import MetricsRecorder, Traffic
from sim.network import LatencyModel
from sim.population import Population


@dataclass(frozen=True, slots=True)
class _Timer:
    at: float


@dataclass(frozen=True, slots=True)
class _TrainingDue:
    pass


@dataclass(frozen=True, slots=True)
class _Delivery:
    sender: int
    envelope: Envelope
    frame_bytes: int


_Item = Event | _Timer | _TrainingDue | _Delivery
ProgressHook = Callable[["Engine"], None]


@dataclass(slots=True)
class _ParkedTraining:
    vector: Tensor
    steps: int


class Engine:
    """Runs one population of cores until every core stops or the horizon passes."""

    def __init__(
        self,
        population: Population,
        cores: list[Core],
        *,
        latency: LatencyModel,
        trainer: BatchedMLP,
        step_time: float,
        horizon: float | None = None,
        recorder: MetricsRecorder,
        on_round: ProgressHook | None = None,
    ) -> None:
        self.population = population
        self.cores = cores
        self.latency = latency
        self.trainer = trainer
        self.step_time = step_time
        self.horizon = horizon
        self.recorder = recorder
        self.on_round = on_round
        self.now = 0.0
        self.traffic = [Traffic() for _ in cores]
        self.events_log: list[dict[str, Any]] = []
        self._index = {core.node_id: index for index, core in enumerate(cores)}
        self._heap: list[tuple[float, int, int, _Item]] = []
        self._sequence = 0
        self._armed: list[float | None] = [None] * len(cores)
        self._parked: dict[int, _ParkedTraining] = {}
        self._trained: dict[int, tuple[Tensor, float, int]] = {}
        self._last_loss = [float("nan")] * len(cores)
        self._stopped = [False] * len(cores)

    def _push(self, at: float, node: int, item: _Item) -> None:
        heapq.heappush(self._heap, (at, self._sequence, node, item))
        self._sequence += 1

    def run(self) -> float:
        """Run to completion; returns the virtual time reached."""
        for node in range(len(self.cores)):
            for neighbour in self.population.neighbours[node]:
                self._push(0.0, node, PeerConnected(self.cores[neighbour].node_id))
            self._push(0.0, node, Started())
        while self._heap and not all(self._stopped):
            at, _, node, item = heapq.heappop(self._heap)
            if self.horizon is not None and at > self.horizon:
                self.now = self.horizon
                break
            self.now = at
            event = self._to_event(node, item)
            if event is None:
                continue
            self._carry_out(node, self.cores[node].handle(event, now=at))
            self._rearm(node)
        self.recorder.flush()
        return self.now

    def _to_event(self, node: int, item: _Item) -> Event | None:
        match item:
            case _Timer(at):
                return DeadlineReached() if self._armed[node] == at else None
            case _TrainingDue():
                if node not in self._trained:
                    self._train_parked()
                vector, loss, steps = self._trained.pop(node)
                self._last_loss[node] = loss
                return TrainingFinished(vector=vector, loss=loss, steps=steps)
            case _Delivery(sender, envelope, frame_bytes):
                traffic = self.traffic[node]
                traffic.bytes_received += frame_bytes
                traffic.messages_received += 1
                return MessageReceived(peer=self.cores[sender].node_id, envelope=envelope)
            case _:
                return item

    def _carry_out(self, node: int, actions: list[Any]) -> None:
        framed: dict[int, tuple[Envelope, int]] = {}
        for action in actions:
            match action:
                case Send(peer, envelope):
                    receiver = self._index.get(peer)
                    if receiver is None:
                        continue
                    verified, size = framed.get(id(envelope)) or self._frame(envelope)
                    framed[id(envelope)] = (verified, size)
                    traffic = self.traffic[node]
                    traffic.bytes_sent += size
                    traffic.messages_sent += 1
                    delay = self.latency.sample(node, receiver)
                    self._push(self.now + delay, receiver, _Delivery(node, verified, size))
                case StartTraining(vector, steps, _round):
                    self._parked[node] = _ParkedTraining(vector, steps)
                    self._push(self.now + steps * self.step_time, node, _TrainingDue())
                case SaveCheckpoint(round_, vector):
                    self.recorder.record(
                        round_ - 1,
                        node,
                        now=self.now,
                        train_loss=self._last_loss[node],
                        vector=vector.detach().clone(),
                        traffic=self.traffic[node],
                    )
                    if self.on_round is not None:
                        self.on_round(self)
                case PeerMisbehaved(peer, reason):
                    self.traffic[node].rejected += 1
                    self.events_log.append(
                        {
                            "time": self.now,
                            "node": node,
                            "event": "misbehaved",
                            "peer": peer.short(),
                            "reason": reason,
                        }
                    )
                case Disconnect(peer, reason):
                    self.events_log.append(
                        {
                            "time": self.now,
                            "node": node,
                            "event": "disconnect",
                            "peer": peer.short(),
                            "reason": reason,
                        }
                    )
                case Stop():
                    self._stopped[node] = True
                case Emit():
                    pass
                case _:
                    raise TypeError(f"engine cannot carry out {action!r}")

    def _frame(self, envelope: Envelope) -> tuple[Envelope, int]:
        frame = encode_frame(envelope)
        try:
            verified = decode_frame(frame)
        except WireError as exc:
            raise AssertionError(f"an honest core produced an invalid frame: {exc}") from exc
        return verified, len(frame)

    def _rearm(self, node: int) -> None:
        deadline = self.cores[node].next_deadline()
        if deadline != self._armed[node]:
            self._armed[node] = deadline
            if deadline is not None:
                self._push(max(deadline, self.now), node, _Timer(deadline))

    def _train_parked(self) -> None:
        # One vectorised call per (steps, batch size): nodes with few examples have their
        # batch capped at their data size, and a stacked minibatch needs one size.
        groups: dict[tuple[int, int], list[int]] = {}
        for node, parked in self._parked.items():
            key = (parked.steps, self.population.samplers[node].batch_size)
            groups.setdefault(key, []).append(node)
        for (steps, _batch), nodes in sorted(groups.items()):
            nodes.sort()
            vectors = torch.stack([self._parked[node].vector for node in nodes])
            trained, losses = self.trainer.train(
                vectors,
                [self.population.train_sets[node] for node in nodes],
                [self.population.samplers[node] for node in nodes],
                steps,
            )
            for row, node in enumerate(nodes):
                self._trained[node] = (trained[row], float(losses[row]), steps)
        self._parked.clear()
