"""Everything per node that a run needs before its first event: graph, keys, roles, data,
samplers, compute speed.

Data, test split, partition, initial model and minibatch streams come from
:func:`p2pfl.learn.build_federation`, the same derivation ``p2pfl node`` uses, so a node of a
simulation and a live node with the same run seed and index hold the same data.

Roles: a node is a *data holder* or a *relay* (``[roles]``). The training set is partitioned
over the data holders only (in node order), so relays take no data away from the federation:
a run with relays holds the same data, spread over fewer nodes. A relay has no sampler and an
empty training set. It advertises ``samples`` = the mean holder's sample count (at least 1),
so sample-weighted merge rules weigh the (merged) model it forwards like a typical node's;
advertising 0 would make ``weighted`` ignore everything a relay forwards.

Speed: ``[devices.speed]`` gives each node a compute factor (training takes
``steps * step_time / speed``), drawn from a stream derived from the run seed, or listed.

Adversaries (``[[adversaries]]``, :mod:`sim.adversaries`) are placed on the topology before the
data is shared out: Sybil clones are appended to the graph (indices n, n+1, ...) and take no
share of the partition (they hold the whole training set, poisoned for a data attack, and
advertise the mean holder's sample count); a data attacker's own share is poisoned and its
sampler walks the poisoned set with the node's own seed.

A server: when the protocol mode declares one (:func:`p2pfl.protocol.mode_traits`, e.g.
``fedavg``), the topology's nodes are the clients and keep their indices; the server is
appended as node n, linked to every client, and the topology's own edges are dropped (clients
talk to the server only). The server is a relay: it holds no data, and ``among = "data"``
in a disruption leaves it alone. Adversaries are placed among the clients (never the server);
Sybils are refused with a server mode.

Initial models: ``learner.init = "shared"`` starts every node from the federation's model;
``"independent"`` gives each node its own initialisation (:func:`initial_vectors`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import networkx as nx
import numpy as np
import torch
from torch import Tensor

import topologies
from p2pfl.errors import ConfigError
from p2pfl.identity import Identity, NodeId
from p2pfl.learn import Federation, MinibatchSampler, build_federation, derive_seed
from p2pfl.learn.batched import Shares
from p2pfl.learn.datasets import ArrayDataset
from p2pfl.params import ParamLayout, flatten
from p2pfl.protocol import mode_traits
from sim.adversaries import (
    DATA_ATTACKS,
    STREAM_ADVERSARIES,
    AdversaryPlan,
    plan_adversaries,
    poison,
)
from sim.scenario import Scenario, SpeedSpec

PhaseHook = Callable[[str], None]
"""Told the name of each setup phase as it begins, for a progress display."""

STREAM_ROLES = 12
STREAM_SPEED = 13
STREAM_INIT_NODE = 16


@dataclass(slots=True)
class Population:
    """The nodes of one run, indexed 0..n-1 as in the topology.

    ``neighbours[i]`` is node i's sorted neighbour list; for a complete graph it is an implicit
    view (:class:`topologies.CompleteAdjacency`), and the networkx :attr:`graph` is only built
    if something asks for it (a disruption that cuts links, a centrality choice, a plot).
    """

    neighbours: Sequence[Sequence[int]]
    identities: list[Identity]
    federation: Federation
    samplers: list[MinibatchSampler | None]
    train_sets: list[tuple[Tensor, Tensor]]
    train_shares: Shares
    """Every node's training set as rows of one pool (relays: an empty range), what the
    batched trainer gathers minibatches from; ``train_sets`` are views of the same rows."""
    relay: list[bool]
    samples: list[int]
    speed: list[float]
    adversaries: AdversaryPlan | None = None
    """Who is Byzantine (None: nobody); Sybil clones are the nodes past the topology's."""
    topology: dict[str, object] | None = None
    """The topology spec :attr:`graph` is rebuilt from when it was not built at setup."""
    built_graph: nx.Graph | None = None
    server: int | None = None
    """The server's index, for a mode with a server (the last node); None otherwise."""

    @property
    def graph(self) -> nx.Graph:
        """The topology as a networkx graph (built on first use for an implicit topology)."""
        if self.built_graph is None:
            assert self.topology is not None, "a population holds a graph or its spec"
            self.built_graph = topologies.build(self.topology)
        return self.built_graph

    @property
    def edge_count(self) -> int:
        return sum(len(peers) for peers in self.neighbours) // 2

    @property
    def reporting(self) -> list[bool]:
        """Whose models the metrics report: the server alone when there is one (it holds
        the global model), else every node."""
        if self.server is None:
            return [True] * self.size
        return [node == self.server for node in range(self.size)]

    @property
    def honest(self) -> list[bool]:
        return self.adversaries.honest if self.adversaries else [True] * self.size

    @property
    def size(self) -> int:
        return len(self.identities)

    @property
    def node_ids(self) -> list[NodeId]:
        return [identity.node_id for identity in self.identities]

    @property
    def layout(self) -> ParamLayout:
        return self.federation.layout


