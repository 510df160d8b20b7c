"""The sans-IO protocol core: events in, actions out; no I/O, no clock, no global randomness.

Theory of operation
-------------------
A driver (the trio runtime, the simulator, a test) owns one core per node. It reports what
happened as events (:mod:`p2pfl.protocol.events`) together with the current time, carries out
the actions the core returns (:mod:`p2pfl.protocol.actions`), and wakes the core with
``DeadlineReached`` when ``next_deadline()`` comes. The core is deterministic: the same
events at the same times give the same actions, all randomness coming from the ``rng`` it was
built with.

Modes (``PROTOCOL_MODES``): ``dsgd`` (:mod:`p2pfl.protocol.dsgd`), ``gossip``
(:mod:`p2pfl.protocol.gossip`), ``modest`` (:mod:`p2pfl.protocol.modest`, sampled
committees over the membership view of :mod:`p2pfl.protocol.membership`) and ``fedavg``
(:mod:`p2pfl.protocol.fedavg`, one server and sampled clients, the federated reference); their
life cycles are tabulated in :mod:`p2pfl.protocol.phases`, and what each needs from its
population is in its :class:`ModeTraits` (:func:`mode_traits`). Drivers report
``PeerConnected`` for each neighbour they reach; every neighbour starts out not connected (the
simulator reports ``NeighboursConnected``, all of them at once, before ``Started``). A node
leaving for good is told ``LeaveRequested``; its driver carries out the goodbye the core
returns (``modest``'s LEAVE announcement) before it closes the connections.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import torch

from p2pfl.identity import Identity, NodeId
from p2pfl.merge.base import MergeRule, Probe
from p2pfl.params import ParamLayout
from p2pfl.protocol import dsgd as dsgd
from p2pfl.protocol import fedavg as fedavg
from p2pfl.protocol import gossip as gossip
from p2pfl.protocol import modest as modest
from p2pfl.protocol.actions import (
    Action,
    Disconnect,
    Emit,
    PeerMisbehaved,
    SaveCheckpoint,
    Send,
    StartTraining,
    Stop,
)
from p2pfl.protocol.config import CoreConfig, ProtocolSettings
from p2pfl.protocol.core import (
    PROTOCOL_MODES,
    Core,
    CoreFactory,
    ModeTraits,
    mode_traits,
    model_kinds,
    register_protocol_mode,
)
from p2pfl.protocol.events import (
    DeadlineReached,
    Event,
    LeaveRequested,
    MessageReceived,
    NeighboursConnected,
    PeerConnected,
    PeerDisconnected,
    Started,
    TrainingFinished,
)


def make_core(
    config: CoreConfig,
    *,
    identity: Identity,
    neighbours: Collection[NodeId],
    vector: torch.Tensor,
    samples: int,
    merge: MergeRule,
    rng: np.random.Generator,
    start_round: int = 0,
    seq_start: int = 0,
    layout: ParamLayout | None = None,
    probe: Probe | None = None,
    known_peers: Collection[NodeId] = (),
) -> Core:
    """Build the core of the mode ``config.mode``.

    Args:
        config: protocol settings; validated here.
        identity: this node's key; it signs every model the core sends.
        neighbours: the peers this node exchanges models with (not itself).
        vector: the initial flat model (1-D float; the core keeps a float32 copy).
        samples: this node's training-set size, sent with its models and used as its own
            merge weight.
        merge: the merge rule (see :func:`p2pfl.merge.make_merge_rule`).
        rng: the node's own random stream (gossip: push jitter and recipients).
        start_round: rounds already completed (resuming from a checkpoint).
        seq_start: the first sequence number to use; a resumed node must pass a number above
            every one it sent before, or its neighbours reject its models as replays.
        layout: the parameter layout, handed to merge rules that work per tensor.
        probe: per-class recall of a vector on local held-out data, for merge rules that
            judge updates by performance (Bristle); None where no such data exists.
        known_peers: peers beyond the neighbours this node knows of (a runtime's bootstrap
            list); modes with a membership view (``modest``, membership-sampled ``gossip``)
            start their view with the neighbours and these.

    Raises:
        ConfigError: a config field or argument is invalid; the message names it.
    """
    factory = PROTOCOL_MODES[config.mode]
    return factory(
        config,
        identity=identity,
        neighbours=neighbours,
        vector=vector,
        samples=samples,
        merge=merge,
        rng=rng,
        start_round=start_round,
        seq_start=seq_start,
        layout=layout,
        probe=probe,
        known_peers=known_peers,
    )


__all__ = [
    "PROTOCOL_MODES",
    "Action",
    "Core",
    "CoreConfig",
    "CoreFactory",
    "DeadlineReached",
    "Disconnect",
    "Emit",
    "Event",
    "LeaveRequested",
    "MessageReceived",
    "ModeTraits",
    "NeighboursConnected",
    "PeerConnected",
    "PeerDisconnected",
    "PeerMisbehaved",
    "ProtocolSettings",
    "SaveCheckpoint",
    "Send",
    "StartTraining",
    "Started",
    "Stop",
    "TrainingFinished",
    "make_core",
    "mode_traits",
    "model_kinds",
    "register_protocol_mode",
]
