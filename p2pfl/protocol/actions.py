"""Actions: imperatives a protocol core returns for its driver to carry out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from p2pfl.identity import NodeId
from p2pfl.wire import Envelope


@dataclass(frozen=True, slots=True)
class Send:
    """Deliver ``envelope`` to ``peer``; the same envelope may go to many peers."""

    peer: NodeId
    envelope: Envelope


@dataclass(frozen=True, slots=True)
class StartTraining:
    """Train ``vector`` for ``steps`` local steps, then report ``TrainingFinished``.

    At most one training is outstanding at a time.
    """

    vector: torch.Tensor
    steps: int
    round: int


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Close the connection to ``peer``."""

    peer: NodeId
    reason: str


@dataclass(frozen=True, slots=True)
class PeerMisbehaved:
    """``peer`` sent something unusable; the driver counts it and may ban the peer."""

    peer: NodeId
    reason: str


@dataclass(frozen=True, slots=True)
class SaveCheckpoint:
    """Persist the model: ``round`` is the next round to run, ``vector`` the model to run it on.

    ``loss`` is the training loss of the latest training this node finished before this
    checkpoint (NaN if it finished none yet): the loss a driver reports with the round, so no
    driver has to remember it. In ``dsgd``, ``gossip`` and the ``fedavg`` server it is the
    loss of the training that produced the round; a ``modest`` node that adopts a round it did
    not train reports its previous training's.
    """

    round: int
    vector: torch.Tensor
    loss: float


@dataclass(frozen=True, slots=True)
class Emit:
    """A metrics record (``name`` plus flat scalar fields) for logs and metrics files."""

    name: str
    fields: Mapping[str, float | int | str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Stop:
    """The core has run all its rounds; the driver may shut the node down."""

    reason: str


Action = Send | StartTraining | Disconnect | PeerMisbehaved | SaveCheckpoint | Emit | Stop
