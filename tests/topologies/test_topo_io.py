"""Topology files: GraphML and edge-list round trips, relabelling, and unreadable files."""

from __future__ import annotations

from pathlib import Path

import networkx as nx
import pytest

import topologies as T
from p2pfl.errors import TopologyError


def same(a: nx.Graph, b: nx.Graph) -> bool:
    return list(a.nodes) == list(b.nodes) and sorted(a.edges) == sorted(b.edges)


GRAPHS = {
    "barabasi_albert": T.barabasi_albert(40, 2, seed=3),
    "torus": T.torus(3, 4),
    "with_isolated_nodes": T.erdos_renyi(15, 0.1, seed=2),
    "single_node": T.complete(1),
}


@pytest.mark.parametrize("name", GRAPHS)
@pytest.mark.parametrize("suffix", [".graphml", ".edgelist", ".csv"])
def test_round_trip(tmp_path: Path, name: str, suffix: str) -> None:
    graph = GRAPHS[name]
    path = tmp_path / f"topology{suffix}"
    T.save(graph, path)
    assert same(T.load(path), graph)


def test_explicit_functions_round_trip(tmp_path: Path) -> None:
    graph = T.exponential(12)
    T.save_graphml(graph, tmp_path / "a.xml")
    T.save_edgelist(graph, tmp_path / "a.txt")
    assert same(T.load_graphml(tmp_path / "a.xml"), graph)
    assert same(T.load_edgelist(tmp_path / "a.txt"), graph)


def test_graphml_skips_non_scalar_attributes(tmp_path: Path) -> None:
    graph = T.random_geometric(10, 0.5, seed=1)
    graph.nodes[0]["label"] = "first"
    graph.edges[next(iter(graph.edges))]["weight"] = 2.5
    T.save_graphml(graph, tmp_path / "g.graphml")
    loaded = T.load_graphml(tmp_path / "g.graphml")
    assert same(loaded, graph)
    assert loaded.nodes[0] == {"label": "first"}
    assert loaded.edges[next(iter(graph.edges))] == {"weight": 2.5}


def test_edgelist_relabels_in_sorted_label_order(tmp_path: Path) -> None:
    path = tmp_path / "g.edges"
    path.write_text("# comment\n10 2  # trailing\n2,30\n\n7\n30\t10 1.5 extra\n")
    graph = T.load_edgelist(path)
    # labels 2 < 7 < 10 < 30 numerically -> 0, 1, 2, 3; "7" is an isolated node
    assert list(graph.nodes) == [0, 1, 2, 3]
    assert sorted(graph.edges) == [(0, 2), (0, 3), (2, 3)]


def test_non_numeric_labels_sort_as_strings(tmp_path: Path) -> None:
    path = tmp_path / "g.txt"
    path.write_text("carol alice\nbob carol\nalice alice\n")
    graph = T.load(path)
    # alice, bob, carol -> 0, 1, 2; the self-loop is dropped
    assert sorted(graph.edges) == [(0, 2), (1, 2)]


def test_graphml_directed_multigraph_becomes_simple(tmp_path: Path) -> None:
    source = nx.MultiDiGraph([("b", "a"), ("a", "b"), ("a", "b"), ("c", "c"), ("c", "a")])
    nx.write_graphml(source, tmp_path / "m.graphml")
    graph = T.load_graphml(tmp_path / "m.graphml")
    assert type(graph) is nx.Graph
    assert sorted(graph.edges) == [(0, 1), (0, 2)]


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("empty.graphml", ""),
        ("broken.graphml", "<graphml><graph"),
        (
            "nodeless.graphml",
            '<graphml xmlns="http://graphml.graphdrawing.org/xmlns">'
            '<graph edgedefault="undirected"/></graphml>',
        ),
        ("empty.edgelist", ""),
        ("comments.edgelist", "# only a comment\n\n"),
    ],
)
def test_unusable_files_raise(tmp_path: Path, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(TopologyError, match=name):
        T.load(path)


def test_missing_binary_and_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match="does not exist"):
        T.load(tmp_path / "missing.graphml")
    binary = tmp_path / "binary.edgelist"
    binary.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(TopologyError, match="cannot read"):
        T.load(binary)
    with pytest.raises(TopologyError, match="suffix '.json'"):
        T.load(tmp_path / "g.json")
    with pytest.raises(TopologyError, match="suffix '.json'"):
        T.save(T.ring(3), tmp_path / "g.json")


def test_edgelist_rejects_labels_with_separators(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match="'a b'"):
        T.save_edgelist(nx.Graph([("a b", "c")]), tmp_path / "g.txt")
