"""The disruption timeline of a scenario, applied to a running world.

Theory of operation
-------------------
Each ``[[disruptions]]`` entry fires once, at a time (``at``: virtual seconds in the engine,
wall seconds live) or when nodes reach a round (``round``, see :class:`sim.scenario._When`),
and changes the world through the four primitives of :class:`sim.world.World`
(:meth:`~sim.world.World.take_down`, ``bring_up``, ``cut_link``, ``restore_link``); timed
entries come back through :meth:`~sim.world.World.schedule`. :class:`Disruptions` is the
:class:`sim.world.Timeline` a world is built with; it knows no world in particular. What each
kind does, and what the cores see in the engine (see :mod:`sim.engine`; live mode:
:mod:`sim.live`):

========== ==================================================================================
crash      the nodes die forever; neighbours get ``PeerDisconnected`` after ``detect_after``
remove     seconds (0: the OS resets the connections at once; ``inf``: a silent crash,
           noticed only through timeouts). ``remove`` is the same with a name that reads
           better for "remove 20% of the nodes by degree".
leave      the nodes go offline, keeping their state (a device suspended); ``graceful``
           (default) tells the neighbours at once, otherwise they are not told. With
           ``for_good`` they leave for good, as a node its operator stops: each core is told
           ``LeaveRequested`` and its goodbye is sent (:meth:`~sim.world.World.farewell`),
           and the node dies once that goodbye has arrived
join       offline nodes (default: all) come back; see the engine for what they are told
cut        the links go down; both ends see the connection reset
restore    cut links (default: all) come back; both ends reconnect
partition  every link between two groups goes down: the given ``groups`` (nodes not listed
           form one more group) or ``random = k`` groups of near-equal size; a later
           partition replaces an earlier one (only the difference is cut or restored)
heal       every partition cut is restored
battery    each node dies (as a crash noticed at once) when it would start training number
           ``trainings + 1`` counted from when the disruption fires
churn      nodes go offline and come back: from a trace (times relative to the disruption),
           or generated, alternating exponential online/offline periods of means
           ``mean_online`` / ``mean_offline`` seconds, starting online, until the node has
           run all its rounds; ``graceful`` as for leave
========== ==================================================================================

Node selection (crash, remove, leave, battery): ``nodes`` lists them; otherwise ``count`` or
``fraction`` of *all* n nodes of the topology (rounded) is chosen among the candidates, the
nodes not dead and, with ``among = "data"`` or ``"relays"``, of that role: at random or by
highest centrality (``degree``, ``betweenness``, ``eigenvector``) in the current graph of
nodes not dead and links up, ties to the lower index. Random choices and generated churn
draw from streams derived from the run seed and the disruption's index.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import numpy as np

from p2pfl.errors import ConfigError
from p2pfl.learn import derive_seed
from sim.churn import read_trace
from sim.population import Population
from sim.scenario import (
    BatterySpec,
    ChurnSpec,
    CrashSpec,
    CutSpec,
    DisruptionSpec,
    HealSpec,
    JoinSpec,
    LeaveSpec,
    PartitionSpec,
    RestoreSpec,
)
from sim.selection import choose_nodes
from sim.world import DEAD, OFFLINE, World

STREAM_DISRUPTIONS = 14


@dataclass(frozen=True, slots=True)
class _Fire:
    index: int


@dataclass(frozen=True, slots=True)
class _Gone:
    """A node that said goodbye (a ``leave`` with ``for_good``) goes now."""

    index: int
    node: int


@dataclass(frozen=True, slots=True)
class _Churn:
    index: int
    node: int
    online: bool


class Disruptions:
    """The timeline of one run: what fires when, and what it does to the world."""

    def __init__(
        self, specs: Sequence[DisruptionSpec], population: Population, *, seed: int
    ) -> None:
        """Check the timeline against the topology.

        Raises:
            ConfigError: a node index, link or trace refers to something the topology lacks.
        """
        self.specs = list(specs)
        self.population = population
        self._seed = seed
        self._first: list[tuple[int, int]] = []
        self._all: list[tuple[int, int]] = []
        self._battery: dict[int, int] = {}
        """Trainings each node with a battery may still start."""
        self._battery_index: dict[int, int] = {}
        self._traces: dict[int, dict[int, list[tuple[float, float]]]] = {}
        self._churn_rngs: dict[tuple[int, int], np.random.Generator] = {}
        for index, spec in enumerate(self.specs):
            self._check(index, spec)

    # -- checks -------------------------------------------------------------------------

    def _check(self, index: int, spec: DisruptionSpec) -> None:
        size = self.population.size
        key = f"disruptions[{index}]"

        def check_nodes(name: str, nodes: Sequence[int] | None) -> None:
            if nodes is not None and any(node >= size for node in nodes):
                raise ConfigError(f"{key}.{name}", list(nodes), f"node indices in 0..{size - 1}")

        match spec:
            case CrashSpec() | LeaveSpec() | BatterySpec() | JoinSpec():
                check_nodes("nodes", spec.nodes)
            case ChurnSpec():
                check_nodes("nodes", spec.nodes)
                if spec.trace is not None:
                    trace = read_trace(Path(spec.trace))
                    check_nodes("trace", sorted(trace))
                    self._traces[index] = trace
            case CutSpec() | RestoreSpec():
                for u, v in spec.links or []:
                    if not (0 <= u < size and v in self.population.neighbours[u]):
                        raise ConfigError(f"{key}.links", [u, v], "an edge of the topology")
            case PartitionSpec():
                seen: set[int] = set()
                for group in spec.groups or []:
                    check_nodes("groups", group)
                    if seen & set(group):
                        raise ConfigError(f"{key}.groups", spec.groups, "disjoint groups")
                    seen |= set(group)
            case HealSpec():
                pass

    # -- scheduling ---------------------------------------------------------------------

    def start(self, world: World) -> None:
        """Queue every timed disruption; called by the world before it starts the nodes."""
        for index, spec in enumerate(self.specs):
            if spec.at is not None:
                world.schedule(spec.at, _Fire(index))
            elif spec.round == 0:
                world.schedule(0.0, _Fire(index))
            elif spec.round is not None:
                target = self._first if spec.trigger == "first" else self._all
                target.append((spec.round, index))

    def on_progress(self, world: World, node: int, completed: int) -> None:
        """``node`` has completed ``completed`` rounds (its checkpoint just came)."""
        if not self._first:
            return
        due = [entry for entry in self._first if entry[0] <= completed]
        if due:
            self._first = [entry for entry in self._first if entry[0] > completed]
            for _round, index in due:
                world.schedule(world.now, _Fire(index))

    def on_round_complete(self, world: World, round_index: int) -> None:
        """Every active node has reported round ``round_index`` (0-based)."""
        if not self._all:
            return
        due = [entry for entry in self._all if entry[0] <= round_index + 1]
        if due:
            self._all = [entry for entry in self._all if entry[0] > round_index + 1]
            for _round, index in due:
                world.schedule(world.now, _Fire(index))

    def may_train(self, world: World, node: int) -> bool:
        """Whether ``node`` may start a training: False (and the node dies) if its battery is
        empty; every True spends one training of it."""
        left = self._battery.get(node)
        if left is None:
            return True
        if left > 0:
            self._battery[node] = left - 1
            return True
        index = self._battery_index[node]
        world.take_down(node, dead=True, notify_after=0.0, cause="battery", disruption=index)
        return False

    # -- firing -------------------------------------------------------------------------

    def fire(self, world: World, payload: object) -> None:
        """Apply a timeline entry (called by the world when its time has come)."""
        if isinstance(payload, _Churn):
            self._churn_step(world, payload)
            return
        if isinstance(payload, _Gone):
            spec = self.specs[payload.index]
            assert isinstance(spec, LeaveSpec)
            world.take_down(
                payload.node,
                dead=True,
                notify_after=0.0 if spec.graceful else None,
                cause="leave",
                disruption=payload.index,
            )
            return
        assert isinstance(payload, _Fire)
        index = payload.index
        spec = self.specs[index]
        record: dict[str, object] = {"event": "disruption", "index": index, "kind": spec.kind}
        match spec:
            case CrashSpec(detect_after=detect_after):
                nodes = self.select(world, spec, index)
                notify = None if math.isinf(detect_after) else detect_after
                for node in nodes:
                    world.take_down(
                        node, dead=True, notify_after=notify, cause=spec.kind, disruption=index
                    )
                record["nodes"] = nodes
            case LeaveSpec(for_good=True):
                nodes = self.select(world, spec, index)
                for node in nodes:
                    world.schedule(world.farewell(node), _Gone(index, node))
                record["nodes"] = nodes
            case LeaveSpec(graceful=graceful):
                nodes = self.select(world, spec, index)
                for node in nodes:
                    world.take_down(
                        node,
                        dead=False,
                        notify_after=0.0 if graceful else None,
                        cause="leave",
                        disruption=index,
                    )
                record["nodes"] = nodes
            case JoinSpec(nodes=listed):
                nodes = (
                    listed
                    if listed is not None
                    else [node for node, state in enumerate(world.status) if state is OFFLINE]
                )
                for node in nodes:
                    world.bring_up(node, cause="join", disruption=index)
                record["nodes"] = nodes
            case CutSpec(links=links):
                for u, v in links:
                    world.cut_link(u, v, reason="cut", disruption=index)
                record["links"] = [sorted(link) for link in links]
            case RestoreSpec(links=listed_links):
                given = [(u, v) for u, v in listed_links or []]
                restore = given or world.network.down_links("cut")
                for u, v in restore:
                    world.restore_link(u, v, reason="cut", disruption=index)
                record["links"] = [sorted(link) for link in restore]
            case PartitionSpec():
                groups = self._groups(spec, index)
                self._partition(world, groups, index)
                record["groups"] = groups
            case HealSpec():
                for u, v in world.network.down_links("partition"):
                    world.restore_link(u, v, reason="partition", disruption=index)
            case BatterySpec(trainings=trainings):
                nodes = self.select(world, spec, index)
                for node in nodes:
                    self._battery[node] = trainings
                    self._battery_index[node] = index
                record["nodes"] = nodes
            case ChurnSpec():
                record["nodes"] = self._start_churn(world, spec, index)
        world.log(record)

    # -- selection ----------------------------------------------------------------------

    def _rng(self, *path: int) -> np.random.Generator:
        return np.random.default_rng(derive_seed(self._seed, STREAM_DISRUPTIONS, *path))

    def select(
        self, world: World, spec: CrashSpec | LeaveSpec | BatterySpec, index: int
    ) -> list[int]:
        """The nodes a selecting disruption acts on, in the order chosen."""
        if spec.nodes is not None:
            return list(spec.nodes)
        relay = self.population.relay
        size = self.population.size
        candidates = [
            node
            for node in range(size)
            if world.status[node] is not DEAD
            and (spec.among == "all" or (spec.among == "relays") == relay[node])
        ]
        wanted = spec.count if spec.count is not None else round((spec.fraction or 0.0) * size)
        return choose_nodes(
            candidates,
            wanted,
            spec.choose,
            graph=self.live_graph(world),
            rng=self._rng(index),
            centrality_seed=derive_seed(self._seed, STREAM_DISRUPTIONS, index, 1),
        )

    def live_graph(self, world: World) -> nx.Graph:
        """The nodes not dead and the links up between them."""
        graph = nx.Graph()
        alive = [node for node in range(self.population.size) if world.status[node] is not DEAD]
        graph.add_nodes_from(alive)
        graph.add_edges_from(
            (u, v)
            for u, v in self.population.graph.edges()
            if world.status[u] is not DEAD
            and world.status[v] is not DEAD
            and world.network.link_up(u, v)
        )
        return graph

    # -- partitions -----------------------------------------------------------------------

    def _groups(self, spec: PartitionSpec, index: int) -> list[list[int]]:
        size = self.population.size
        if spec.groups is not None:
            groups = [sorted(group) for group in spec.groups]
            listed = {node for group in groups for node in group}
            rest = [node for node in range(size) if node not in listed]
            return groups + ([rest] if rest else [])
        assert spec.random is not None
        order = self._rng(index).permutation(size)
        return [sorted(int(node) for node in part) for part in np.array_split(order, spec.random)]

    def _partition(self, world: World, groups: list[list[int]], index: int) -> None:
        group_of = {node: number for number, group in enumerate(groups) for node in group}
        wanted = {
            (min(u, v), max(u, v))
            for u, v in self.population.graph.edges()
            if group_of[u] != group_of[v]
        }
        current = set(world.network.down_links("partition"))
        for u, v in sorted(current - wanted):
            world.restore_link(u, v, reason="partition", disruption=index)
        for u, v in sorted(wanted - current):
            world.cut_link(u, v, reason="partition", disruption=index)

    # -- churn ----------------------------------------------------------------------------

    def _start_churn(self, world: World, spec: ChurnSpec, index: int) -> list[int]:
        trace = self._traces.get(index)
        if trace is not None:
            for node, spans in trace.items():
                if spans[0][0] > 0.0:
                    self._churn_step(world, _Churn(index, node, online=False))
                for start, end in spans:
                    if start > 0.0:
                        world.schedule(world.now + start, _Churn(index, node, True))
                    world.schedule(world.now + end, _Churn(index, node, False))
            return sorted(trace)
        size = self.population.size
        if spec.nodes is not None:
            nodes = list(spec.nodes)
        else:
            wanted = round((spec.fraction or 0.0) * size)
            picked = self._rng(index).choice(size, size=min(wanted, size), replace=False)
            nodes = sorted(int(node) for node in picked)
        for node in nodes:
            self._schedule_next(world, index, node, online=False)
        return nodes

    def _schedule_next(self, world: World, index: int, node: int, *, online: bool) -> None:
        spec = self.specs[index]
        assert isinstance(spec, ChurnSpec)
        mean = spec.mean_offline if online else spec.mean_online
        assert mean is not None
        rng = self._churn_rngs.get((index, node))
        if rng is None:
            rng = self._rng(index, node + 2)
            self._churn_rngs[(index, node)] = rng
        delay = float(rng.exponential(mean))
        world.schedule(world.now + delay, _Churn(index, node, online))

    def _churn_step(self, world: World, step: _Churn) -> None:
        spec = self.specs[step.index]
        assert isinstance(spec, ChurnSpec)
        node = step.node
        if world.status[node] is DEAD or world.is_finished(node):
            return
        if step.online:
            world.bring_up(node, cause="churn", disruption=step.index)
        else:
            world.take_down(
                node,
                dead=False,
                notify_after=0.0 if spec.graceful else None,
                cause="churn",
                disruption=step.index,
            )
        if step.index not in self._traces:
            self._schedule_next(world, step.index, node, online=not step.online)