def simulated_identity(seed: int, node: int) -> Identity:
    """A deterministic key for simulated node ``node`` of a run (never use outside simulation)."""
    return Identity.from_seed(hashlib.sha256(f"p2pfl-sim/{seed}/{node}".encode()).digest())


def choose_relays(scenario: Scenario, neighbours: Sequence[Sequence[int]]) -> list[bool]:
    """Which nodes are relays: listed, or a fraction chosen at random or by highest degree.

    Raises:
        ConfigError: a listed relay is not a node, or no data holder would remain.
    """
    size = len(neighbours)
    roles = scenario.roles
    relays = set(roles.relays)
    if any(node >= size for node in relays):
        raise ConfigError("roles.relays", roles.relays, f"node indices in 0..{size - 1}")
    count = round(roles.relay_fraction * size)
    if count:
        candidates = [node for node in range(size) if node not in relays]
        if roles.relay_choice == "degree":
            candidates.sort(key=lambda node: (-len(neighbours[node]), node))
            relays.update(candidates[:count])
        else:
            rng = np.random.default_rng(derive_seed(scenario.seed, STREAM_ROLES))
            picked = rng.choice(len(candidates), size=min(count, len(candidates)), replace=False)
            relays.update(candidates[int(index)] for index in picked)
    if len(relays) >= size:
        raise ConfigError("roles", sorted(relays), "at least one data-holding node")
    return [node in relays for node in range(size)]


def draw_speeds(spec: SpeedSpec, size: int, *, seed: int) -> list[float]:
    """Each node's compute speed factor.

    Raises:
        ConfigError: ``values`` is given with a length other than the number of nodes.
    """
    if spec.values:
        if len(spec.values) != size:
            raise ConfigError("devices.speed.values", len(spec.values), f"{size} factors")
        return [float(value) for value in spec.values]
    rng = np.random.default_rng(derive_seed(seed, STREAM_SPEED))
    match spec.dist:
        case "constant":
            return [spec.value] * size
        case "uniform":
            return [float(value) for value in rng.uniform(spec.low, spec.high, size)]
        case "lognormal":
            return [float(value) for value in rng.lognormal(0.0, spec.sigma, size)]
    raise AssertionError(spec.dist)


