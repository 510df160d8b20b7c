"""The topology registry: generator names, their parameters, and :func:`build` from a spec.

A spec names a generator (its *kind*) and its arguments, either as a string::

    "barabasi_albert:n=64,m=2,seed=1"

or as a mapping, such as a TOML table of a scenario file::

    {"kind": "barabasi_albert", "n": 64, "m": 2, "seed": 1}

Both go through the same checks: the kind must be registered, every key must be one of its
parameters, required parameters must be present and values must have the declared type. The
generator then checks ranges. Plug-ins add generators with :func:`register`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import networkx as nx

from p2pfl.errors import TopologyError
from topologies import classic, io, lattice, random_graphs, structured

__all__ = [
    "REQUIRED",
    "Generator",
    "Param",
    "ParamRow",
    "build",
    "describe",
    "get",
    "kinds",
    "implicit_neighbours",
    "parse_spec",
    "register",
    "resolve",
]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


#: Default of a parameter that has none.
REQUIRED: Any = _Required()

_TYPE_NAMES = {int: "int", float: "float", bool: "bool", str: "str"}


@dataclass(frozen=True, slots=True)
class Param:
    """One parameter of a generator.

    Attributes:
        name: Keyword the generator takes.
        type: ``int``, ``float``, ``bool`` or ``str``; a ``float`` parameter accepts ints.
        default: Default value, or :data:`REQUIRED`.
        allowed: Allowed range or meaning, for humans, e.g. ``"1 <= m < n"``.
        nullable: Whether None is accepted (seeds).
    """

    name: str
    type: type
    default: Any = REQUIRED
    allowed: str = ""
    nullable: bool = False

    @property
    def type_name(self) -> str:
        """Human-readable type, e.g. ``"int | None"``."""
        name = _TYPE_NAMES.get(self.type, self.type.__name__)
        return f"{name} | None" if self.nullable else name

    @property
    def required(self) -> bool:
        """Whether the parameter has no default."""
        return self.default is REQUIRED


@dataclass(frozen=True, slots=True)
class Generator:
    """A registered topology generator.

    Attributes:
        kind: Registry name.
        func: Callable taking the parameters as keywords and returning an ``nx.Graph``.
        params: Parameters, in signature order.
        summary: One-line description.
        implicit: Callable taking the same keywords and returning the neighbour lists of a
            connected graph without materialising it (dense graphs), or None.
    """

    kind: str
    func: Callable[..., nx.Graph]
    params: tuple[Param, ...]
    summary: str = ""
    implicit: Callable[..., Sequence[Sequence[int]]] | None = None
    """Optional: the same graph's sorted neighbour lists without building it (connected)."""

    def param(self, name: str) -> Param | None:
        """The parameter called ``name``, or None."""
        return next((p for p in self.params if p.name == name), None)


@dataclass(frozen=True, slots=True)
class ParamRow:
    """One row of :func:`describe`: a parameter of a generator, formatted for a table."""

    kind: str
    param: str
    type: str
    default: str
    allowed: str


_REGISTRY: dict[str, Generator] = {}


def register(generator: Generator, *, replace: bool = False) -> None:
    """Add ``generator`` to the registry under ``generator.kind``.

    Args:
        generator: The generator and its parameter metadata.
        replace: Allow replacing a generator of the same kind.

    Raises:
        TopologyError: If the kind is already registered and ``replace`` is false.
    """
    if generator.kind in _REGISTRY and not replace:
        raise TopologyError(f"topology kind {generator.kind!r} is already registered")
    _REGISTRY[generator.kind] = generator


def kinds() -> tuple[str, ...]:
    """Registered kinds, sorted."""
    return tuple(sorted(_REGISTRY))


def get(kind: str) -> Generator:
    """The generator registered as ``kind``.

    Raises:
        TopologyError: If ``kind`` is not registered; the message lists the known kinds.
    """
    try:
        return _REGISTRY[kind]
    except (KeyError, TypeError):
        raise TopologyError(
            f"unknown topology kind {kind!r}; known kinds: {', '.join(kinds())}"
        ) from None


