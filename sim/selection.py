"""Choosing nodes for a disruption or an attack: at random or by highest centrality.

Disruptions choose in the graph as it is when they fire, adversaries in the starting graph;
both choose the same way, from the caller's candidates and random stream.
"""

from __future__ import annotations

from collections.abc import Sequence

import networkx as nx
import numpy as np

from topologies.facts import centrality


def choose_nodes(
    candidates: Sequence[int],
    wanted: int,
    choose: str,
    *,
    graph: nx.Graph,
    rng: np.random.Generator,
    centrality_seed: int,
) -> list[int]:
    """``wanted`` of ``candidates`` (fewer if there are not enough).

    ``choose = "random"`` draws them from ``rng`` and returns them sorted; a centrality
    measure returns the highest-scoring first (ties to the smaller index), scored in
    ``graph`` (nodes missing from it score 0).
    """
    wanted = min(wanted, len(candidates))
    if choose == "random":
        picked = rng.choice(len(candidates), size=wanted, replace=False)
        return sorted(candidates[int(row)] for row in picked)
    scores = centrality(graph, choose, seed=centrality_seed)
    return sorted(candidates, key=lambda node: (-scores.get(node, 0.0), node))[:wanted]
