"""Scenario files: one TOML document that fully describes a simulation run.

Validation is strict: unknown keys and bad values are errors whose one-line message names the
dotted key, the value and what is allowed. ``resolve`` returns the scenario with every default
filled in; the run directory stores that resolved form, so a run can be repeated from it alone.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from p2pfl.codec import CODECS
from p2pfl.errors import ConfigError
from p2pfl.learn.settings import LearnerSettings
from p2pfl.protocol.config import MAX_ROUNDS, ProtocolSettings
from p2pfl.schema import Elided, config_error
from p2pfl.schema import Strict as _Strict
from topologies import registry as topology_registry

SCENARIO_PACKAGE = "sim.scenarios"
DEFAULT_SCENARIO = "default"


def _tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


Pair = Annotated[tuple[int, int], BeforeValidator(_tuple)]
"""Two integers, written as a TOML array ``[u, v]`` (strict mode takes no list as a tuple)."""


class TopologySpec(_Strict):
    """Which graph: a generator of ``topologies`` and its parameters, or a graph file."""

    model_config = ConfigDict(extra="allow", frozen=True)
    kind: str = "barabasi_albert"
    require_connected: bool = True


class DataSpec(_Strict):
    dataset: str = "digits"
    params: dict[str, Any] = Field(default_factory=dict)
    partition: str = "dirichlet"
    partition_params: dict[str, Any] = Field(default_factory=lambda: {"alpha": 0.5})
    test_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)

    @field_validator("params")
    @classmethod
    def _absolute_paths(cls, params: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """Resolve file parameters (``path``, ``root``) against the scenario file's folder,
        or the current directory for a shipped scenario, so every worker reads the same file."""
        from p2pfl.learn.datasets import PATH_PARAMS

        base = (info.context or {}).get("base_dir")
        resolved = dict(params)
        for key in PATH_PARAMS & set(params):
            if not isinstance(params[key], str):
                raise ValueError(f"{key} must be a path (a string)")
            path = Path(params[key]).expanduser()
            if not path.is_absolute() and base is not None:
                path = Path(base) / path
            resolved[key] = str(path.resolve())
        return resolved


class LearnerSpec(LearnerSettings):
    """``[learner]``: the keys a node's config shares (:class:`p2pfl.learn.LearnerSettings`)
    plus the simulator's own (a node takes ``local_steps`` from ``[protocol]``)."""

    local_steps: int = Field(default=10, ge=1)
    step_time: float = Field(default=0.01, gt=0.0, description="virtual seconds per local step")
    init: Literal["shared", "independent"] = Field(
        default="shared",
        description="shared: every node starts from one model; independent: per-node seeds",
    )


class ProtocolSpec(ProtocolSettings):
    """``[protocol]``: the keys a node's config shares (:class:`p2pfl.protocol.ProtocolSettings`,
    declared there once); ``rounds`` and ``local_steps`` are spelled elsewhere in a scenario
    (top level, ``[learner]``). Simulator-only keys would be added here."""


class MetricsSpec(_Strict):
    """``[metrics]``: how much evaluating the models costs (the defaults evaluate all of it)."""

    eval_every: int = Field(
        default=1,
        ge=1,
        description="evaluate on the test set every k-th round (and always the last); other "
        "rounds' test_loss and test_accuracy are empty (NaN)",
    )
    eval_samples: int | None = Field(
        default=None,
        ge=1,
        description="evaluate on the first n test examples (unset: all of them)",
    )


class MergeSpec(_Strict):
    rule: str = "weighted"
    params: dict[str, Any] = Field(default_factory=dict)


class LatencySpec(_Strict):
    dist: Literal["constant", "uniform", "exponential", "lognormal"] = "constant"
    value: float = Field(default=0.05, ge=0.0, description="constant latency, seconds")
    low: float = Field(default=0.01, ge=0.0)
    high: float = Field(default=0.1, ge=0.0)
    mean: float = Field(default=0.05, gt=0.0)
    sigma: float = Field(default=0.5, gt=0.0)

    @model_validator(mode="after")
    def _ordered(self) -> LatencySpec:
        if self.dist == "uniform" and self.high < self.low:
            raise ValueError("high must be >= low")
        return self


