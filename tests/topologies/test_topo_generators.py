"""Generators: node labels, degree structure, determinism and argument errors."""

from __future__ import annotations

from collections.abc import Callable

import networkx as nx
import pytest

import topologies as T
from p2pfl.errors import TopologyError
from topologies._check import MAX_CONNECT_ATTEMPTS, derived_seed

# (name, generator call, expected number of nodes)
CASES: list[tuple[str, Callable[[], nx.Graph], int]] = [
    ("ring", lambda: T.ring(10), 10),
    ("line", lambda: T.line(10), 10),
    ("star", lambda: T.star(10), 10),
    ("complete", lambda: T.complete(10), 10),
    ("grid", lambda: T.grid(3, 4), 12),
    ("torus", lambda: T.torus(3, 5), 15),
    ("erdos_renyi", lambda: T.erdos_renyi(20, 0.2, seed=1), 20),
    ("erdos_renyi_connected", lambda: T.erdos_renyi(20, 0.2, seed=1, connected=True), 20),
    ("random_regular", lambda: T.random_regular(20, 3, seed=1), 20),
    ("watts_strogatz", lambda: T.watts_strogatz(20, 4, 0.3, seed=1), 20),
    ("barabasi_albert", lambda: T.barabasi_albert(20, 2, seed=1), 20),
    ("random_geometric", lambda: T.random_geometric(20, 0.4, seed=1), 20),
    ("exponential", lambda: T.exponential(20), 20),
    ("two_cliques", lambda: T.two_cliques(11), 11),
]


@pytest.mark.parametrize(("name", "make", "n"), CASES, ids=[c[0] for c in CASES])
def test_nodes_are_0_to_n_minus_1_in_order(name: str, make: Callable[[], nx.Graph], n: int) -> None:
    graph = make()
    assert type(graph) is nx.Graph
    assert list(graph.nodes) == list(range(n))
    assert nx.number_of_selfloops(graph) == 0


def degrees(graph: nx.Graph) -> set[int]:
    return {d for _, d in graph.degree()}


def test_classic_degrees() -> None:
    assert degrees(T.ring(7)) == {2}
    assert degrees(T.complete(7)) == {6}
    assert sorted(d for _, d in T.line(5).degree()) == [1, 1, 2, 2, 2]
    star = T.star(6)
    assert star.degree(0) == 5
    assert all(star.degree(i) == 1 for i in range(1, 6))
    assert T.line(1).number_of_nodes() == 1
    assert T.star(1).number_of_edges() == 0


def test_lattices() -> None:
    grid = T.grid(3, 4)
    assert grid.number_of_edges() == 3 * 3 + 2 * 4
    assert grid.has_edge(0, 1) and grid.has_edge(0, 4) and not grid.has_edge(3, 4)
    torus = T.torus(4, 5)
    assert degrees(torus) == {4}
    assert torus.number_of_edges() == 2 * 20
    assert torus.has_edge(0, 4) and torus.has_edge(0, 15)  # row and column wrap-around


@pytest.mark.parametrize("n", [1, 2, 3, 8, 13, 64])
def test_exponential_links_powers_of_two(n: int) -> None:
    graph = T.exponential(n)
    assert nx.is_connected(graph)
    for i in range(n):
        expected = {(i + s * 2**k) % n for k in range(n.bit_length()) if 2**k < n for s in (1, -1)}
        assert set(graph[i]) == expected - {i}


@pytest.mark.parametrize("n", [6, 7, 20])
def test_two_cliques_have_exactly_one_bridge(n: int) -> None:
    graph = T.two_cliques(n)
    a = (n + 1) // 2
    assert list(nx.bridges(graph)) == [(a - 1, a)]
    assert graph.number_of_edges() == a * (a - 1) // 2 + (n - a) * (n - a - 1) // 2 + 1


def test_random_regular_degree() -> None:
    for n, d in [(20, 3), (21, 4), (10, 0), (2, 1)]:
        assert degrees(T.random_regular(n, d, seed=5)) == {d}


def test_barabasi_albert_and_watts_strogatz_shape() -> None:
    ba = T.barabasi_albert(50, 3, seed=2)
    assert ba.number_of_edges() == 3 * (50 - 3)
    assert nx.is_connected(ba)
    ws = T.watts_strogatz(30, 4, 0.0, seed=2)
    assert degrees(ws) == {4}


def test_random_geometric_keeps_positions() -> None:
    graph = T.random_geometric(15, 0.3, seed=4)
    assert all(len(graph.nodes[v]["pos"]) == 2 for v in graph)


RANDOM = [
    lambda s: T.erdos_renyi(30, 0.1, s),
    lambda s: T.erdos_renyi(30, 0.1, s, connected=True),
    lambda s: T.random_regular(30, 4, s),
    lambda s: T.watts_strogatz(30, 4, 0.2, s),
    lambda s: T.barabasi_albert(30, 2, s),
    lambda s: T.random_geometric(30, 0.3, s, connected=True),
]


