"""The simulated world: the interface both drivers offer, and the state they share.

Theory of operation
-------------------
A scenario runs in one of two *worlds*: the virtual-time engine (:class:`sim.engine.Engine`)
or live mode's trio nodes over TCP (:class:`sim.live.LiveWorld`). Both implement
:class:`World`, the one interface everything around a run is typed against:

* the disruption timeline (:class:`sim.disruptions.Disruptions`, a :class:`Timeline`) reads
  the world (``now``, ``status``, ``network``, :meth:`World.is_finished`) and changes it
  through six primitives: :meth:`World.schedule` (call the timeline back at a time),
  :meth:`World.farewell` (a node says goodbye before it leaves for good),
  :meth:`World.take_down`, :meth:`World.bring_up`, :meth:`World.cut_link`,
  :meth:`World.restore_link`; each world turns them into what its nodes see (events on the
  engine's heap, commands to live shards);
* run summaries (:func:`sim.run.summarise`) and progress hooks (:data:`ProgressHook`) read
  its ``recorder``, ``traffic``, ``events_log``, ``population``, ``network`` and ``now``.

The timeline (and the engine's adversary) is handed to a world when it is built; nothing is
wired by setting attributes afterwards.

:class:`WorldState` is the part both worlds share, so neither copies the other: the clock
reading ``now``, the event log, the traffic counters, the :class:`NetworkState`, and
:meth:`WorldState.record_round`, which files one node's round with the metrics and tells the
timeline and the progress hook.

:class:`NetworkState` is the bookkeeping under the primitives: every node's status
(*online*, *offline* or *dead*), the links that are down with the reasons they are down (a
link is up again only when its last reason is removed), and the connected components of the
live graph (online nodes, links up), labelled lazily and cached until the next change. It
changes only state and logs node and link changes (through the ``log`` callable it is given);
what a change means to the nodes (notifications, shard commands) is the driver's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from sim.metrics import MetricsRecorder, Traffic
from topologies import CompleteAdjacency

if TYPE_CHECKING:
    from torch import Tensor

    from sim.population import Population

ONLINE = "online"
OFFLINE = "offline"
DEAD = "dead"


def link_key(u: int, v: int) -> tuple[int, int]:
    """The undirected link u-v as (smaller, larger)."""
    return (u, v) if u < v else (v, u)


class NetworkState:
    """Node status, links down and why, and component labels over a fixed topology."""

    def __init__(
        self, neighbours: Sequence[Sequence[int]], log: Callable[[dict[str, Any]], None]
    ) -> None:
        self.neighbours = neighbours
        self.status = [ONLINE] * len(neighbours)
        self._not_online = 0
        self._log = log
        self._down_links: dict[tuple[int, int], set[str]] = {}
        self._components: tuple[list[int], list[int]] | None = None

    # -- reading ----------------------------------------------------------------------------

    def all_up(self) -> bool:
        """Every node online and every link up (O(1))."""
        return not self._not_online and not self._down_links

    def link_up(self, u: int, v: int) -> bool:
        return not self._down_links.get(link_key(u, v))

    def reachable(self, u: int, v: int) -> bool:
        """Both ends online and the link between them up."""
        status = self.status
        if status[u] is not ONLINE or status[v] is not ONLINE:
            return False
        return not self._down_links or self.link_up(u, v)

    def reachable_if_up(self, node: int, neighbour: int) -> bool:
        """``neighbour`` is online and the link to it up (whatever ``node``'s own state)."""
        return self.status[neighbour] is ONLINE and self.link_up(node, neighbour)

    def down_links(self, reason: str) -> list[tuple[int, int]]:
        """The links that are down for ``reason``, sorted."""
        return sorted(key for key, reasons in self._down_links.items() if reason in reasons)

    # -- changing ---------------------------------------------------------------------------

    def take_down(self, node: int, *, dead: bool, cause: str, disruption: int) -> str | None:
        """Mark ``node`` offline or dead and log it; its previous status, or None if it was
        down already (a kill of an offline node still makes it dead)."""
        before = self.status[node]
        if before is DEAD or (before is OFFLINE and not dead):
            return None
        self.status[node] = DEAD if dead else OFFLINE
        self._not_online += before is ONLINE
        self._log({"event": "node", "node": node, "state": self.status[node], "cause": cause,
                   "disruption": disruption})  # fmt: skip
        self._components = None
        return before

    def bring_up(self, node: int, *, cause: str, disruption: int) -> bool:
        """Mark an offline node online and log it; False if it is online already or dead."""
        if self.status[node] is not OFFLINE:
            return False
        self.status[node] = ONLINE
        self._not_online -= 1
        self._log({"event": "node", "node": node, "state": ONLINE, "cause": cause,
                   "disruption": disruption})  # fmt: skip
        self._components = None
        return True

    def cut_link(self, u: int, v: int, *, reason: str, disruption: int) -> bool:
        """Add ``reason`` to the reasons link u-v is down; True (and logged) if it was up."""
        key = link_key(u, v)
        reasons = self._down_links.setdefault(key, set())
        was_up = not reasons
        reasons.add(reason)
        if not was_up:
            return False
        self._log({"event": "link", "link": list(key), "state": "down", "cause": reason,
                   "disruption": disruption})  # fmt: skip
        self._components = None
        return True

    def restore_link(self, u: int, v: int, *, reason: str, disruption: int) -> bool:
        """Remove ``reason``; True (and logged) if no reason is left: the link is up again."""
        key = link_key(u, v)
        reasons = self._down_links.get(key)
        if not reasons or reason not in reasons:
            return False
        reasons.discard(reason)
        if reasons:
            return False
        del self._down_links[key]
        self._log({"event": "link", "link": list(key), "state": "up", "cause": reason,
                   "disruption": disruption})  # fmt: skip
        self._components = None
        return True

    # -- components -------------------------------------------------------------------------

    def component_of(self, node: int) -> tuple[int, int]:
        """(smallest node index, size) of ``node``'s component of the live graph."""
        if self._components is None:
            self._components = self._label_components()
        labels, sizes = self._components
        return labels[node], sizes[node]

    def components(self) -> list[list[int]]:
        """The components of the live graph (online nodes, links up), largest first."""
        groups: dict[int, list[int]] = {}
        for node in range(len(self.status)):
            if self.status[node] is ONLINE:
                groups.setdefault(self.component_of(node)[0], []).append(node)
        return sorted(groups.values(), key=lambda group: (-len(group), group[0]))

    def _label_components(self) -> tuple[list[int], list[int]]:
        size = len(self.status)
        if isinstance(self.neighbours, CompleteAdjacency) and not self._down_links:
            # Any set of online nodes of a complete graph is one component: O(n), not O(n^2).
            online = [node for node in range(size) if self.status[node] is ONLINE]
            root = online[0] if online else 0
            labels = [root if self.status[node] is ONLINE else node for node in range(size)]
            sizes = [len(online) if self.status[node] is ONLINE else 0 for node in range(size)]
            return labels, sizes
        parent = list(range(size))

        def find(x: int) -> int:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for node in range(size):
            if self.status[node] is not ONLINE:
                continue
            for neighbour in self.neighbours[node]:
                if neighbour > node and self.reachable(node, neighbour):
                    a, b = find(node), find(neighbour)
                    if a != b:
                        parent[max(a, b)] = min(a, b)
        roots = [find(node) for node in range(size)]
        counts: dict[int, int] = {}
        for node, root in enumerate(roots):
            if self.status[node] is ONLINE:
                counts[root] = counts.get(root, 0) + 1
        return roots, [counts.get(root, 0) for root in roots]


# -- the interface --------------------------------------------------------------------------


class World(Protocol):
    """What a run's timeline, summary and progress hooks see of the world it runs in.

    Implemented by :class:`sim.engine.Engine` (virtual time) and :class:`sim.live.LiveWorld`
    (wall time, real nodes); see the module docstring.
    """

    now: float
    """Seconds since the run started (virtual or wall)."""
    population: Population
    """The run's nodes."""
    network: NetworkState
    """Node status, links down and why, components."""
    recorder: MetricsRecorder
    """The per-node per-round metrics."""
    traffic: list[Traffic]
    """Every node's traffic counters so far."""
    completed_rounds: list[int]
    """The rounds each node has completed."""
    events_log: list[dict[str, Any]]
    """Everything :meth:`log` was given, stamped with its time."""

    @property
    def status(self) -> Sequence[str]:
        """Every node's status: :data:`ONLINE`, :data:`OFFLINE` or :data:`DEAD`."""
        ...

    def log(self, entry: dict[str, Any]) -> None:
        """Append ``entry`` to the run's events, stamped with ``now``."""
        ...

    def is_finished(self, node: int) -> bool:
        """The node has run all its rounds."""
        ...

    def schedule(self, at: float, payload: object) -> None:
        """Hand ``payload`` back to the timeline's :meth:`Timeline.fire` at time ``at``."""
        ...

    def farewell(self, node: int) -> float:
        """``node`` leaves for good: its core is told ``LeaveRequested`` and its goodbye is
        sent; returns when to take it down (once the goodbye is out). Nothing happens to a
        node that is not online or has finished."""
        ...

    def take_down(
        self, node: int, *, dead: bool, notify_after: float | None, cause: str, disruption: int
    ) -> bool:
        """Take ``node`` offline (suspended) or kill it; ``notify_after``: seconds until its
        neighbours see it go (None: they notice only by timeouts). False if it was down
        already (a kill of an offline node still makes it dead)."""
        ...

    def bring_up(self, node: int, *, cause: str, disruption: int) -> bool:
        """Bring an offline node back; False if it is online already or dead."""
        ...

    def cut_link(self, u: int, v: int, *, reason: str, disruption: int) -> None:
        """Add ``reason`` to the reasons link u-v is down; both ends see it go if it was up."""
        ...

    def restore_link(self, u: int, v: int, *, reason: str, disruption: int) -> None:
        """Remove ``reason``; when no reason is left the link is up and both ends reconnect."""
        ...


class Timeline(Protocol):
    """What a world calls on the disruption timeline it was built with
    (:class:`sim.disruptions.Disruptions`)."""

    def start(self, world: World) -> None:
        """Queue what fires at a time; called once, before the nodes start."""
        ...

    def fire(self, world: World, payload: object) -> None:
        """Apply what :meth:`World.schedule` was given, now that its time has come."""
        ...

    def on_progress(self, world: World, node: int, completed: int) -> None:
        """``node`` has completed ``completed`` rounds."""
        ...

    def on_round_complete(self, world: World, round_index: int) -> None:
        """Every active node has reported round ``round_index`` (0-based)."""
        ...

    def may_train(self, world: World, node: int) -> bool:
        """Whether ``node`` may start a training now (False: the timeline took it down)."""
        ...


ProgressHook = Callable[[World], None]
"""Called with the world after every node's round (progress bars, experiments)."""


# -- what both worlds share -------------------------------------------------------------------


class WorldState(World):
    """The bookkeeping :class:`World` implementations share (see the module docstring);
    a world subclasses it and implements the primitives and :meth:`World.is_finished`.

    Building one wires the recorder to the timeline: when every active node has reported a
    round, the timeline's :meth:`Timeline.on_round_complete` is told.
    """

    def __init__(
        self,
        population: Population,
        recorder: MetricsRecorder,
        *,
        disruptions: Timeline | None = None,
        on_round: ProgressHook | None = None,
    ) -> None:
        size = population.size
        self.population = population
        self.recorder = recorder
        self.disruptions = disruptions
        self.on_round = on_round
        self.now = 0.0
        self.traffic = [Traffic() for _ in range(size)]
        self.completed_rounds = [0] * size
        self.events_log: list[dict[str, Any]] = []
        self.network = NetworkState(population.neighbours, self.log)
        if disruptions is not None:
            recorder.on_complete = self._round_complete

    def log(self, entry: dict[str, Any]) -> None:
        """Append ``entry`` to the run's events, stamped with the current time."""
        self.events_log.append({"time": self.now, **entry})

    @property
    def status(self) -> list[str]:
        """Every node's status: :data:`ONLINE`, :data:`OFFLINE` or :data:`DEAD`."""
        return self.network.status

    def record_round(
        self,
        node: int,
        completed: int,
        *,
        at: float,
        loss: float,
        vector: Tensor,
        traffic: Traffic,
    ) -> None:
        """``node`` has completed ``completed`` rounds, the last ending at ``at`` with model
        ``vector``: file it with the metrics (with the node's component now), then tell the
        timeline and the progress hook."""
        component, component_size = self.network.component_of(node)
        self.completed_rounds[node] = max(self.completed_rounds[node], completed)
        self.recorder.record(
            completed - 1,
            node,
            now=at,
            train_loss=loss,
            vector=vector,
            traffic=traffic,
            component=component,
            component_size=component_size,
        )
        if self.disruptions is not None:
            self.disruptions.on_progress(self, node, completed)
        if self.on_round is not None:
            self.on_round(self)

    def _round_complete(self, round_index: int) -> None:
        assert self.disruptions is not None
        self.disruptions.on_round_complete(self, round_index)