class LinkOverride(_Strict):
    """Settings for the links between given pairs of nodes (both directions); unset = global."""

    between: list[Pair] = Field(min_length=1, description="node pairs [[u, v], ...]")
    latency: LatencySpec | None = None
    bandwidth: float | None = Field(default=None, gt=0.0)
    jitter: float | None = Field(default=None, ge=0.0)
    loss: float | None = Field(default=None, ge=0.0, lt=1.0)

    @field_validator("between")
    @classmethod
    def _distinct(cls, pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
        if any(u == v or u < 0 or v < 0 for u, v in pairs):
            raise ValueError("each pair names two different node indices >= 0")
        return pairs


class NetworkSpec(_Strict):
    """Every directed link: latency draws, FIFO serialisation at ``bandwidth``, jitter, loss."""

    latency: LatencySpec = Field(default_factory=LatencySpec)
    bandwidth: float | None = Field(
        default=None, gt=0.0, description="bytes per second per directed link; unset = unlimited"
    )
    jitter: float = Field(default=0.0, ge=0.0, description="extra delay drawn from U(0, jitter) s")
    loss: float = Field(default=0.0, ge=0.0, lt=1.0, description="probability a frame is lost")
    links: list[LinkOverride] = Field(
        default_factory=list, description="per-link overrides; a later entry wins"
    )


class SpeedSpec(_Strict):
    """Per-node compute speed factor: training takes ``steps * step_time / speed``."""

    dist: Literal["constant", "uniform", "lognormal"] = "constant"
    value: float = Field(default=1.0, gt=0.0)
    low: float = Field(default=0.5, gt=0.0)
    high: float = Field(default=1.5, gt=0.0)
    sigma: float = Field(default=0.5, gt=0.0, description="lognormal with median 1")
    values: list[Annotated[float, Field(gt=0.0)]] = Field(
        default_factory=list, description="one factor per node"
    )

    @model_validator(mode="after")
    def _ordered(self) -> SpeedSpec:
        if self.dist == "uniform" and self.high < self.low:
            raise ValueError("high must be >= low")
        return self


class DevicesSpec(_Strict):
    speed: SpeedSpec = Field(default_factory=SpeedSpec)


class RolesSpec(_Strict):
    """Which nodes are relays (no data: they merge and forward, never train)."""

    relays: list[int] = Field(default_factory=list, description="explicit relay node indices")
    relay_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    relay_choice: Literal["random", "degree"] = "random"

    @field_validator("relays")
    @classmethod
    def _indices(cls, relays: list[int]) -> list[int]:
        if any(node < 0 for node in relays):
            raise ValueError("node indices are >= 0")
        return sorted(set(relays))


def _node_list(nodes: list[int] | None) -> list[int] | None:
    if nodes is not None and any(node < 0 for node in nodes):
        raise ValueError("node indices are >= 0")
    return None if nodes is None else sorted(set(nodes))


Fraction = Annotated[float, Field(gt=0.0, le=1.0)]
NodeList = Annotated[list[int] | None, AfterValidator(_node_list)]
Link = Annotated[list[int], Field(min_length=2, max_length=2)]


class _When(_Strict):
    """When a disruption fires: at a virtual time, or when nodes reach a round.

    ``round = R`` fires as soon as the first alive node (``trigger = "first"``) or every
    alive node (``trigger = "all"``) has completed R rounds, i.e. has its metrics row for
    round ``R - 1``; ``round = 0`` is the start of the run.
    """

    at: float | None = Field(default=None, ge=0.0, description="virtual seconds")
    round: int | None = Field(default=None, ge=0)
    trigger: Literal["first", "all"] = "first"

    @model_validator(mode="after")
    def _one_time(self) -> _When:
        if (self.at is None) == (self.round is None):
            raise ValueError("give exactly one of `at` (virtual seconds) or `round`")
        return self


class _Selection(_When):
    """Which nodes: an explicit list, or a fraction/count chosen at random or by centrality."""

    nodes: NodeList = None
    fraction: Fraction | None = None
    count: int | None = Field(default=None, ge=1)
    choose: Literal["random", "degree", "betweenness", "eigenvector"] = "random"
    among: Literal["all", "data", "relays"] = "all"

    @model_validator(mode="after")
    def _one_selection(self) -> _Selection:
        given = sum(item is not None for item in (self.nodes, self.fraction, self.count))
        if given != 1:
            raise ValueError("give exactly one of `nodes`, `fraction` or `count`")
        return self


class CrashSpec(_Selection):
    """Nodes stop forever; neighbours see the connection reset after ``detect_after`` s."""

    kind: Literal["crash", "remove"]
    detect_after: float = Field(
        default=0.0,
        ge=0.0,
        allow_inf_nan=True,
        description="seconds until neighbours notice; inf = never",
    )


class LeaveSpec(_Selection):
    """Nodes go offline (state kept, suspended); ``graceful`` tells the neighbours.

    ``for_good``: the nodes leave for good instead, as a node its operator stops (SIGTERM):
    each core is told ``LeaveRequested`` and says goodbye (``modest``: a LEAVE announcement
    and a ``NACK`` for each model it holds), then the node goes once its goodbye is delivered
    and never comes back (a later ``join`` skips it).
    """

    kind: Literal["leave"]
    graceful: bool = True
    for_good: bool = False


class JoinSpec(_When):
    """Offline nodes come back (default: every node that is offline)."""

    kind: Literal["join"]
    nodes: NodeList = None


class CutSpec(_When):
    kind: Literal["cut"]
    links: list[Link] = Field(min_length=1)


class RestoreSpec(_When):
    """Restore the given cut links (default: every link cut by a ``cut``)."""

    kind: Literal["restore"]
    links: list[Link] | None = None


class PartitionSpec(_When):
    """Cut every link between groups: given groups (others form one more) or ``random`` k."""

    kind: Literal["partition"]
    groups: list[list[int]] | None = None
    random: int | None = Field(default=None, ge=2)

    @model_validator(mode="after")
    def _one_split(self) -> PartitionSpec:
        if (self.groups is None) == (self.random is None):
            raise ValueError("give exactly one of `groups` or `random` (a number of groups)")
        return self


class HealSpec(_When):
    """Undo every partition."""

    kind: Literal["heal"]


class BatterySpec(_Selection):
    """Each selected node dies when it would start training number ``trainings + 1``."""

    kind: Literal["battery"]
    trainings: int = Field(ge=1)


class ChurnSpec(_When):
    """Nodes go offline and come back: from a trace (CSV: node, online_from, online_until;
    times relative to this disruption) or generated (exponential on/off periods)."""

    kind: Literal["churn"]
    trace: str | None = None
    nodes: NodeList = None
    fraction: Fraction | None = None
    mean_online: float | None = Field(default=None, gt=0.0, description="seconds")
    mean_offline: float | None = Field(default=None, gt=0.0, description="seconds")
    graceful: bool = True

    @field_validator("trace")
    @classmethod
    def _readable_trace(cls, trace: str | None, info: ValidationInfo) -> str | None:
        if trace is None:
            return None
        path = Path(trace)
        base = (info.context or {}).get("base_dir")
        if not path.is_absolute() and base is not None:
            path = Path(base) / path
        from sim.churn import read_trace

        try:
            read_trace(path)
        except ConfigError as exc:
            raise ValueError(f"{exc.value}: {exc.allowed}") from None
        return str(path.resolve())

    @model_validator(mode="after")
    def _trace_or_generated(self) -> ChurnSpec:
        generated = self.mean_online is not None or self.mean_offline is not None
        if self.trace is not None and generated:
            raise ValueError("give a `trace` or `mean_online`/`mean_offline`, not both")
        if self.trace is None:
            if self.mean_online is None or self.mean_offline is None:
                raise ValueError("give a `trace`, or both `mean_online` and `mean_offline`")
            if (self.nodes is None) == (self.fraction is None):
                raise ValueError("generated churn needs exactly one of `nodes` or `fraction`")
        return self


DisruptionSpec = Annotated[
    CrashSpec
    | LeaveSpec
    | JoinSpec
    | CutSpec
    | RestoreSpec
    | PartitionSpec
    | HealSpec
    | BatterySpec
    | ChurnSpec,
    Field(discriminator="kind"),
]
DISRUPTION_KINDS = (
    "crash",
    "remove",
    "leave",
    "join",
    "cut",
    "restore",
    "partition",
    "heal",
    "battery",
    "churn",
)


Share = Annotated[float, Field(ge=0.0, le=1.0)]


class _Adversary(_Strict):
    """Who attacks: existing nodes (``nodes``, or ``fraction``/``count`` of all n nodes chosen
    at random or by centrality among ``among``), or ``sybils`` new identities of one attacker,
    each wired to ``sybil_edges`` existing nodes (chosen at random or by highest degree among
    ``sybil_targets``, default all). See :mod:`sim.adversaries`."""

    nodes: NodeList = None
    fraction: Share | None = None
    count: int | None = Field(default=None, ge=0)
    choose: Literal["random", "degree", "betweenness", "eigenvector"] = "random"
    among: Literal["all", "data", "relays"] = "all"
    sybils: int | None = Field(default=None, ge=1)
    sybil_edges: int = Field(default=2, ge=1)
    sybil_choose: Literal["random", "degree"] = "random"
    sybil_targets: NodeList = None

    @model_validator(mode="after")
    def _one_placement(self) -> _Adversary:
        given = sum(item is not None for item in (self.nodes, self.fraction, self.count))
        if given + (self.sybils is not None) != 1:
            raise ValueError("give exactly one of `nodes`, `fraction`, `count` or `sybils`")
        return self


class NoAttack(_Adversary):
    """No adversary (a sweep's attack-free baseline): the placement is ignored."""

    attack: Literal["none"]


class SignFlipAttack(_Adversary):
    """Send ``-scale * x`` instead of the own model x."""

    attack: Literal["sign_flip"]
    scale: float = Field(default=1.0, gt=0.0)


class GaussianAttack(_Adversary):
    """Send N(0, sigma^2 I) (``mode = "replace"``) or x + N(0, sigma^2 I) (``"add"``)."""

    attack: Literal["gaussian"]
    sigma: float = Field(default=200.0, gt=0.0)
    mode: Literal["replace", "add"] = "replace"


class AlieAttack(_Adversary):
    """A little is enough: mu - z * sigma over the target's honest neighbourhood; ``z`` unset =
    z_max of the target's neighbourhood size and Byzantine count."""

    attack: Literal["alie"]
    z: float | None = None


class IpmAttack(_Adversary):
    """Inner-product manipulation: -epsilon * mean of the target's honest neighbourhood."""

    attack: Literal["ipm"]
    epsilon: float = Field(default=0.1, gt=0.0)


class DissensusAttack(_Adversary):
    """x_t - epsilon * sum_j W_tj (x_j - x_t) / sum_b W_tb (Metropolis-Hastings W), per target."""

    attack: Literal["dissensus"]
    epsilon: float = Field(default=1.5, gt=0.0)


class FreeRiderAttack(_Adversary):
    """Never contributes: resends the initial model, or a neighbour's model one send stale."""

    attack: Literal["free_rider"]
    replay: Literal["initial", "received"] = "initial"


class LabelFlipAttack(_Adversary):
    """Train on flipped labels: ``source`` -> ``target`` (``mode = "targeted"``, with every
    training example of ``source`` added, flipped, if ``augment``) or y -> C-1-y (``"all"``)."""

    attack: Literal["label_flip"]
    mode: Literal["targeted", "all"] = "targeted"
    source: int = Field(default=0, ge=0)
    target: int = Field(default=1, ge=0)
    augment: bool = True

    @model_validator(mode="after")
    def _distinct(self) -> LabelFlipAttack:
        if self.mode == "targeted" and self.source == self.target:
            raise ValueError("`source` and `target` must differ")
        return self


class BackdoorAttack(_Adversary):
    """Train also on copies of the own data with a trigger patch (rows x cols of the image set
    to ``value``) labelled ``target``."""

    attack: Literal["backdoor"]
    target: int = Field(default=1, ge=0)
    image_shape: list[int] | None = Field(
        default=None, description="[height, width]; default: square from the feature count"
    )
    rows: Link = Field(default_factory=lambda: [0, 2], description="[first, end) rows")
    cols: Link = Field(default_factory=lambda: [0, 3], description="[first, end) columns")
    value: float = 1.0

    @field_validator("image_shape")
    @classmethod
    def _shape(cls, shape: list[int] | None) -> list[int] | None:
        if shape is not None and (len(shape) != 2 or min(shape) < 1):
            raise ValueError("[height, width], both >= 1")
        return shape

    @model_validator(mode="after")
    def _patch(self) -> BackdoorAttack:
        for name, (first, end) in (("rows", self.rows), ("cols", self.cols)):
            if not 0 <= first < end:
                raise ValueError(f"`{name}` is [first, end) with 0 <= first < end")
        return self


AdversarySpec = Annotated[
    NoAttack
    | SignFlipAttack
    | GaussianAttack
    | AlieAttack
    | IpmAttack
    | DissensusAttack
    | FreeRiderAttack
    | LabelFlipAttack
    | BackdoorAttack,
    Field(discriminator="attack"),
]
_ADVERSARY_MODELS: dict[str, type[BaseModel]] = {
    "none": NoAttack,
    "sign_flip": SignFlipAttack,
    "gaussian": GaussianAttack,
    "alie": AlieAttack,
    "ipm": IpmAttack,
    "dissensus": DissensusAttack,
    "free_rider": FreeRiderAttack,
    "label_flip": LabelFlipAttack,
    "backdoor": BackdoorAttack,
}
ATTACKS = tuple(_ADVERSARY_MODELS)


def _file_name(value: str) -> str:
    if not value or any(char in value for char in "/\\") or not value.isprintable():
        raise ValueError("a non-empty name of printable characters without / or \\")
    return value


MAX_DESCRIPTION_CHARS = 200
"""Longest ``description``: one line of a terminal listing."""


def _one_line(value: str) -> str:
    if not value.isprintable() or len(value) > MAX_DESCRIPTION_CHARS:
        raise ValueError(f"one line of at most {MAX_DESCRIPTION_CHARS} printable characters")
    return value


def _path_text(value: str) -> str:
    if not value or not value.isprintable():
        raise ValueError("a non-empty path of printable characters")
    return value


class Scenario(_Strict):
    """A whole simulation run."""

    name: Annotated[str, AfterValidator(_file_name)] = Field(
        default="unnamed", description="also names the run directory"
    )
    description: Annotated[str, AfterValidator(_one_line)] = Field(
        default="", description="what the scenario is for, shown by `p2pfl-sim scenarios`"
    )
    seed: int = Field(default=1, ge=0)
    rounds: int = Field(default=30, ge=1, le=MAX_ROUNDS)
    horizon: float | None = Field(default=None, gt=0.0, description="virtual seconds")
    output_dir: Annotated[str, AfterValidator(_path_text)] = "runs"
    signatures: bool = True
    topology: TopologySpec = Field(default_factory=TopologySpec)
    data: DataSpec = Field(default_factory=DataSpec)
    learner: LearnerSpec = Field(default_factory=LearnerSpec)
    protocol: ProtocolSpec = Field(default_factory=ProtocolSpec)
    merge: MergeSpec = Field(default_factory=MergeSpec)
    metrics: MetricsSpec = Field(default_factory=MetricsSpec)
    network: NetworkSpec = Field(default_factory=NetworkSpec)
    devices: DevicesSpec = Field(default_factory=DevicesSpec)
    roles: RolesSpec = Field(default_factory=RolesSpec)
    disruptions: list[DisruptionSpec] = Field(default_factory=list)
    adversaries: list[AdversarySpec] = Field(default_factory=list)

    @field_validator("adversaries")
    @classmethod
    def _codec_without_chains_for_adversaries(
        cls, adversaries: list[AdversarySpec], info: ValidationInfo
    ) -> list[AdversarySpec]:
        # sim.adversaries re-seals a Byzantine node's models whole; it cannot follow the
        # delta chain a sparse codec builds (p2pfl.protocol.compression).
        protocol = info.data.get("protocol")  # absent when [protocol] itself is invalid
        if adversaries and protocol is not None and CODECS[protocol.codec].delta:
            allowed = ", ".join(name for name, c in sorted(CODECS.items()) if not c.delta)
            raise ValueError(
                f"no adversaries with protocol.codec = {protocol.codec!r}, or protocol.codec "
                f"one of {allowed}"
            )
        return adversaries

    def topology_params(self) -> dict[str, Any]:
        """The generator's own parameters (everything in [topology] but kind/require_connected)."""
        params = dict(self.topology.model_extra or {})
        kind = self.topology.kind
        if kind in topology_registry.kinds() and topology_registry.get(kind).param("seed"):
            params.setdefault("seed", self.seed)
        return params


_DISRUPTION_MODELS: dict[str, type[BaseModel]] = {
    "crash": CrashSpec,
    "remove": CrashSpec,
    "leave": LeaveSpec,
    "join": JoinSpec,
    "cut": CutSpec,
    "restore": RestoreSpec,
    "partition": PartitionSpec,
    "heal": HealSpec,
    "battery": BatterySpec,
    "churn": ChurnSpec,
}


def parse_scenario(
    document: Mapping[str, Any], *, source: str = "scenario", base_dir: Path | None = None
) -> Scenario:
    """Validate a decoded TOML document.

    Relative paths inside it (churn traces) are resolved against ``base_dir``, or against the
    directory of ``source`` when ``source`` names an existing file, and stored absolute.

    Raises:
        ConfigError: the first problem found, on one line, naming the dotted key
            (list items as ``disruptions[2].fraction``).
    """
    if nesting(document) > MAX_NESTING:
        raise ConfigError(
            source, "(document)", f"tables and arrays nested at most {MAX_NESTING} deep"
        )
    if base_dir is None and Path(source).is_file():
        base_dir = Path(source).resolve().parent
    try:
        scenario = Scenario.model_validate(dict(document), context={"base_dir": base_dir})
    except ValidationError as exc:
        raise config_error(exc, Scenario, source=source) from None
    return scenario


def timeline_warnings(scenario: Scenario) -> dict[int, str]:
    """One line for each timeline entry that can never fire: scheduled after the last round
    or after the horizon.

    These are warnings, not errors: an entry that never fires is how a sweep gets its
    undisrupted baseline with the grid unchanged (``--set 'disruptions[0].round=31'`` with
    30 rounds, docs/experiments.md). An entry at a virtual time without a ``horizon`` cannot
    be judged before the run (its end time is not known); a run lists the entries that did
    not fire in ``unfired_disruptions`` of its summary, and the CLI warns about them.
    """
    lines: dict[int, str] = {}
    for index, spec in enumerate(scenario.disruptions):
        key = f"disruptions[{index}]"
        if spec.round is not None and spec.round > scenario.rounds:
            lines[index] = (
                f"{key}.round = {spec.round} is after the last round (rounds = "
                f"{scenario.rounds}): this {spec.kind} never fires"
            )
        if spec.at is not None and scenario.horizon is not None and spec.at > scenario.horizon:
            lines[index] = (
                f"{key}.at = {spec.at:g} s is after the horizon ({scenario.horizon:g} s): "
                f"this {spec.kind} never fires"
            )
    return lines


def shipped_scenarios() -> list[str]:
    """Names of the scenarios shipped inside the package, the default first."""
    names = sorted(
        entry.name.removesuffix(".toml")
        for entry in resources.files(SCENARIO_PACKAGE).iterdir()
        if entry.name.endswith(".toml")
    )
    names.remove(DEFAULT_SCENARIO)
    return [DEFAULT_SCENARIO, *names]


MAX_SCENARIO_BYTES = 16 * 1024 * 1024
"""Largest scenario file read (a per-node list for 100,000 nodes is about 1 MiB)."""
MAX_NESTING = 32
"""Deepest nesting of tables and arrays accepted (the schema itself needs 5)."""


def read_document(name_or_path: str) -> tuple[dict[str, Any], str]:
    """Load a scenario document from a path, or a shipped scenario by name.

    Raises:
        ConfigError: neither a readable UTF-8 TOML file (of at most ``MAX_SCENARIO_BYTES``,
            nested at most ``MAX_NESTING`` deep) nor a shipped name.
    """
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        text = _read_scenario_file(path, name_or_path)
        source = str(path)
    else:
        shipped = resources.files(SCENARIO_PACKAGE).joinpath(f"{name_or_path}.toml")
        if not shipped.is_file():
            raise ConfigError(
                "scenario",
                name_or_path,
                f"a .toml path or one of: {', '.join(shipped_scenarios())}",
            )
        text = shipped.read_text(encoding="utf-8")
        source = f"{name_or_path}.toml"
    return parse_toml(text, source), source


def _read_scenario_file(path: Path, name: str) -> str:
    if path.is_dir():
        raise ConfigError("scenario", name, "a TOML file; this is a directory")
    if path.exists() and not path.is_file():
        raise ConfigError("scenario", name, "a regular TOML file (not a device or pipe)")
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_SCENARIO_BYTES + 1)
    except OSError as exc:
        raise ConfigError("scenario", name, f"a readable TOML file ({exc.strerror})") from None
    if len(data) > MAX_SCENARIO_BYTES:
        raise ConfigError("scenario", name, f"a TOML file of at most {MAX_SCENARIO_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            "scenario", name, f"a UTF-8 text file (byte {exc.start} is not UTF-8)"
        ) from None