@pytest.mark.parametrize("make", RANDOM)
def test_same_seed_same_graph(make: Callable[[int], nx.Graph]) -> None:
    first, second, other = make(7), make(7), make(8)
    assert list(first.edges) == list(second.edges)
    assert list(first.edges) != list(other.edges)


def test_connected_resampling_is_deterministic_and_connected() -> None:
    # p = 0.08 on 40 nodes is below the connectivity threshold: most draws are disconnected.
    graph = T.erdos_renyi(40, 0.08, seed=3, connected=True)
    assert nx.is_connected(graph)
    assert list(graph.edges) == list(T.erdos_renyi(40, 0.08, seed=3, connected=True).edges)
    # A first draw that is already connected is returned unchanged.
    plain = T.erdos_renyi(20, 0.5, seed=1)
    assert nx.is_connected(plain)
    assert list(T.erdos_renyi(20, 0.5, seed=1, connected=True).edges) == list(plain.edges)


def test_derived_seeds_are_distinct() -> None:
    seeds = {derived_seed(5, attempt) for attempt in range(MAX_CONNECT_ATTEMPTS)}
    assert len(seeds) == MAX_CONNECT_ATTEMPTS
    assert derived_seed(None, 3) is None


def test_connected_gives_up_with_advice() -> None:
    with pytest.raises(TopologyError, match="raise p"):
        T.erdos_renyi(30, 0.0, seed=1, connected=True)
    with pytest.raises(TopologyError, match="raise radius"):
        T.random_geometric(30, 0.0, seed=1, connected=True)


INVALID: list[tuple[Callable[[], object], str]] = [
    (lambda: T.ring(0), "n = 0"),
    (lambda: T.ring(2), "n = 2"),
    (lambda: T.line(0), "n = 0"),
    (lambda: T.star(-1), "n = -1"),
    (lambda: T.complete(0), "n = 0"),
    (lambda: T.complete(2.5), "n = 2.5"),  # type: ignore[arg-type]
    (lambda: T.complete(True), "n = True"),  # type: ignore[arg-type]
    (lambda: T.grid(0, 3), "rows = 0"),
    (lambda: T.grid(3, 0), "cols = 0"),
    (lambda: T.torus(2, 5), "rows = 2"),
    (lambda: T.torus(5, 2), "cols = 2"),
    (lambda: T.erdos_renyi(0, 0.5), "n = 0"),
    (lambda: T.erdos_renyi(10, 1.5), "p = 1.5"),
    (lambda: T.erdos_renyi(10, -0.1), "p = -0.1"),
    (lambda: T.erdos_renyi(10, float("nan")), "p = nan"),
    (lambda: T.erdos_renyi(10, 0.5, seed=-1), "seed = -1"),
    (lambda: T.erdos_renyi(10, 0.5, seed=1.5), "seed = 1.5"),  # type: ignore[arg-type]
    (lambda: T.erdos_renyi(10, 0.5, connected=1), "connected = 1"),  # type: ignore[arg-type]
    (lambda: T.random_regular(5, 3), "d = 3"),
    (lambda: T.random_regular(5, 5), "d = 5"),
    (lambda: T.random_regular(5, -1), "d = -1"),
    (lambda: T.watts_strogatz(10, 3, 0.1), "k = 3"),
    (lambda: T.watts_strogatz(10, 10, 0.1), "k = 10"),
    (lambda: T.watts_strogatz(10, 4, 2.0), "p = 2.0"),
    (lambda: T.barabasi_albert(64, 64), "m = 64"),
    (lambda: T.barabasi_albert(64, 0), "m = 0"),
    (lambda: T.barabasi_albert(1, 1), "n = 1"),
    (lambda: T.random_geometric(10, -0.5), "radius = -0.5"),
    (lambda: T.exponential(0), "n = 0"),
    (lambda: T.two_cliques(5), "n = 5"),
]


@pytest.mark.parametrize(("call", "needle"), INVALID, ids=[needle for _, needle in INVALID])
def test_invalid_arguments_name_parameter_and_value(
    call: Callable[[], object], needle: str
) -> None:
    with pytest.raises(TopologyError) as info:
        call()
    assert needle in str(info.value)
    assert isinstance(info.value, ValueError)


def test_error_message_states_allowed_range() -> None:
    with pytest.raises(TopologyError) as info:
        T.barabasi_albert(64, 64)
    assert str(info.value) == "barabasi_albert: m = 64 must satisfy 1 <= m < n (n = 64)"
    with pytest.raises(TopologyError, match=r"n \* d is even"):
        T.random_regular(5, 3)
