"""The scenario schema coerces nothing (issue 12, defect 4).

Strings are not numbers, integers are not booleans, floats are finite wherever infinity makes
no sense, rounds are bounded as the node bounds them, and timeline entries that can never
fire are reported.
"""

from __future__ import annotations

import json
import math
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

import sim.scenario as schema
from p2pfl.errors import ConfigError
from p2pfl.protocol.config import MAX_ROUNDS
from sim.cli import main
from sim.scenario import parse_scenario, timeline_warnings

SmallDocument = Callable[..., dict[str, Any]]

# -- coercion ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "key", "value"),
    [
        ({"network": {"loss": "0.1"}}, "network.loss", "'0.1'"),
        ({"learner": {"hidden": ["32"]}}, "learner.hidden[0]", "'32'"),
        ({"rounds": "20"}, "rounds", "'20'"),
        ({"seed": "1"}, "seed", "'1'"),
        ({"learner": {"lr": "0.1"}}, "learner.lr", "'0.1'"),
        ({"signatures": "true"}, "signatures", "'true'"),
        ({"signatures": 1}, "signatures", "1"),
        ({"rounds": True}, "rounds", "True"),
        ({"rounds": 2.0}, "rounds", "2.0"),
        ({"protocol": {"fanout": 1.5}}, "protocol.fanout", "1.5"),
        ({"protocol": {"announce_join": "yes"}}, "protocol.announce_join", "'yes'"),
        (
            {"network": {"links": [{"between": [["0", 1]], "loss": 0.1}]}},
            "network.links[0].between[0][0]",
            "'0'",
        ),
        (
            {"disruptions": [{"kind": "crash", "round": "1", "count": 1}]},
            "disruptions[0].round",
            "'1'",
        ),
        (
            {"adversaries": [{"attack": "sign_flip", "count": 1, "scale": "2"}]},
            "adversaries[0].scale",
            "'2'",
        ),
    ],
)
def test_no_value_is_coerced(
    small_document: SmallDocument, overrides: dict[str, Any], key: str, value: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_scenario(small_document(**overrides))
    text = str(info.value)
    assert "\n" not in text and f"{key} = {value}:" in text
    if value.startswith("'"):
        assert "without quotes" in text


def test_integers_stand_for_floats_and_arrays_for_pairs(small_document: SmallDocument) -> None:
    scenario = parse_scenario(
        small_document(
            learner={"hidden": [8], "lr": 1, "local_steps": 1},
            network={"latency": {"value": 0}, "links": [{"between": [[0, 1]], "loss": 0}]},
            devices={"speed": {"dist": "constant", "values": [1, 2, 1, 1, 1, 1, 1, 1]}},
        )
    )
    assert scenario.learner.lr == 1.0 and isinstance(scenario.learner.lr, float)
    assert scenario.network.links[0].between == [(0, 1)]
    assert scenario.devices.speed.values == [1.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    # The resolved form (what a run directory stores) reads back to the same scenario.
    import tomllib

    assert parse_scenario(tomllib.loads(schema.to_toml(scenario))) == scenario


# -- finite floats -------------------------------------------------------------------------

BASES: dict[str, dict[str, Any]] = {
    "Scenario": {},
    "TopologySpec": {},
    "MergeSpec": {},
    "DevicesSpec": {},
    "DataSpec": {},
    "LearnerSpec": {},
    "ProtocolSpec": {},
    "LatencySpec": {},
    "NetworkSpec": {},
    "SpeedSpec": {},
    "RolesSpec": {},
    "MetricsSpec": {},
    "LinkOverride": {"between": [[0, 1]]},
    "CrashSpec": {"kind": "crash", "round": 1, "count": 1},
    "LeaveSpec": {"kind": "leave", "round": 1, "count": 1},
    "JoinSpec": {"kind": "join", "round": 1},
    "CutSpec": {"kind": "cut", "round": 1, "links": [[0, 1]]},
    "RestoreSpec": {"kind": "restore", "round": 1},
    "PartitionSpec": {"kind": "partition", "round": 1, "random": 2},
    "HealSpec": {"kind": "heal", "round": 1},
    "BatterySpec": {"kind": "battery", "round": 1, "count": 1, "trainings": 1},
    "ChurnSpec": {
        "kind": "churn",
        "round": 1,
        "fraction": 0.5,
        "mean_online": 1.0,
        "mean_offline": 1.0,
    },
    **{
        model.__name__: {"attack": attack, "count": 1}
        for attack, model in schema._ADVERSARY_MODELS.items()
    },
}
"""A valid table of every concrete model of the schema."""
MAY_BE_INFINITE = {("CrashSpec", "detect_after")}
"""inf means "never noticed" there."""


def _models() -> list[type[BaseModel]]:
    """Every model a scenario nests, found from ``Scenario``'s annotations (wherever the
    model is defined: a table moved to another package is still found)."""
    reached: list[type[BaseModel]] = []
    stack: list[Any] = [schema.Scenario]
    while stack:
        annotation = stack.pop()
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if annotation not in reached:
                reached.append(annotation)
                stack.extend(field.annotation for field in annotation.model_fields.values())
        else:
            stack.extend(typing.get_args(annotation))
            if isinstance(annotation, types.UnionType):
                stack.extend(annotation.__args__)
    return reached


def _has(annotation: Any, wanted: type) -> bool:
    if annotation is wanted or typing.get_origin(annotation) is wanted:
        return True
    if typing.get_origin(annotation) is typing.Literal:
        return False
    return any(_has(arg, wanted) for arg in typing.get_args(annotation))


def _float_fields() -> list[tuple[str, str]]:
    return [
        (model.__name__, name)
        for model in _models()
        for name, field in model.model_fields.items()
        if _has(field.annotation, float)
    ]


def test_every_table_of_the_schema_is_strict() -> None:
    """Every table a scenario nests keeps the rules (a new or moved table too)."""
    models = _models()
    assert len(models) > 20
    for model in models:
        config = model.model_config
        assert config.get("strict") is True, model
        assert config.get("allow_inf_nan") is False, model
        assert config.get("extra") == ("allow" if model is schema.TopologySpec else "forbid")
    assert {model.__name__ for model in models} <= set(BASES)


@pytest.mark.parametrize(("model_name", "field"), _float_fields())
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_no_float_is_infinite_or_nan_unless_it_means_never(
    model_name: str, field: str, bad: float
) -> None:
    model = next(model for model in _models() if model.__name__ == model_name)
    annotation = model.model_fields[field].annotation
    value: Any = [bad] if _has(annotation, list) else bad
    table = {**BASES[model_name], field: value}
    if (model_name, field) in MAY_BE_INFINITE and bad == math.inf:
        assert math.isinf(getattr(model.model_validate(table), field))
        return
    with pytest.raises(ValidationError) as info:
        model.model_validate(table)
    assert info.value.errors()[0]["type"] in {"finite_number", "greater_than_equal"}


def test_float_fields_are_found() -> None:
    fields = set(_float_fields())
    assert {("NetworkSpec", "loss"), ("LatencySpec", "value"), ("Scenario", "horizon")} <= fields
    assert ("ProtocolSpec", "wire_dtype") not in fields  # a Literal of names, not a float


def test_infinite_latency_is_one_line(small_document: SmallDocument) -> None:
    with pytest.raises(ConfigError) as info:
        parse_scenario(small_document(network={"latency": {"value": math.inf}}))
    assert "network.latency.value = inf: a finite number" in str(info.value)


# -- rounds --------------------------------------------------------------------------------


def test_rounds_share_the_nodes_bound(small_document: SmallDocument) -> None:
    assert parse_scenario(small_document(rounds=MAX_ROUNDS)).rounds == MAX_ROUNDS
    with pytest.raises(ConfigError) as info:
        parse_scenario(small_document(rounds=MAX_ROUNDS + 1))
    assert "rounds" in str(info.value) and str(MAX_ROUNDS) in str(info.value)
    with pytest.raises(ConfigError):
        parse_scenario(small_document(rounds=2**70))


# -- timeline entries outside the run ------------------------------------------------------


def test_entries_after_the_last_round_or_horizon_are_warned(
    small_document: SmallDocument,
) -> None:
    inside = parse_scenario(small_document(disruptions=[{"kind": "crash", "round": 3, "count": 1}]))
    assert timeline_warnings(inside) == {}
    late = parse_scenario(
        small_document(
            horizon=50.0,
            disruptions=[
                {"kind": "crash", "round": 1, "count": 1},
                {"kind": "crash", "round": 4, "count": 1},
                {"kind": "cut", "at": 60.0, "links": [[0, 1]]},
            ],
        )
    )
    warnings = timeline_warnings(late)
    assert sorted(warnings) == [1, 2]
    assert "rounds = 3" in warnings[1] and "never fires" in warnings[1]
    assert "horizon" in warnings[2]


def test_cli_warns_before_and_the_summary_lists_unfired_entries(
    small_document: SmallDocument, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    document = small_document(
        disruptions=[
            {"kind": "crash", "round": 9, "count": 1},
            {"kind": "cut", "at": 1e6, "links": [[0, 1]]},
            {"kind": "crash", "round": 1, "nodes": [3]},
        ]
    )
    path = tmp_path / "late.toml"
    path.write_text(schema.to_toml(parse_scenario(document)))
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2, err
    assert "disruptions[0].round = 9" in err[0] and "never fires" in err[0]
    assert "disruptions[1] (cut) never fired" in err[1]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["unfired_disruptions"] == [0, 1]
