"""Scenario files: one TOML document that fully describes a simulation run.

Validation is strict: unknown keys and bad values are errors whose one-line message names the
dotted key, the value and what is allowed. ``resolve`` returns the scenario with every default
filled in; the run directory stores that resolved form, so a run can be repeated from it alone.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from p2pfl.errors import ConfigError
from topologies import registry as topology_registry

SCENARIO_PACKAGE = "sim.scenarios"
DEFAULT_SCENARIO = "default"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


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


class LearnerSpec(_Strict):
    hidden: list[int] = Field(default_factory=lambda: [32])
    lr: float = Field(default=0.1, gt=0.0)
    batch_size: int = Field(default=32, ge=1)
    local_steps: int = Field(default=10, ge=1)
    step_time: float = Field(default=0.01, gt=0.0, description="virtual seconds per local step")

    @field_validator("hidden")
    @classmethod
    def _positive_hidden(cls, hidden: list[int]) -> list[int]:
        if any(width < 1 for width in hidden):
            raise ValueError("hidden layer widths must be >= 1")
        return hidden


class ProtocolSpec(_Strict):
    mode: Literal["dsgd", "gossip"] = "dsgd"
    round_timeout: float = Field(default=5.0, gt=0.0)
    period: float = Field(default=1.0, gt=0.0)
    period_jitter: float = Field(default=0.2, ge=0.0, lt=1.0)
    fanout: int = Field(default=1, ge=1)
    wire_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    max_rounds_ahead: int = Field(default=4, ge=0)


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


class NetworkSpec(_Strict):
    latency: LatencySpec = Field(default_factory=LatencySpec)


class Scenario(_Strict):
    """A whole simulation run."""

    name: str = "unnamed"
    seed: int = Field(default=1, ge=0)
    rounds: int = Field(default=30, ge=1)
    horizon: float | None = Field(default=None, gt=0.0, description="virtual seconds")
    output_dir: str = "runs"
    signatures: bool = True
    topology: TopologySpec = Field(default_factory=TopologySpec)
    data: DataSpec = Field(default_factory=DataSpec)
    learner: LearnerSpec = Field(default_factory=LearnerSpec)
    protocol: ProtocolSpec = Field(default_factory=ProtocolSpec)
    merge: MergeSpec = Field(default_factory=MergeSpec)
    network: NetworkSpec = Field(default_factory=NetworkSpec)

    def topology_params(self) -> dict[str, Any]:
        """The generator's own parameters (everything in [topology] but kind/require_connected)."""
        params = dict(self.topology.model_extra or {})
        kind = self.topology.kind
        if kind in topology_registry.kinds() and topology_registry.get(kind).param("seed"):
            params.setdefault("seed", self.seed)
        return params


def _allowed_keys(loc: Sequence[str | int]) -> list[str]:
    model: type[BaseModel] = Scenario
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return sorted(model.model_fields)


def _first_error(exc: ValidationError, source: str) -> ConfigError:
    error = exc.errors()[0]
    loc = [part for part in error["loc"] if not isinstance(part, int) or True]
    key = ".".join(str(part) for part in loc) or "(scenario)"
    value = error.get("input")
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc)
        return ConfigError(
            f"{source}: {key}", value, f"unknown key; allowed keys here: {', '.join(allowed)}"
        )
    message = error["msg"].removeprefix("Value error, ")
    if isinstance(value, dict):
        value = "{...}"
    return ConfigError(f"{source}: {key}", value, message)


def parse_scenario(document: Mapping[str, Any], *, source: str = "scenario") -> Scenario:
    """Validate a decoded TOML document.

    Raises:
        ConfigError: the first problem found, on one line, naming the dotted key.
    """
    try:
        return Scenario.model_validate(dict(document))
    except ValidationError as exc:
        raise _first_error(exc, source) from None


def shipped_scenarios() -> list[str]:
    """Names of the scenarios shipped inside the package, the default first."""
    names = sorted(
        entry.name.removesuffix(".toml")
        for entry in resources.files(SCENARIO_PACKAGE).iterdir()
        if entry.name.endswith(".toml")
    )
    names.remove(DEFAULT_SCENARIO)
    return [DEFAULT_SCENARIO, *names]


def read_document(name_or_path: str) -> tuple[dict[str, Any], str]:
    """Load a scenario document from a path, or a shipped scenario by name.

    Raises:
        ConfigError: neither a readable TOML file nor a shipped name.
    """
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(
                "scenario", name_or_path, f"a readable TOML file ({exc.strerror})"
            ) from None
        source = str(path)
    else:
        shipped = resources.files(SCENARIO_PACKAGE).joinpath(f"{name_or_path}.toml")
        if not shipped.is_file():
            raise ConfigError(
                "scenario",
                name_or_path,
                f"a .toml path or one of: {', '.join(shipped_scenarios())}",
            )
        text = shipped.read_text()
        source = f"{name_or_path}.toml"
    try:
        return tomllib.loads(text), source
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "(file)", f"valid TOML ({exc})") from None


def apply_overrides(document: dict[str, Any], assignments: Sequence[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides; values are TOML literals, bare words are strings.

    Raises:
        ConfigError: an assignment without ``=`` or one that descends into a non-table.
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
        parts = key.strip().split(".")
        table = result
        for part in parts[:-1]:
            child = table.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError("--set", assignment, f"{part} is not a table")
            table = child
        table[parts[-1]] = value
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
    return _dump_table(data, prefix="")


def _dump_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, list):
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
