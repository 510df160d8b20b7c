"""Scenario validation: every bad file is one line naming the key."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from p2pfl.errors import ConfigError, TopologyError
from sim.population import build_population
from sim.scenario import apply_overrides, parse_scenario, read_document, shipped_scenarios, to_toml

SmallDocument = Callable[..., dict[str, Any]]


def one_line(exc: Exception) -> str:
    text = str(exc)
    assert "\n" not in text
    return text


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"learner": {"lrr": 0.1}}, "learner.lrr"),
        ({"colour": "blue"}, "colour"),
        ({"rounds": "many"}, "rounds"),
        ({"rounds": 0}, "rounds"),
        ({"learner": {"lr": -0.5}}, "learner.lr"),
        ({"protocol": {"mode": "gosip"}}, "protocol.mode"),
        ({"learner": {"hidden": [0]}}, "learner.hidden"),
    ],
)
def test_bad_values_name_the_key(
    small_document: SmallDocument, overrides: dict[str, Any], named: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_scenario(small_document(**overrides))
    assert named in one_line(info.value)


def test_unknown_key_lists_the_allowed_keys(small_document: SmallDocument) -> None:
    with pytest.raises(ConfigError) as info:
        parse_scenario(small_document(learner={"lrr": 0.1}))
    assert "local_steps" in one_line(info.value)


@pytest.mark.parametrize(
    ("topology", "named"),
    [
        ({"kind": "ring", "n": 0}, "n"),
        ({"kind": "barabasi_albert", "n": 8, "m": 8}, "m"),
        ({"kind": "erdos_renyi", "n": 30, "p": 0.0}, "connected"),
        ({"kind": "moebius", "n": 8}, "moebius"),
    ],
)
def test_bad_topologies_are_one_line_errors(
    small_document: SmallDocument, topology: dict[str, Any], named: str
) -> None:
    scenario = parse_scenario(small_document(topology=topology))
    with pytest.raises(TopologyError) as info:
        build_population(scenario)
    assert named in one_line(info.value)


def test_overrides_parse_toml_values_and_bare_strings(small_document: SmallDocument) -> None:
    document = apply_overrides(
        small_document(), ["learner.lr=0.05", "protocol.mode=gossip", "rounds=4"]
    )
    scenario = parse_scenario(document)
    assert scenario.learner.lr == 0.05
    assert scenario.protocol.mode == "gossip"
    assert scenario.rounds == 4


def test_bad_override_syntax_names_the_flag() -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides({}, ["learner.lr"])
    assert "--set" in one_line(info.value)


def test_shipped_scenarios_all_validate_and_resolve_round_trip() -> None:
    names = shipped_scenarios()
    assert names[0] == "default"
    import tomllib

    for name in names:
        document, _ = read_document(name)
        scenario = parse_scenario(document)
        assert parse_scenario(tomllib.loads(to_toml(scenario))) == scenario


def test_unknown_scenario_name_lists_the_shipped_ones() -> None:
    with pytest.raises(ConfigError) as info:
        read_document("no-such-scenario")
    assert "default" in one_line(info.value)
