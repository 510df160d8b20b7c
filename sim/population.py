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
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import networkx as nx
import numpy as np
import torch
from torch import Tensor

import topologies
from p2pfl.errors import ConfigError
from p2pfl.identity import Identity, NodeId
from p2pfl.learn import Federation, MinibatchSampler, build_federation, derive_seed
from p2pfl.params import ParamLayout
from sim.scenario import Scenario, SpeedSpec

STREAM_ROLES = 12
STREAM_SPEED = 13


@dataclass(slots=True)
class Population:
    """The nodes of one run, indexed 0..n-1 as in the topology."""

    graph: nx.Graph
    neighbours: list[list[int]]
    identities: list[Identity]
    federation: Federation
    samplers: list[MinibatchSampler | None]
    train_sets: list[tuple[Tensor, Tensor]]
    relay: list[bool]
    samples: list[int]
    speed: list[float]

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


def choose_relays(scenario: Scenario, graph: nx.Graph) -> list[bool]:
    """Which nodes are relays: listed, or a fraction chosen at random or by highest degree.

    Raises:
        ConfigError: a listed relay is not a node, or no data holder would remain.
    """
    size = graph.number_of_nodes()
    roles = scenario.roles
    relays = set(roles.relays)
    if any(node >= size for node in relays):
        raise ConfigError("roles.relays", roles.relays, f"node indices in 0..{size - 1}")
    count = round(roles.relay_fraction * size)
    if count:
        candidates = [node for node in range(size) if node not in relays]
        if roles.relay_choice == "degree":
            candidates.sort(key=lambda node: (-graph.degree(node), node))
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


def build_population(scenario: Scenario) -> Population:
    """Build the graph, identities, roles, data and speeds of ``scenario``.

    Raises:
        TopologyError: the topology is invalid or disconnected where it must be connected.
        ConfigError: a data, learner, role or device setting is invalid.
    """
    graph = topologies.build(
        {"kind": scenario.topology.kind, **scenario.topology_params()},
        require_connected=scenario.topology.require_connected,
    )
    size = graph.number_of_nodes()
    relay = choose_relays(scenario, graph)
    holders = [node for node in range(size) if not relay[node]]
    federation = build_federation(
        scenario.data.dataset,
        scenario.data.params,
        scenario.data.partition,
        scenario.data.partition_params,
        num_nodes=len(holders),
        model=scenario.learner.hidden,
        seed=scenario.seed,
        test_fraction=scenario.data.test_fraction,
    )
    part_of = {node: index for index, node in enumerate(holders)}
    holder_samples = [len(part) for part in federation.train_parts]
    relay_samples = max(1, round(sum(holder_samples) / len(holder_samples)))
    dim = federation.layer_sizes[0]
    empty = (torch.zeros(0, dim), torch.zeros(0, dtype=torch.long))
    samplers: list[MinibatchSampler | None] = []
    train_sets: list[tuple[Tensor, Tensor]] = []
    samples: list[int] = []
    for node in range(size):
        part = part_of.get(node)
        if part is None:
            samplers.append(None)
            train_sets.append(empty)
            samples.append(relay_samples)
        else:
            data = federation.train_parts[part]
            samplers.append(federation.sampler(part, batch_size=scenario.learner.batch_size))
            train_sets.append((data.x, data.y))
            samples.append(len(data))
    return Population(
        graph=graph,
        neighbours=[sorted(graph.neighbors(node)) for node in range(size)],
        identities=[simulated_identity(scenario.seed, node) for node in range(size)],
        federation=federation,
        samplers=samplers,
        train_sets=train_sets,
        relay=relay,
        samples=samples,
        speed=draw_speeds(scenario.devices.speed, size, seed=scenario.seed),
    )
