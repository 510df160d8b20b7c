"""Registry: building from strings and tables, metadata, and spec errors."""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import networkx as nx
import pytest

import topologies as T
from p2pfl.errors import TopologyError
from topologies import registry


def edges(graph: nx.Graph) -> list[tuple[int, int]]:
    return list(graph.edges)


def test_string_and_table_build_the_same_graph() -> None:
    from_string = T.build("barabasi_albert:n=64,m=2,seed=1")
    from_table = T.build({"kind": "barabasi_albert", "n": 64, "m": 2, "seed": 1})
    assert edges(from_string) == edges(from_table) == edges(T.barabasi_albert(64, 2, seed=1))


def test_toml_table_builds() -> None:
    table = tomllib.loads('[topology]\nkind = "erdos_renyi"\nn = 30\np = 0.3\nseed = 2\n')
    graph = T.build(table["topology"], require_connected=True)
    assert edges(graph) == edges(T.erdos_renyi(30, 0.3, seed=2))


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("ring:n=5", lambda: T.ring(5)),
        (" ring : n = 5 ", lambda: T.ring(5)),
        ("grid:rows=2,cols=3", lambda: T.grid(2, 3)),
        ("erdos_renyi:n=20,p=1,seed=none", lambda: T.erdos_renyi(20, 1.0)),
        ("erdos_renyi:n=20,p=0.3,seed=4,connected=true", lambda: T.erdos_renyi(20, 0.3, 4)),
        ("random_geometric:n=10,radius=2", lambda: T.random_geometric(10, 2.0)),
        ("two_cliques:n=8", lambda: T.two_cliques(8)),
    ],
)
def test_string_specs(spec: str, expected: Callable[[], nx.Graph]) -> None:
    assert edges(T.build(spec)) == edges(expected())


def test_parse_spec_values() -> None:
    assert registry.parse_spec("k:a=1,b=0.5,c=TRUE,d=false,e=None,f=x.graphml") == {
        "kind": "k",
        "a": 1,
        "b": 0.5,
        "c": True,
        "d": False,
        "e": None,
        "f": "x.graphml",
    }
    assert registry.parse_spec("complete") == {"kind": "complete"}


def test_every_kind_is_described() -> None:
    rows = T.describe()
    assert {row.kind for row in rows} == set(T.kinds())
    ba = [(r.param, r.type, r.default) for r in T.describe("barabasi_albert")]
    assert ba == [
        ("n", "int", "(required)"),
        ("m", "int", "(required)"),
        ("seed", "int | None", "None"),
    ]
    assert all(row.allowed for row in rows)


def test_registry_signatures_match_generators() -> None:
    import inspect

    for kind in T.kinds():
        generator = registry.get(kind)
        signature = inspect.signature(generator.func)
        assert [p.name for p in generator.params] == list(signature.parameters), kind
        for param in generator.params:
            default = signature.parameters[param.name].default
            if param.required:
                assert default is inspect.Parameter.empty, (kind, param.name)
            else:
                assert default == param.default, (kind, param.name)


def test_unknown_kind_lists_known_kinds() -> None:
    with pytest.raises(TopologyError) as info:
        T.build("hypercube:n=8")
    assert "'hypercube'" in str(info.value)
    assert "barabasi_albert" in str(info.value) and "ring" in str(info.value)


def test_unknown_parameter_lists_allowed_names() -> None:
    with pytest.raises(TopologyError) as info:
        T.build({"kind": "barabasi_albert", "n": 10, "k": 2})
    message = str(info.value)
    assert "'k'" in message and "n, m, seed" in message


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("ring:n=abc", "n = 'abc'"),
        ("ring:n=4.0", "n = 4.0"),
        ("ring:n=true", "n = True"),
        ({"kind": "erdos_renyi", "n": 10, "p": "high"}, "p = 'high'"),
        ({"kind": "erdos_renyi", "n": 10, "p": 0.5, "connected": 1}, "connected = 1"),
        ({"kind": "barabasi_albert", "n": 10, "m": 2, "seed": 1.5}, "seed = 1.5"),
    ],
)
def test_wrong_type_names_parameter(spec: str | dict[str, object], needle: str) -> None:
    with pytest.raises(TopologyError, match="must be of type") as info:
        T.build(spec)
    assert needle in str(info.value)


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("barabasi_albert:n=64,m=64", "m = 64"),
        ("random_regular:n=5,d=3", "d = 3"),
        ("erdos_renyi:n=10,p=1.5", "p = 1.5"),
        ("ring:n=0", "n = 0"),
        ("barabasi_albert:n=10", "missing required parameter(s) m"),
        ("ring:n=3,n=4", "given twice"),
        ("ring:n", "key=value"),
        (":n=3", "must start with a kind"),
        ({"n": 3}, "no 'kind'"),
        ({"kind": 3}, "kind = 3"),
    ],
)
def test_bad_specs(spec: str | dict[str, object], needle: str) -> None:
    with pytest.raises(TopologyError) as info:
        T.build(spec)
    assert needle in str(info.value)


def test_spec_of_wrong_shape() -> None:
    with pytest.raises(TopologyError, match="must be a string"):
        T.build(42)  # type: ignore[arg-type]


def test_require_connected() -> None:
    spec = {"kind": "erdos_renyi", "n": 30, "p": 0.0, "seed": 1}
    assert T.build(spec).number_of_edges() == 0
    with pytest.raises(TopologyError, match=r"disconnected \(30 components\).*connected=true"):
        T.build(spec, require_connected=True)
    assert nx.is_connected(T.build("exponential:n=9", require_connected=True))


def test_file_kind(tmp_path: Path) -> None:
    path = tmp_path / "g.graphml"
    T.save(T.ring(6), path)
    assert edges(T.build({"kind": "file", "path": str(path)})) == edges(T.ring(6))


@pytest.fixture
def plugin() -> Iterator[str]:
    kind = "test_plugin_path3"
    registry.register(
        registry.Generator(kind, lambda n: nx.path_graph(n), (registry.Param("n", int),))
    )
    yield kind
    del registry._REGISTRY[kind]


def test_register_plugin(plugin: str) -> None:
    assert plugin in T.kinds()
    assert T.build(f"{plugin}:n=3").number_of_edges() == 2
    with pytest.raises(TopologyError, match="already registered"):
        registry.register(registry.Generator(plugin, nx.path_graph, ()))