def build_population(scenario: Scenario, *, on_phase: PhaseHook | None = None) -> Population:
    """Build the graph, identities, roles, data and speeds of ``scenario``.

    ``on_phase`` is told each setup phase as it begins ("building the graph", "partitioning
    data", "generating keys").

    Raises:
        TopologyError: the topology is invalid or disconnected where it must be connected.
        ConfigError: a data, learner, role or device setting is invalid.
    """
    phase = on_phase or (lambda _name: None)
    phase("building the graph")
    topology: dict[str, object] = {"kind": scenario.topology.kind, **scenario.topology_params()}
    # Sybil clones extend the graph, so adversaries need it built; otherwise a topology with
    # an implicit form (complete) is never stored as n^2 edges.
    implicit = None if scenario.adversaries else topologies.implicit_neighbours(topology)
    graph: nx.Graph | None = None
    if implicit is None:
        graph = topologies.build(topology, require_connected=scenario.topology.require_connected)
        neighbours: Sequence[Sequence[int]] = [
            sorted(graph.neighbors(node)) for node in range(graph.number_of_nodes())
        ]
    else:
        neighbours = implicit
    base_size = len(neighbours)
    relay = choose_relays(scenario, neighbours)
    plan = None
    if scenario.adversaries:
        assert graph is not None
        plan = plan_adversaries(scenario.adversaries, graph, relay, seed=scenario.seed)
        neighbours = [sorted(graph.neighbors(node)) for node in range(graph.number_of_nodes())]
    server = None
    if mode_traits(scenario.protocol.mode).server:
        server, graph, plan = _add_server(scenario, len(neighbours), plan)
        neighbours = [sorted(graph.neighbors(node)) for node in range(graph.number_of_nodes())]
        relay.append(True)
        base_size += 1
    size = len(neighbours)
    relay += [False] * (size - base_size)
    holders = [node for node in range(base_size) if not relay[node]]
    phase("partitioning data")
    try:
        federation = build_federation(
            scenario.data.dataset,
            scenario.data.params,
            scenario.data.partition,
            scenario.data.partition_params,
            num_nodes=len(holders),
            model=scenario.learner.model,
            model_params=scenario.learner.model_parameters(),
            seed=scenario.seed,
            test_fraction=scenario.data.test_fraction,
        )
    except ConfigError as exc:
        if exc.key == "model" or exc.key.startswith("model_params."):
            raise ConfigError(f"learner.{exc.key}", exc.value, exc.allowed) from None
        raise
    part_of = {node: index for index, node in enumerate(holders)}
    holder_samples = [len(part) for part in federation.train_parts]
    relay_samples = max(1, round(sum(holder_samples) / len(holder_samples)))
    classes = federation.num_classes
    empty = (torch.zeros(0, *federation.input_shape), torch.zeros(0, dtype=torch.long))
    pool = federation.train_pool
    full = (pool.x, pool.y)
    holder_starts = list(itertools.accumulate(holder_samples[:-1], initial=0))
    batch_size = scenario.learner.batch_size
    samplers: list[MinibatchSampler | None] = []
    train_sets: list[tuple[Tensor, Tensor]] = []
    samples: list[int] = []
    # Where each node's share begins in the pool; a share that is not rows of the
    # federation's pool (poisoned data) is appended to it below.
    starts = [0] * size
    appended: dict[int, tuple[Tensor, Tensor]] = {}
    for node in range(size):
        spec = plan.spec_of(node) if plan is not None else None
        part = part_of.get(node)
        if node >= base_size:  # a Sybil clone: the attacker's (poisoned) copy of all data
            assert spec is not None
            data = poison(spec, full, full, classes) if spec.attack in DATA_ATTACKS else full
            seed = derive_seed(scenario.seed, STREAM_ADVERSARIES, node, 4)
            samplers.append(MinibatchSampler(len(data[0]), batch_size, seed=seed))
            train_sets.append(data)
            samples.append(relay_samples)
            if data is not full:
                appended[node] = data
        elif part is None:
            samplers.append(None)
            train_sets.append(empty)
            samples.append(relay_samples)
        else:
            own = federation.train_parts[part]
            data = (own.x, own.y)
            starts[node] = holder_starts[part]
            if spec is not None and spec.attack in DATA_ATTACKS:
                data = poison(spec, data, full, classes)
                seed = federation.batch_seed(part)
                samplers.append(MinibatchSampler(len(data[0]), batch_size, seed=seed))
            else:
                samplers.append(federation.sampler(part, batch_size=batch_size))
            train_sets.append(data)
            samples.append(len(data[0]))
            if data[0] is not own.x or data[1] is not own.y:
                appended[node] = data
    pool_x, pool_y = full
    if appended:
        federation, pool_x, pool_y = _append_shares(federation, appended, starts, train_sets)
    shares = Shares(pool_x, pool_y, torch.tensor(starts, dtype=torch.int64))
    phase("generating keys")
    identities = [simulated_identity(scenario.seed, node) for node in range(size)]
    return Population(
        neighbours=neighbours,
        identities=identities,
        federation=federation,
        samplers=samplers,
        train_sets=train_sets,
        train_shares=shares,
        relay=relay,
        samples=samples,
        speed=draw_speeds(scenario.devices.speed, size, seed=scenario.seed),
        adversaries=plan,
        topology=topology,
        built_graph=graph,
        server=server,
    )


