"""Named topology generators on networkx, topology files, and spectral facts of a graph.

Every generator labels nodes ``0..n-1``, returns an undirected :class:`networkx.Graph`, and
raises :class:`~p2pfl.errors.TopologyError` naming the parameter, its value and the allowed
range when an argument is invalid. Random generators take a networkx-style ``seed``.

    >>> import topologies
    >>> G = topologies.build("barabasi_albert:n=64,m=2,seed=1")
    >>> topologies.graph_facts(G).connected
    True

``topologies.facts`` is the module :mod:`topologies.facts`; its summary function
``topologies.facts.facts`` is exported here as :func:`graph_facts`, so that the package
attribute never shadows the module (``import topologies.facts as m`` and
``mock.patch("topologies.facts.X")`` would otherwise reach the function).
"""

from topologies import facts, io, registry
from topologies.classic import (
    AllBut,
    CompleteAdjacency,
    complete,
    complete_adjacency,
    line,
    ring,
    star,
)
from topologies.facts import (
    DegreeStats,
    GraphFacts,
    degree_stats,
    diameter,
    metropolis_hastings_weights,
    spectral_gap,
)
from topologies.facts import facts as graph_facts
from topologies.io import load, load_edgelist, load_graphml, save, save_edgelist, save_graphml
from topologies.lattice import grid, torus
from topologies.random_graphs import (
    barabasi_albert,
    erdos_renyi,
    random_geometric,
    random_regular,
    watts_strogatz,
)
from topologies.registry import (
    Generator,
    Param,
    ParamRow,
    build,
    describe,
    implicit_neighbours,
    kinds,
    register,
)
from topologies.structured import exponential, two_cliques

__all__ = [
    "AllBut",
    "CompleteAdjacency",
    "DegreeStats",
    "Generator",
    "GraphFacts",
    "Param",
    "ParamRow",
    "barabasi_albert",
    "build",
    "complete",
    "complete_adjacency",
    "degree_stats",
    "describe",
    "diameter",
    "erdos_renyi",
    "exponential",
    "facts",
    "graph_facts",
    "grid",
    "implicit_neighbours",
    "io",
    "kinds",
    "line",
    "load",
    "load_edgelist",
    "load_graphml",
    "metropolis_hastings_weights",
    "random_geometric",
    "random_regular",
    "register",
    "registry",
    "ring",
    "save",
    "save_edgelist",
    "save_graphml",
    "spectral_gap",
    "star",
    "torus",
    "two_cliques",
    "watts_strogatz",
]