def parse_toml(text: str, source: str) -> dict[str, Any]:
    """Decode TOML text, refusing nesting deeper than ``MAX_NESTING``.

    Raises:
        ConfigError: not valid TOML, or nested too deep; ``source`` names the text.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "(file)", f"valid TOML ({exc})") from None
    except RecursionError:
        document = None
    if document is None or nesting(document) > MAX_NESTING:
        raise ConfigError(
            source, "(file)", f"TOML with tables and arrays nested at most {MAX_NESTING} deep"
        )
    return document


def nesting(value: Any) -> int:
    """How deep tables and arrays nest in ``value`` (0 for a scalar), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if depth <= MAX_NESTING:  # deeper is refused anyway: stop counting there
            stack.extend((child, depth + 1) for child in children)
    return deepest


_INDEXED = re.compile(r"^([A-Za-z_][\w-]*)\[(\d+)\]$")


def override_path(key: str) -> list[str | int]:
    """``disruptions[1].fraction`` → ``["disruptions", 1, "fraction"]``."""
    path: list[str | int] = []
    for part in key.strip().split("."):
        match = _INDEXED.match(part)
        if match:
            path += [match.group(1), int(match.group(2))]
        else:
            path.append(part)
    return path


def apply_overrides(document: dict[str, Any], assignments: Sequence[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides; values are TOML literals, bare words are strings.

    A path may index an array of tables: ``disruptions[0].fraction=0.2``.

    Raises:
        ConfigError: an assignment without ``=``, one that descends into a non-table, or an
            index past the end of an array.
    """
    result: dict[str, Any] = _deep_copy(document)
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        if not sep or not key.strip():
            raise ConfigError("--set", assignment, "key.path=value, e.g. learner.lr=0.05")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        except RecursionError:
            value = None
        if value is None or nesting(value) >= MAX_NESTING:
            raise ConfigError(
                f"--set {key.strip()}", Elided(), f"a value nested at most {MAX_NESTING} deep"
            )
        path = override_path(key)
        if len(path) > MAX_NESTING:
            raise ConfigError("--set", f"{key[:40]}...", f"a key of at most {MAX_NESTING} parts")
        container: Any = result
        for part, following in zip(path[:-1], path[1:], strict=True):
            if isinstance(part, int):
                if not isinstance(container, list) or part >= len(container):
                    raise ConfigError("--set", assignment, f"index {part} is past the array's end")
                child = container[part]
            else:
                child = container.setdefault(part, [] if isinstance(following, int) else {})
            if not isinstance(child, dict | list):
                raise ConfigError("--set", assignment, f"{part} is not a table")
            container = child
        last = path[-1]
        if isinstance(last, int):
            if not isinstance(container, list) or last >= len(container):
                raise ConfigError("--set", assignment, f"index {last} is past the array's end")
            container[last] = value
        elif isinstance(container, dict):
            container[last] = value
        else:
            raise ConfigError("--set", assignment, "index the array first, e.g. name[0].key")
    return result


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _deep_copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_deep_copy(item) for item in value]
    return value


def to_toml(scenario: Scenario) -> str:
    """The resolved scenario as TOML text (every default written out)."""
    data = scenario.model_dump(mode="python", exclude_none=True)
    topology = data.pop("topology")
    topology.update(scenario.topology.model_extra or {})
    data["topology"] = topology
    disruptions = data.pop("disruptions", [])
    adversaries = data.pop("adversaries", [])
    text = _dump_table(data, prefix="")
    for disruption in disruptions:
        ordered = {"kind": disruption.pop("kind"), **disruption}
        text += "\n[[disruptions]]\n" + _dump_table(ordered, prefix="disruptions.")
    for adversary in adversaries:
        ordered = {"attack": adversary.pop("attack"), **adversary}
        text += "\n[[adversaries]]\n" + _dump_table(ordered, prefix="adversaries.")
    return text


def _dump_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_dump_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_dump_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _dump_table(data: Mapping[str, Any], prefix: str) -> str:
    scalars = [(k, v) for k, v in data.items() if not isinstance(v, dict) or not _is_table(k, v)]
    tables = [(k, v) for k, v in data.items() if isinstance(v, dict) and _is_table(k, v)]
    lines = [f"{key} = {_dump_value(value)}" for key, value in scalars]
    text = "\n".join(lines) + ("\n" if lines else "")
    for key, value in tables:
        name = f"{prefix}{key}"
        text += f"\n[{name}]\n" + _dump_table(value, prefix=f"{name}.")
    return text


def _is_table(key: str, value: Mapping[str, Any]) -> bool:
    return key not in {"params", "partition_params"} or bool(value)