def _append_shares(
    federation: Federation,
    appended: dict[int, tuple[Tensor, Tensor]],
    starts: list[int],
    train_sets: list[tuple[Tensor, Tensor]],
) -> tuple[Federation, Tensor, Tensor]:
    """Append the training sets that are not rows of the federation's pool (poisoned ones)
    to a new pool; point ``starts`` and ``train_sets`` at it and return the federation with
    its shares as views of it too, so that the old pool is freed rather than held twice.

    Returns:
        The federation and the new pool's examples and labels.
    """
    old = federation.train_pool
    pool_x = torch.cat([old.x, *(x for x, _ in appended.values())])
    pool_y = torch.cat([old.y, *(y for _, y in appended.values())])
    at = len(old)
    for node, (_, y) in appended.items():
        starts[node] = at
        at += len(y)
    for node, (x, _) in enumerate(train_sets):
        if len(x):
            rows = slice(starts[node], starts[node] + len(x))
            train_sets[node] = (pool_x[rows], pool_y[rows])
    pool = ArrayDataset(pool_x[: len(old)], pool_y[: len(old)], old.num_classes, old.owners)
    parts = []
    begin = 0
    for part in federation.train_parts:
        rows = slice(begin, begin + len(part))
        parts.append(ArrayDataset(pool_x[rows], pool_y[rows], part.num_classes, part.owners))
        begin += len(part)
    federation = dataclasses.replace(federation, train_pool=pool, train_parts=tuple(parts))
    return federation, pool_x, pool_y


def _add_server(
    scenario: Scenario, clients: int, plan: AdversaryPlan | None
) -> tuple[int, nx.Graph, AdversaryPlan | None]:
    """The server's index, the star around it and the adversary plan with the server honest.

    Raises:
        ConfigError: an adversary entry asks for Sybils (they would need their own clients'
            place in the star; not supported).
    """
    for index, spec in enumerate(scenario.adversaries):
        if spec.sybils is not None:
            raise ConfigError(
                f"adversaries[{index}].sybils",
                spec.sybils,
                f"absent with protocol.mode = {scenario.protocol.mode!r} (Byzantine clients "
                "are placed with nodes, fraction or count)",
            )
    if plan is not None:
        plan = dataclasses.replace(plan, base_size=clients + 1, entry_of=(*plan.entry_of, None))
    return clients, with_server(clients), plan


def with_server(size: int) -> nx.Graph:
    """The star of a server mode: nodes 0..size-1 as clients, and node ``size`` linked to each
    (``size`` edges, whatever the clients' topology was)."""
    star = nx.Graph()
    star.add_nodes_from(range(size + 1))
    star.add_edges_from((size, client) for client in range(size))
    return star


def initial_vectors(scenario: Scenario, population: Population) -> list[Tensor]:
    """Each node's starting model: the federation's (``learner.init = "shared"``) or one
    initialised from a per-node seed derived from the run seed (``"independent"``).

    Shared: the one tensor, in every slot, not a copy each: cores copy what they are given,
    and a copy per node here would double the models' memory while the cores are built.
    Treat the result as read-only."""
    federation = population.federation
    if scenario.learner.init == "shared":
        return [federation.init_vector] * population.size
    return [
        flatten(federation.build_model(derive_seed(scenario.seed, STREAM_INIT_NODE, node)))
        for node in range(population.size)
    ]
