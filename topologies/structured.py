"""Structured topologies studied in decentralised learning: exponential graph, two cliques.

The exponential graph is the sparse, fast-mixing topology of Ying et al. (2021, "Exponential
Graph is Provably Efficient for Decentralized Deep Training"); two cliques joined by one edge
is the classic worst case for gossip, where all information crosses a single bridge.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import networkx as nx

from topologies._check import canonical, check_at_least

__all__ = ["exponential", "two_cliques"]


def _exponential_edges(n: int) -> Iterator[tuple[int, int]]:
    for i in range(n):
        hop = 1
        while hop < n:
            yield i, (i + hop) % n
            hop *= 2


def exponential(n: int) -> nx.Graph:
    """Undirected exponential graph: node ``i`` is linked to ``i ± 2**k mod n`` for ``2**k < n``.

    Each node has degree at most ``2 * ceil(log2(n))``; the graph is connected for every
    ``n`` (it contains the ring through hops of 1).

    Args:
        n: Number of nodes, ``n >= 1``.

    Returns:
        The exponential graph.

    Raises:
        TopologyError: If ``n`` is not an int ``>= 1``.
    """
    n = check_at_least("exponential", "n", n, 1)
    return canonical(n, _exponential_edges(n))


def two_cliques(n: int) -> nx.Graph:
    """Two cliques joined by a single bridge edge.

    The first clique holds nodes ``0..a-1`` with ``a = ceil(n / 2)``, the second the other
    ``n - a`` nodes; the bridge links ``a - 1`` to ``a``.

    Args:
        n: Total number of nodes, ``n >= 6`` so that each clique has at least 3 nodes and
            the bridge is the graph's only cut edge.

    Returns:
        The two-clique graph.

    Raises:
        TopologyError: If ``n`` is not an int ``>= 6``.
    """
    n = check_at_least("two_cliques", "n", n, 6)
    a = (n + 1) // 2
    edges = itertools.chain(
        itertools.combinations(range(a), 2),
        itertools.combinations(range(a, n), 2),
        [(a - 1, a)],
    )
    return canonical(n, edges)