def describe(kind: str | None = None) -> list[ParamRow]:
    """Rows ``(kind, param, type, default, allowed)`` for a CLI table.

    Args:
        kind: Describe only this generator; None describes all, sorted by kind.

    Returns:
        One row per parameter, in signature order within each kind.

    Raises:
        TopologyError: If ``kind`` is not registered.
    """
    generators = [get(kind)] if kind is not None else [_REGISTRY[k] for k in kinds()]
    return [
        ParamRow(
            kind=g.kind,
            param=p.name,
            type=p.type_name,
            default="(required)" if p.required else repr(p.default),
            allowed=p.allowed,
        )
        for g in generators
        for p in g.params
    ]


def _parse_value(text: str) -> object:
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for convert in (int, float):
        try:
            return convert(text.strip())
        except ValueError:
            pass
    return text.strip()


def parse_spec(spec: str) -> dict[str, object]:
    """Parse ``"kind:key=value,key=value"`` into ``{"kind": kind, key: value, ...}``.

    Values become bool (``true``/``false``), None (``none``/``null``), int or float when
    they parse as one, and stay strings otherwise.

    Args:
        spec: The spec string; ``"kind"`` alone is allowed.

    Returns:
        The spec as a mapping.

    Raises:
        TopologyError: If the kind is empty, an item lacks ``=``, or a key repeats.
    """
    kind, _, rest = spec.partition(":")
    kind = kind.strip()
    if not kind:
        raise TopologyError(f"topology spec {spec!r} must start with a kind, e.g. 'ring:n=8'")
    table: dict[str, object] = {"kind": kind}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, equals, value = item.partition("=")
        key = key.strip()
        if not equals or not key:
            raise TopologyError(f"topology spec {spec!r}: item {item!r} must be key=value")
        if key in table:
            raise TopologyError(f"topology spec {spec!r}: key {key!r} is given twice")
        table[key] = _parse_value(value)
    return table


def _coerce(kind: str, param: Param, value: object) -> object:
    if value is None and param.nullable:
        return None
    expected = param.type
    ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        raise TopologyError(f"{kind}: {param.name} = {value!r} must be of type {param.type_name}")
    return value


def resolve(spec: str | Mapping[str, object]) -> tuple[Generator, dict[str, object]]:
    """The generator ``spec`` names and its checked arguments (what :func:`build` calls).

    Raises:
        TopologyError: As :func:`build`, except for range checks and connectivity.
    """
    if isinstance(spec, str):
        table: Mapping[str, object] = parse_spec(spec)
    elif isinstance(spec, Mapping):
        table = spec
    else:
        raise TopologyError(
            f"topology spec {spec!r} must be a string 'kind:key=value,...' or a table with 'kind'"
        )
    if "kind" not in table:
        raise TopologyError(
            f"topology spec {dict(table)!r} has no 'kind'; known kinds: {', '.join(kinds())}"
        )
    kind = table["kind"]
    if not isinstance(kind, str):
        raise TopologyError(f"topology kind = {kind!r} must be a string")
    generator = get(kind)
    names = [p.name for p in generator.params]
    arguments: dict[str, object] = {}
    for key, value in table.items():
        if key == "kind":
            continue
        param = generator.param(key)
        if param is None:
            raise TopologyError(
                f"{kind}: unknown parameter {key!r}; allowed parameters: {', '.join(names)}"
            )
        arguments[key] = _coerce(kind, param, value)
    missing = [p.name for p in generator.params if p.required and p.name not in arguments]
    if missing:
        raise TopologyError(
            f"{kind}: missing required parameter(s) {', '.join(missing)}; "
            f"parameters: {', '.join(names)}"
        )
    return generator, arguments


def build(spec: str | Mapping[str, object], *, require_connected: bool = False) -> nx.Graph:
    """Build the topology described by ``spec``.

    Args:
        spec: ``"kind:key=value,..."`` or a mapping with a ``"kind"`` key and parameters.
        require_connected: Raise if the built graph is disconnected.

    Returns:
        The graph on nodes ``0..n-1``.

    Raises:
        TopologyError: If the spec is malformed, the kind is unknown (the message lists the
            known kinds), a key is not a parameter (the message lists the allowed ones), a
            required parameter is missing, a value has the wrong type or range, or
            ``require_connected`` is set and the graph is disconnected.
    """
    generator, arguments = resolve(spec)
    kind = generator.kind
    graph = generator.func(**arguments)
    if require_connected and graph.number_of_nodes() and not nx.is_connected(graph):
        components = nx.number_connected_components(graph)
        hint = " or set connected=true" if generator.param("connected") else ""
        raise TopologyError(
            f"{kind}: the graph is disconnected ({components} components) but a connected "
            f"topology is required; choose parameters that connect it{hint}"
        )
    return graph


