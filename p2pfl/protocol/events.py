"""Events: past-tense facts a driver reports to a protocol core."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from p2pfl.identity import NodeId
from p2pfl.wire import Envelope


@dataclass(frozen=True, slots=True)
class Started:
    """The driver is ready; the core may begin its first round."""


@dataclass(frozen=True, slots=True)
class PeerConnected:
    """An authenticated connection to ``peer`` is up (handshake done)."""

    peer: NodeId


@dataclass(frozen=True, slots=True)
class NeighboursConnected:
    """Authenticated connections to every configured neighbour are up.

    Means the same as one ``PeerConnected`` per neighbour, in key order, at O(1) cost for
    the core; a driver that reaches all neighbours at once (the simulator at its start) says
    this instead, so a dense graph does not cost a core one event per neighbour.
    """


@dataclass(frozen=True, slots=True)
class PeerDisconnected:
    """The connection to ``peer`` is gone."""

    peer: NodeId


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """A frame from ``peer`` parsed and its signature verified by ``p2pfl.wire``.

    ``peer`` is who the transport authenticated; the core checks it against the envelope's
    sender.
    """

    peer: NodeId
    envelope: Envelope


@dataclass(frozen=True, slots=True)
class TrainingFinished:
    """The training asked for by the last ``StartTraining`` is done."""

    vector: torch.Tensor
    loss: float
    steps: int


@dataclass(frozen=True, slots=True)
class DeadlineReached:
    """The time the core gave in ``next_deadline()`` has come."""


@dataclass(frozen=True, slots=True)
class LeaveRequested:
    """The node is leaving for good (its operator stopped it: SIGTERM, ``Node.request_stop``).

    The core says goodbye as its mode does (``modest``: a signed LEAVE announcement, and a
    ``NACK`` for every model it holds for aggregation, so trainers fail over at once) and
    returns ``Stop``; the driver carries out those actions before it closes the
    connections. A training still outstanding may be reported afterwards; it is dropped.
    """


Event = (
    Started
    | PeerConnected
    | NeighboursConnected
    | PeerDisconnected
    | MessageReceived
    | TrainingFinished
    | DeadlineReached
    | LeaveRequested
)
