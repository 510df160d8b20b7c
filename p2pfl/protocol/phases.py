"""Phases of a protocol core and, for every mode, the table of allowed transitions.

Theory of operation
-------------------
A core is always in exactly one :class:`Phase`. The phase answers the two questions every
event raises: *is a training outstanding?* (only in ``TRAINING``) and *is the core still
running?* (not in ``DONE``). Everything else a mode remembers (buffers, timers, counters)
lives next to the phase, not in it.

Each mode moves between phases only along the edges of its table below, as h11's
``_state.py`` does for HTTP. The value of each edge says what triggers it; the code that
takes an edge calls :meth:`PhaseMachine.goto`, which refuses an edge that is not in the table,
so this file is the whole picture of a mode's life cycle. One edge is common to every mode and
so in no table: from any phase to ``DONE`` on ``LeaveRequested`` (:meth:`PhaseMachine.leave`).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from p2pfl.errors import LocalProtocolError


class Phase(enum.Enum):
    """Where a core is in its life cycle."""

    IDLE = "idle"
    """Built, waiting for ``Started``."""
    TRAINING = "training"
    """A ``StartTraining`` is outstanding; the next ``TrainingFinished`` answers it."""
    COLLECTING = "collecting"
    """dsgd: own model trained and sent; waiting for the neighbours' models of this round.
    fedavg server: the global model sent to the sampled clients; waiting for their models."""
    WAITING = "waiting"
    """gossip: no training outstanding, nothing buffered; waiting for a model or a push tick.
    modest: no training outstanding; answering pings, aggregating, waiting to be sampled.
    fedavg client: waiting for the server's next model; fedavg server: no client connected."""
    DONE = "done"
    """``Stop`` was returned; later events change nothing."""


Transitions = Mapping[Phase, Mapping[Phase, str]]
"""``table[from_phase][to_phase]`` = what triggers that edge."""

DSGD_TRANSITIONS: Transitions = {
    Phase.IDLE: {
        Phase.TRAINING: "Started",
        Phase.DONE: "Started with start_round >= rounds",
    },
    Phase.TRAINING: {
        Phase.COLLECTING: "TrainingFinished (own model sealed and sent)",
    },
    Phase.COLLECTING: {
        Phase.TRAINING: "round-r models from every connected neighbour, or round_timeout; merged",
        Phase.DONE: "the last round merged",
    },
    Phase.DONE: {},
}

GOSSIP_TRANSITIONS: Transitions = {
    Phase.IDLE: {
        Phase.TRAINING: "Started",
        Phase.DONE: "Started with start_round >= rounds",
    },
    Phase.TRAINING: {
        Phase.TRAINING: "TrainingFinished with models buffered; merged and training again",
        Phase.WAITING: "TrainingFinished with nothing buffered",
        Phase.DONE: "TrainingFinished of the last round",
    },
    Phase.WAITING: {
        Phase.TRAINING: "a model arrived (merged), or a push tick with nothing received",
    },
    Phase.DONE: {},
}

MODEST_TRANSITIONS: Transitions = {
    Phase.IDLE: {
        Phase.WAITING: "Started (a node of the first sample trains right after)",
        Phase.DONE: "Started with start_round >= rounds",
    },
    Phase.TRAINING: {
        Phase.WAITING: "TrainingFinished: the model goes to the aggregators (or, stale, is "
        "dropped)",
    },
    Phase.WAITING: {
        Phase.TRAINING: "selected as a trainer of the round whose model the node holds "
        "(an aggregated model adopted, or the first sample at Started)",
        Phase.DONE: "the final model adopted (and, by its aggregator, sent on)",
    },
    Phase.DONE: {},
}

FEDAVG_TRANSITIONS: Transitions = {
    Phase.IDLE: {
        Phase.COLLECTING: "server: Started; the global model sent to the sampled clients",
        Phase.WAITING: "client: Started; server: Started with no client connected",
        Phase.DONE: "Started with start_round >= rounds",
    },
    Phase.COLLECTING: {
        Phase.COLLECTING: "server: every sampled model in, or round_timeout; averaged, the "
        "next round sent",
        Phase.WAITING: "server: round closed with no client connected",
        Phase.DONE: "server: the last round averaged and the final model sent",
    },
    Phase.WAITING: {
        Phase.COLLECTING: "server: a client connected, or the retry timer with one connected",
        Phase.TRAINING: "client: the server's model of a new round arrived",
        Phase.DONE: "client: the server's final model arrived",
    },
    Phase.TRAINING: {
        Phase.WAITING: "client: TrainingFinished; the model sent to the server (or, stale, "
        "dropped)",
        Phase.DONE: "client: TrainingFinished after the final model arrived",
    },
    Phase.DONE: {},
}

SPSA_TRANSITIONS: Transitions = {
    Phase.IDLE: {
        Phase.TRAINING: "Started: probe step r",
        Phase.DONE: "Started with start_round >= rounds, or a synced model of the last step",
    },
    Phase.TRAINING: {
        Phase.COLLECTING: "TrainingFinished (the projections): one byte each, sent to all",
        Phase.TRAINING: "TrainingFinished of a step left behind by a sync: probe the new one",
        Phase.DONE: "a synced model of the last step",
    },
    Phase.COLLECTING: {
        Phase.TRAINING: "every connected peer's bytes of step r, or round_timeout; applied; "
        "or a sync to a later step",
        Phase.DONE: "the last step applied, or a synced model of the last step",
    },
    Phase.DONE: {},
}


class PhaseMachine:
    """The current phase, moved only along the edges of one transitions table."""

    __slots__ = ("_edges", "phase", "table")

    def __init__(self, table: Transitions) -> None:
        self.table = table
        self.phase = Phase.IDLE
        # The edges by the phases' string values: an enum member's hash is a Python call,
        # a str's is cached in C, and a core takes an edge several times a round.
        self._edges = frozenset(
            (source.value, target.value) for source, row in table.items() for target in row
        )

    def goto(self, new: Phase) -> None:
        """Take the edge to ``new``.

        Raises:
            RuntimeError: the edge is not in the table (a bug in the core, not in its caller).
        """
        if (self.phase._value_, new._value_) not in self._edges:
            raise RuntimeError(f"no transition {self.phase.name} -> {new.name} in this mode")
        self.phase = new

    def leave(self) -> None:
        """Take the edge every mode has: from any phase to ``DONE`` (``LeaveRequested``)."""
        self.phase = Phase.DONE

    def expect(self, phase: Phase, event: str) -> None:
        """Check that the caller's ``event`` is legal now.

        Raises:
            LocalProtocolError: the core is not in ``phase``.
        """
        if self.phase is not phase:
            raise LocalProtocolError(f"{event} is not allowed in phase {self.phase.name}")