def implicit_neighbours(spec: str | Mapping[str, object]) -> Sequence[Sequence[int]] | None:
    """The neighbour lists of ``spec``'s graph without building it, when its generator has an
    implicit form (``complete``); None otherwise. An implicit graph is connected.

    Raises:
        TopologyError: As :func:`build`.
    """
    generator, arguments = resolve(spec)
    return None if generator.implicit is None else generator.implicit(**arguments)


_SEED = Param("seed", int, None, "None or an int >= 0; same int, same graph", nullable=True)

for _generator in (
    Generator("ring", classic.ring, (Param("n", int, allowed="n >= 3"),), "cycle, degree 2"),
    Generator("line", classic.line, (Param("n", int, allowed="n >= 1"),), "path 0 - ... - n-1"),
    Generator("star", classic.star, (Param("n", int, allowed="n >= 1"),), "hub 0 linked to all"),
    Generator(
        "complete",
        classic.complete,
        (Param("n", int, allowed="n >= 1"),),
        "all pairs linked",
        implicit=classic.complete_adjacency,
    ),
    Generator(
        "grid",
        lattice.grid,
        (Param("rows", int, allowed="rows >= 1"), Param("cols", int, allowed="cols >= 1")),
        "rows x cols grid, 4-neighbours, n = rows * cols",
    ),
    Generator(
        "torus",
        lattice.torus,
        (Param("rows", int, allowed="rows >= 3"), Param("cols", int, allowed="cols >= 3")),
        "periodic grid, degree 4, n = rows * cols",
    ),
    Generator(
        "erdos_renyi",
        random_graphs.erdos_renyi,
        (
            Param("n", int, allowed="n >= 1"),
            Param("p", float, allowed="0 <= p <= 1; edge probability"),
            _SEED,
            Param("connected", bool, False, "resample until connected"),
        ),
        "G(n, p) random graph",
    ),
    Generator(
        "random_regular",
        random_graphs.random_regular,
        (
            Param("n", int, allowed="n >= 1"),
            Param("d", int, allowed="0 <= d < n, n * d even; degree"),
            _SEED,
        ),
        "uniform random d-regular graph",
    ),
    Generator(
        "watts_strogatz",
        random_graphs.watts_strogatz,
        (
            Param("n", int, allowed="n >= 3"),
            Param("k", int, allowed="2 <= k < n, k even; lattice neighbours"),
            Param("p", float, allowed="0 <= p <= 1; rewiring probability"),
            _SEED,
        ),
        "small world: rewired ring lattice",
    ),
    Generator(
        "barabasi_albert",
        random_graphs.barabasi_albert,
        (
            Param("n", int, allowed="n >= 2"),
            Param("m", int, allowed="1 <= m < n; edges per new node"),
            _SEED,
        ),
        "preferential attachment, scale-free",
    ),
    Generator(
        "random_geometric",
        random_graphs.random_geometric,
        (
            Param("n", int, allowed="n >= 1"),
            Param("radius", float, allowed="radius >= 0; link distance in the unit square"),
            _SEED,
            Param("connected", bool, False, "resample until connected"),
        ),
        "points in the unit square linked within radius",
    ),
    Generator(
        "exponential",
        structured.exponential,
        (Param("n", int, allowed="n >= 1"),),
        "i linked to i +- 2^k mod n",
    ),
    Generator(
        "two_cliques",
        structured.two_cliques,
        (Param("n", int, allowed="n >= 6"),),
        "two cliques joined by one bridge edge",
    ),
    Generator(
        "file",
        io.load,
        (Param("path", str, allowed="GraphML (.graphml, .xml) or edge list (.edgelist, ...)"),),
        "topology read from a file, relabelled 0..n-1",
    ),
):
    register(_generator)
del _generator
