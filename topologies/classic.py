"""Deterministic classic topologies: ring, line, star and complete graph.

All generators label nodes ``0..n-1`` and return an undirected :class:`networkx.Graph`.
"""

from __future__ import annotations

import itertools

import networkx as nx

from topologies._check import canonical, check_at_least

__all__ = ["complete", "line", "ring", "star"]


def ring(n: int) -> nx.Graph:
    """Cycle ``0 - 1 - ... - (n-1) - 0``; every node has degree 2.

    Args:
        n: Number of nodes, ``n >= 3``.

    Returns:
        The ring.

    Raises:
        TopologyError: If ``n`` is not an int ``>= 3`` (smaller cycles are not simple graphs;
            use ``line`` instead).
    """
    n = check_at_least("ring", "n", n, 3)
    return canonical(n, ((i, (i + 1) % n) for i in range(n)))


def line(n: int) -> nx.Graph:
    """Path ``0 - 1 - ... - (n-1)``.

    Args:
        n: Number of nodes, ``n >= 1``.

    Returns:
        The path graph.

    Raises:
        TopologyError: If ``n`` is not an int ``>= 1``.
    """
    n = check_at_least("line", "n", n, 1)
    return canonical(n, ((i, i + 1) for i in range(n - 1)))


def star(n: int) -> nx.Graph:
    """Star with hub 0 linked to every other node.

    Args:
        n: Number of nodes including the hub, ``n >= 1``.

    Returns:
        The star graph.

    Raises:
        TopologyError: If ``n`` is not an int ``>= 1``.
    """
    n = check_at_least("star", "n", n, 1)
    return canonical(n, ((0, i) for i in range(1, n)))


def complete(n: int) -> nx.Graph:
    """Complete graph: every node has degree ``n - 1``.

    Args:
        n: Number of nodes, ``n >= 1``.

    Returns:
        The complete graph.

    Raises:
        TopologyError: If ``n`` is not an int ``>= 1``.
    """
    n = check_at_least("complete", "n", n, 1)
    return canonical(n, itertools.combinations(range(n), 2))
