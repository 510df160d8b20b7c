"""Everything per node that a run needs before its first event: graph, keys, data, samplers.

Data, test split, partition, initial model and minibatch streams come from
:func:`p2pfl.learn.build_federation`, the same derivation ``p2pfl node`` uses, so a node of a
simulation and a live node with the same run seed and index hold the same data.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import networkx as nx
from torch import Tensor

import topologies
from p2pfl.identity import Identity, NodeId
from p2pfl.learn import Federation, MinibatchSampler, build_federation
from p2pfl.params import ParamLayout
from sim.scenario import Scenario


@dataclass(slots=True)
class Population:
    """The nodes of one run, indexed 0..n-1 as in the topology."""

    graph: nx.Graph
    neighbours: list[list[int]]
    identities: list[Identity]
    federation: Federation
    samplers: list[MinibatchSampler]
    train_sets: list[tuple[Tensor, Tensor]]

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


def build_population(scenario: Scenario) -> Population:
    """Build the graph, identities and data of ``scenario``.

    Raises:
        TopologyError: the topology is invalid or disconnected where it must be connected.
        ConfigError: a data or learner setting is invalid.
    """
    graph = topologies.build(
        {"kind": scenario.topology.kind, **scenario.topology_params()},
        require_connected=scenario.topology.require_connected,
    )
    size = graph.number_of_nodes()
    federation = build_federation(
        scenario.data.dataset,
        scenario.data.params,
        scenario.data.partition,
        scenario.data.partition_params,
        num_nodes=size,
        model=scenario.learner.hidden,
        seed=scenario.seed,
        test_fraction=scenario.data.test_fraction,
    )
    samplers = [
        federation.sampler(node, batch_size=scenario.learner.batch_size) for node in range(size)
    ]
    return Population(
        graph=graph,
        neighbours=[sorted(graph.neighbors(node)) for node in range(size)],
        identities=[simulated_identity(scenario.seed, node) for node in range(size)],
        federation=federation,
        samplers=samplers,
        train_sets=[(part.x, part.y) for part in federation.train_parts],
    )
