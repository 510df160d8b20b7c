"""The pump: the one task that owns a node's protocol core, and what it does with its actions.

Theory of operation
-------------------
Everything else only produces events into one bounded channel: connection tasks
(``PeerConnected``, ``MessageReceived``, ``PeerDisconnected``), training tasks
(``TrainingFinished``) and the startup gate (``Started``). :meth:`Pump.run` waits for the next
event or for ``core.next_deadline()``, whichever comes first (``DeadlineReached``), passes it
to ``core.handle(event, now=trio.current_time())`` and carries out the returned actions,
none of which blocks it for long:

=================  ==========================================================================
``Send``           queue on the peer's bounded send queue (oldest dropped when full), or
                   dial the peer on demand (:mod:`p2pfl.runtime.connections`)
``StartTraining``  ``learner.train`` in a worker thread; its result comes back as an event
``SaveCheckpoint`` atomic checkpoint file, then evaluation (worker thread) and the round's
                   one log record (:mod:`p2pfl.runtime.reporting`)
``Disconnect``     close that peer's connection
``PeerMisbehaved`` log and count a strike; ``strikes_to_ban`` strikes ban the peer's key
``Emit``           one log record (``round`` is kept for the round's record instead)
``Stop``           leave the loop; the node flushes the send queues (bounded), closes all
=================  ==========================================================================

A node stopped gracefully (``Node.request_stop``, SIGTERM) ends the loop, then hands the core
``LeaveRequested`` (:meth:`Pump.leave`) and carries out the goodbye it returns before the node
flushes and closes.

After each event the pump credits every peer's rate limit with the rounds the core completed
(:meth:`~p2pfl.runtime.defences.Defences.credit_rounds`).
"""

from __future__ import annotations

import functools
import logging
import math
from typing import assert_never

import trio

from p2pfl.identity import NodeId
from p2pfl.learn.base import Learner
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
from p2pfl.protocol.core import Core
from p2pfl.protocol.events import DeadlineReached, Event, LeaveRequested, TrainingFinished
from p2pfl.runtime.connections import Connections
from p2pfl.runtime.defences import Defences
from p2pfl.runtime.logs import log_event
from p2pfl.runtime.reporting import Reporting

log = logging.getLogger("p2pfl.node")

EVENT_QUEUE = 256


class Pump:
    """Drives one core: events in, actions carried out (see the module docstring).

    Attributes:
        stop_reason: the core's ``Stop`` reason, once it stopped.
    """

    def __init__(
        self,
        core: Core,
        node_id: NodeId,
        learner: Learner,
        *,
        events: tuple[trio.MemorySendChannel[Event], trio.MemoryReceiveChannel[Event]],
        connections: Connections,
        defences: Defences,
        reporting: Reporting,
        start_round: int,
    ) -> None:
        self.core = core
        self.node_id = node_id
        self.learner = learner
        self._events_send, self._events_receive = events
        self._connections = connections
        self._defences = defences
        self._reporting = reporting
        self._credited_round = start_round
        self._nursery: trio.Nursery | None = None
        self.stop_reason: str | None = None

    async def run(self, nursery: trio.Nursery) -> None:
        """Run the core until it finishes; training tasks run in ``nursery``. Cancel the enclosing scope to stop early: the actions of an event already
        handled are still carried out (shielded), so the round logged is the round saved."""
        self._nursery = nursery
        while not self.core.finished:
            deadline = self.core.next_deadline()
            event: Event = DeadlineReached()
            with trio.move_on_at(math.inf if deadline is None else deadline):
                event = await self._events_receive.receive()
            actions = self.core.handle(event, now=trio.current_time())
            self._credit_progress()
            # The core has moved on: its actions (a checkpoint above all) are carried out
            # even if a stop arrives meanwhile, so the round logged at stop is the one saved
            # and resumed. None blocks for long: sends queue, training starts a task.
            with trio.CancelScope(shield=True):
                for action in actions:
                    await self._carry_out(action)

    async def leave(self) -> bool:
        """Tell the core the node leaves for good (``LeaveRequested``) and carry out its
        goodbye (sends are queued; the node flushes them before closing). Call it once the
        loop has ended; a core already finished has nothing to say (returns False)."""
        if self.core.finished:
            return False
        actions = self.core.handle(LeaveRequested(), now=trio.current_time())
        with trio.CancelScope(shield=True):
            for action in actions:
                await self._carry_out(action)
        return True

    def _credit_progress(self) -> None:
        """Each round this node completes earns every peer the frames a round lets it send."""
        advanced = self.core.round - self._credited_round
        if advanced <= 0:
            return
        self._credited_round = self.core.round
        self._defences.credit_rounds(advanced)

    async def _carry_out(self, action: Action) -> None:
        match action:
            case Send(peer=peer, envelope=envelope):
                self._connections.send(peer, envelope)
            case StartTraining():
                assert self._nursery is not None
                self._nursery.start_soon(self._train, action)
            case SaveCheckpoint(round=round_, vector=vector, loss=loss):
                await self._reporting.save(round_, vector, loss)
            case Disconnect(peer=peer, reason=reason):
                log_event(
                    log,
                    logging.INFO,
                    "disconnect",
                    "disconnecting %s: %s",
                    peer,
                    reason,
                    peer=peer.hex(),
                    reason=reason,
                )
                self._connections.close(peer)
            case PeerMisbehaved(peer=peer, reason=reason):
                self._defences.reject("protocol")
                self._defences.strike(peer, reason)
            case Emit(name="round", fields=fields):
                # Logged once, with the round's evaluation, when its checkpoint is saved.
                self._reporting.round_closed(fields)
                self._connections.check_alone(int(fields.get("round", self.core.round)))
            case Emit(name=name, fields=fields):
                log_event(
                    log,
                    logging.INFO,
                    name,
                    "node %s %s %s",
                    self.node_id.short(),
                    name,
                    " ".join(f"{key}={value}" for key, value in fields.items()),
                    node=self.node_id.short(),
                    **fields,
                )
            case Stop(reason=reason):
                self.stop_reason = reason
                log_event(
                    log,
                    logging.INFO,
                    "finished",
                    "node %s finished: %s",
                    self.node_id,
                    reason,
                    reason=reason,
                )
            case _:
                assert_never(action)

    async def _train(self, action: StartTraining) -> None:
        train = functools.partial(
            self.learner.train, action.vector, action.steps, round=action.round
        )
        result = await trio.to_thread.run_sync(train)
        await self._events_send.send(TrainingFinished(result.vector, result.loss, result.steps))
