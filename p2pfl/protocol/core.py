"""The interface every protocol mode implements, and the registry of modes.

A core is driven only through :meth:`Core.handle` (an event plus the current time in, a list
of actions out) and asked when to wake it next with :meth:`Core.next_deadline`, as aioquic's
drivers ask ``get_timer()``. A mode is a class implementing :class:`Core` whose constructor has
the :class:`CoreFactory` signature; it adds itself to ``PROTOCOL_MODES`` with
:func:`register_protocol_mode`, and :func:`p2pfl.protocol.make_core` builds it by name.

A mode declares what it needs from the world around it as :class:`ModeTraits`, registered
with it, so a driver that builds a population (the simulator) asks :func:`mode_traits` by name
instead of knowing the modes.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

import numpy as np
import torch

from p2pfl.identity import Identity, NodeId
from p2pfl.merge.base import MergeRule, Probe
from p2pfl.params import ParamLayout
from p2pfl.protocol.actions import Action
from p2pfl.protocol.events import Event
from p2pfl.wire import MessageKind

if TYPE_CHECKING:
    from p2pfl.protocol.config import CoreConfig


class Core(Protocol):
    """A sans-IO protocol state machine: events in, actions out, no clock, no I/O."""

    @property
    def node_id(self) -> NodeId:
        """This node's identity."""
        ...

    @property
    def round(self) -> int:
        """The round being run, i.e. the number of completed rounds (trainings)."""
        ...

    @property
    def vector(self) -> torch.Tensor:
        """The model the node stands on now (see each mode for exactly when it changes)."""
        ...

    @property
    def finished(self) -> bool:
        """True once ``Stop`` was returned."""
        ...

    @property
    def gossips_histories(self) -> bool:
        """Whether the core sends history records with its models (SybilWall's gossip): a
        driver sizing what a peer may send it counts them."""
        ...

    @property
    def idle(self) -> bool:
        """True while the core runs but waits on nothing of its own: started, not finished,
        no training outstanding and no timer armed, so only a message or a connection can
        move it on (e.g. a ``modest`` node not sampled near the end). A driver that runs
        until every node is done counts an idle node as done."""
        ...

    def handle(self, event: Event, *, now: float) -> list[Action]:
        """Feed one event that happened at ``now`` (seconds, never decreasing).

        Raises:
            LocalProtocolError: the caller misused the core; a peer's fault never raises.
        """
        ...

    def next_deadline(self) -> float | None:
        """When to deliver ``DeadlineReached`` (absolute seconds, never before the last
        ``now``), or None if no timer is armed."""
        ...


class CoreFactory(Protocol):
    """The constructor signature of a protocol mode."""

    def __call__(
        self,
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
    ) -> Core: ...


@dataclass(frozen=True, slots=True)
class ModeTraits:
    """What a protocol mode needs from the population it runs in.

    Attributes:
        server: the mode runs one server and clients (``fedavg``): every node but the server
            is a client whose only neighbour is the server, and every node's
            ``CoreConfig.server`` names the server's key. The simulator adds the server as
            one more node, linked to every node of the topology.
        strangers: whether the core takes connections and messages from peers beyond its
            configured neighbours (``modest``; ``gossip`` with membership peer sampling),
            always or as its config says; drivers route such peers' traffic to the core and
            dial them on demand (read it as ``CoreConfig.admits_strangers``).
        traffic: what one peer running this mode may legitimately send a node:
            ``traffic(config, model_frames) -> (frames per round, frames per second)``, where
            ``model_frames`` is the frames a model takes (1, more with history records). The
            runtime sizes each peer's rate limit from it; a mode that declares nothing gets
            only the node's configured ``peer_message_rate``/``peer_message_burst``.
        buffered: how many received models a node of this mode holds at once:
            ``buffered(config, degree) -> models`` for a node of ``degree`` neighbours (mean
            degree in a population); the simulator's memory estimate reads it. A mode that
            declares nothing is taken to hold one model per neighbour.
        model_kinds: the message kinds in which this mode sends a model (``MODEL_UPDATE`` by
            default); a simulated model attack rewrites exactly these (:func:`model_kinds`).
    """

    server: bool = False
    strangers: bool | Callable[[CoreConfig], bool] = False
    traffic: Callable[[CoreConfig, int], tuple[float, float]] | None = None
    buffered: Callable[[CoreConfig, float], float] | None = None
    model_kinds: frozenset[MessageKind] = frozenset({MessageKind.MODEL_UPDATE})


F = TypeVar("F", bound=CoreFactory)

PROTOCOL_MODES: dict[str, CoreFactory] = {}
"""Protocol modes by name, as a scenario's ``protocol.mode`` names them."""

MODE_TRAITS: dict[str, ModeTraits] = {}
"""Each registered mode's traits (see :func:`mode_traits`)."""


def register_protocol_mode(name: str, *, traits: ModeTraits | None = None) -> Callable[[F], F]:
    """Class decorator adding a protocol mode to ``PROTOCOL_MODES`` under ``name``, with the
    ``traits`` it declares (default: none).

    Raises:
        ValueError: ``name`` is already registered.
    """

    def add(factory: F) -> F:
        if name in PROTOCOL_MODES:
            raise ValueError(f"protocol mode {name!r} is already registered")
        PROTOCOL_MODES[name] = factory
        MODE_TRAITS[name] = traits or ModeTraits()
        return factory

    return add


def model_kinds() -> frozenset[MessageKind]:
    """Every message kind in which some registered mode sends a model."""
    return frozenset(kind for traits in MODE_TRAITS.values() for kind in traits.model_kinds)


def mode_traits(name: str) -> ModeTraits:
    """The traits the mode ``name`` declared.

    Raises:
        KeyError: no mode of that name is registered.
    """
    if name not in PROTOCOL_MODES:
        raise KeyError(name)
    return MODE_TRAITS[name]
