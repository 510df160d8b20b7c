"""Random topologies: Erdős–Rényi, random regular, Watts–Strogatz, Barabási–Albert, geometric.

Every generator takes ``seed`` (None or a non-negative int) and passes it to networkx, so the
same int gives the same graph. Generators with ``connected=True`` resample with seeds derived
from ``seed`` (see :func:`topologies._check.derived_seed`) until the graph is connected, up to
:data:`MAX_CONNECT_ATTEMPTS` draws.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import networkx as nx

from p2pfl.errors import TopologyError
from topologies._check import (
    MAX_CONNECT_ATTEMPTS,
    canonical,
    check_at_least,
    check_bool,
    check_int,
    check_probability,
    check_real,
    check_seed,
    derived_seed,
    fail,
)

__all__ = [
    "MAX_CONNECT_ATTEMPTS",
    "barabasi_albert",
    "erdos_renyi",
    "random_geometric",
    "random_regular",
    "watts_strogatz",
]


def _normalise(graph: nx.Graph) -> nx.Graph:
    return canonical(graph.number_of_nodes(), graph.edges(), source=graph)


def _draw_connected(
    draw: Callable[[int | None], nx.Graph], seed: int | None, *, connected: bool
) -> nx.Graph | None:
    """Draw once, or until connected when ``connected``; None if every attempt failed."""
    attempts = MAX_CONNECT_ATTEMPTS if connected else 1
    for attempt in range(attempts):
        graph = draw(derived_seed(seed, attempt))
        if not connected or nx.is_connected(graph):
            return _normalise(graph)
    return None


def _gnp(n: int, p: float, seed: int | None) -> nx.Graph:
    # networkx's fast generator divides by log(1 - p), which is 0.0 in floating point for
    # p below ~1.1e-16; the quadratic generator draws the same distribution without it.
    if 0.0 < p < 1e-12:
        return nx.gnp_random_graph(n, p, seed=seed)
    return nx.fast_gnp_random_graph(n, p, seed=seed)


def erdos_renyi(n: int, p: float, seed: int | None = None, *, connected: bool = False) -> nx.Graph:
    """G(n, p) random graph: each of the ``n (n - 1) / 2`` edges is present with probability p.

    Args:
        n: Number of nodes, ``n >= 1``.
        p: Edge probability, ``0 <= p <= 1``.
        seed: None or a non-negative int.
        connected: Resample until the graph is connected.

    Returns:
        The random graph.

    Raises:
        TopologyError: If an argument is out of range, or if ``connected`` and no connected
            graph was drawn in :data:`MAX_CONNECT_ATTEMPTS` attempts (raise ``p``).
    """
    n = check_at_least("erdos_renyi", "n", n, 1)
    p = check_probability("erdos_renyi", "p", p)
    seed = check_seed("erdos_renyi", seed)
    connected = check_bool("erdos_renyi", "connected", connected)
    graph = _draw_connected(lambda s: _gnp(n, p, s), seed, connected=connected)
    if graph is None:
        threshold = math.log(n) / n
        raise TopologyError(
            f"erdos_renyi: no connected graph in {MAX_CONNECT_ATTEMPTS} attempts with p = {p!r} "
            f"(n = {n}); raise p (connectivity threshold ln(n)/n = {threshold:.3g})"
        )
    return graph


def random_regular(n: int, d: int, seed: int | None = None) -> nx.Graph:
    """Uniformly random d-regular graph: every node has degree exactly ``d``.

    Args:
        n: Number of nodes, ``n >= 1``.
        d: Degree, ``0 <= d < n`` with ``n * d`` even.
        seed: None or a non-negative int.

    Returns:
        The random regular graph (not necessarily connected for ``d <= 2``).

    Raises:
        TopologyError: If ``n < 1``, ``d`` is outside ``0 <= d < n``, ``n * d`` is odd, or
            ``seed`` is invalid.
    """
    n = check_at_least("random_regular", "n", n, 1)
    d = check_int("random_regular", "d", d)
    if not 0 <= d < n:
        raise fail("random_regular", "d", d, "0 <= d < n", n=n)
    if (n * d) % 2:
        raise fail("random_regular", "d", d, "n * d is even", n=n)
    seed = check_seed("random_regular", seed)
    return _normalise(nx.random_regular_graph(d, n, seed=seed))


def watts_strogatz(n: int, k: int, p: float, seed: int | None = None) -> nx.Graph:
    """Watts–Strogatz small world: a ring linking each node to its ``k`` nearest, rewired.

    Each edge of the ring lattice is rewired to a random endpoint with probability ``p``.

    Args:
        n: Number of nodes, ``n >= 3``.
        k: Even number of lattice neighbours per node, ``2 <= k < n``.
        p: Rewiring probability, ``0 <= p <= 1``.
        seed: None or a non-negative int.

    Returns:
        The small-world graph (rewiring may disconnect it).

    Raises:
        TopologyError: If an argument is out of range.
    """
    n = check_at_least("watts_strogatz", "n", n, 3)
    k = check_int("watts_strogatz", "k", k)
    if not 2 <= k < n:
        raise fail("watts_strogatz", "k", k, "2 <= k < n", n=n)
    if k % 2:
        raise fail("watts_strogatz", "k", k, "k is even")
    p = check_probability("watts_strogatz", "p", p)
    seed = check_seed("watts_strogatz", seed)
    return _normalise(nx.watts_strogatz_graph(n, k, p, seed=seed))


def barabasi_albert(n: int, m: int, seed: int | None = None) -> nx.Graph:
    """Barabási–Albert preferential attachment: each new node links to ``m`` existing ones.

    Args:
        n: Number of nodes, ``n >= 2``.
        m: Edges added per new node, ``1 <= m < n``.
        seed: None or a non-negative int.

    Returns:
        The scale-free graph (always connected).

    Raises:
        TopologyError: If ``n < 2``, ``m`` is outside ``1 <= m < n``, or ``seed`` is invalid.
    """
    n = check_at_least("barabasi_albert", "n", n, 2)
    m = check_int("barabasi_albert", "m", m)
    if not 1 <= m < n:
        raise fail("barabasi_albert", "m", m, "1 <= m < n", n=n)
    seed = check_seed("barabasi_albert", seed)
    return _normalise(nx.barabasi_albert_graph(n, m, seed=seed))


def random_geometric(
    n: int, radius: float, seed: int | None = None, *, connected: bool = False
) -> nx.Graph:
    """Random geometric graph: ``n`` uniform points in the unit square, linked within ``radius``.

    Node attribute ``pos`` holds each node's ``[x, y]`` position.

    Args:
        n: Number of nodes, ``n >= 1``.
        radius: Euclidean link distance, ``radius >= 0``.
        seed: None or a non-negative int.
        connected: Resample until the graph is connected.

    Returns:
        The geometric graph.

    Raises:
        TopologyError: If an argument is out of range, or if ``connected`` and no connected
            graph was drawn in :data:`MAX_CONNECT_ATTEMPTS` attempts (raise ``radius``).
    """
    n = check_at_least("random_geometric", "n", n, 1)
    radius = check_real("random_geometric", "radius", radius)
    if radius < 0:
        raise fail("random_geometric", "radius", radius, "radius >= 0")
    seed = check_seed("random_geometric", seed)
    connected = check_bool("random_geometric", "connected", connected)
    graph = _draw_connected(
        lambda s: nx.random_geometric_graph(n, radius, seed=s), seed, connected=connected
    )
    if graph is None:
        threshold = math.sqrt(math.log(n) / (math.pi * n))
        raise TopologyError(
            f"random_geometric: no connected graph in {MAX_CONNECT_ATTEMPTS} attempts with "
            f"radius = {radius!r} (n = {n}); raise radius "
            f"(connectivity threshold sqrt(ln(n)/(pi*n)) = {threshold:.3g})"
        )
    return graph
