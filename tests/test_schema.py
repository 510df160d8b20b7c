"""One schema for [protocol] and [learner] (issue 13, point 4): a scenario and a node config
take the same keys with the same defaults and refuse the same values in the same words; one
checker says what an integer or a number is."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from p2pfl.checks import check_int, check_number, is_int, is_real
from p2pfl.config import config_from_dict
from p2pfl.errors import ConfigError
from p2pfl.identity import Identity
from p2pfl.learn.settings import LearnerSettings
from p2pfl.protocol import CoreConfig, ProtocolSettings
from sim.run import core_config
from sim.scenario import LearnerSpec, ProtocolSpec, parse_scenario

# -- one schema ------------------------------------------------------------------------------


def node_document(tmp_path: Path, **tables: Any) -> dict[str, Any]:
    Identity.generate().save(tmp_path / "me.key")
    return {
        "node": {"listen": "127.0.0.1:0", "key_file": "me.key"},
        "data": {"dataset": "digits"},
        **tables,
    }


def test_scenario_and_node_tables_are_the_shared_models() -> None:
    assert issubclass(ProtocolSpec, ProtocolSettings) and issubclass(CoreConfig, ProtocolSettings)
    assert issubclass(LearnerSpec, LearnerSettings)
    shared = ProtocolSettings.model_fields
    for name, field in shared.items():
        assert ProtocolSpec.model_fields[name].default == field.default, name
        assert CoreConfig.model_fields[name].default == field.default, name
    # What a node adds is what a scenario spells elsewhere or the simulator fills in.
    assert set(CoreConfig.model_fields) - set(shared) == {
        "rounds",
        "local_steps",
        "replay_window",
        "server",
    }


def test_every_shared_key_written_in_a_scenario_reaches_the_core_and_a_node(
    tmp_path: Path,
) -> None:
    # Every shared key set to a value other than its default, in both places.
    table: dict[str, Any] = {
        "mode": "gossip",
        "round_timeout": 7.0,
        "period": 0.5,
        "period_jitter": 0.1,
        "fanout": 2,
        "wire_dtype": "float16",
        "max_rounds_ahead": 2,
        "sample_size": 4,
        "sample_fraction": 0.5,
        "aggregators": 2,
        "success_fraction": 0.5,
        "min_models": 2,
        "ping_timeout": 1.0,
        "aggregation_timeout": 9.0,
        "ack_timeout": 10.0,
        "inactivity_threshold": 5,
        "view_entries": 8,
        "view_capacity": 64,
        "announce_join": False,
        "peer_sampling": "membership",
        "history_gossip": False,
        "history_lambda": 0.5,
        "history_capacity": 4,
        "spsa_samples": 8,
        "spsa_eps": 0.01,
        "spsa_lr": 0.2,
        "spsa_clip": 2.0,
        "spsa_salt": 9,
        "merge_interval": 2.0,
        "codec": "int8",
        "codec_fraction": 0.5,
        "codec_count": 5,
        "codec_clusters": 4,
        "codec_chunk": 100,
        "error_feedback": False,
        "keyframe_every": 3,
    }
    # Keys whose non-default value another key's value excludes get a table of their own.
    exclusive: list[dict[str, Any]] = [
        {"mode": "dsgd", "gossip_steps": 3},
        {"mode": "gossip", "merge_trigger": "time"},
        {"mode": "dsgd", "codec": "fedzip"},  # a delta codec needs dsgd
    ]
    written = set(table).union(*exclusive)
    assert written == set(ProtocolSettings.model_fields), "a new key: add it here"
    for index, variant in enumerate((table, *exclusive)):
        folder = tmp_path / str(index)
        folder.mkdir()
        assert all(
            variant[key] != ProtocolSettings.model_fields[key].default
            for key in variant
            if key != "mode"
        )
        scenario = parse_scenario({"rounds": 3, "learner": {"local_steps": 2}, "protocol": variant})
        config = core_config(scenario)
        node = config_from_dict(
            node_document(folder, protocol={**variant, "rounds": 3, "local_steps": 2}),
            base_dir=folder,
        )
        assert node.protocol == config
        assert {key: getattr(config, key) for key in variant} == variant


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("fanout", 0, "protocol.fanout = 0: an integer >= 1"),
        ("round_timeout", -1, "protocol.round_timeout = -1.0: a finite number of seconds > 0"),
        ("period_jitter", 1, "protocol.period_jitter = 1.0: a finite number in [0, 1)"),
        ("mode", "gosip", "protocol.mode = 'gosip': one of dsgd, fedavg, gossip, modest, spsa"),
        ("history_lambda", math.inf, "protocol.history_lambda = inf: a finite number > 0"),
        ("fanout", "2", "protocol.fanout = '2': an integer >= 1, not a string"),
        ("fanuot", 2, "protocol.fanuot = 2: not a key of [protocol]; keys are ack_timeout,"),
    ],
)
def test_a_bad_protocol_value_reads_alike_in_a_scenario_and_a_node_config(
    tmp_path: Path, key: str, value: object, message: str
) -> None:
    with pytest.raises(ConfigError) as scenario:
        parse_scenario({"protocol": {key: value}}, source="s.toml")
    with pytest.raises(ConfigError) as node:
        config_from_dict(node_document(tmp_path, protocol={key: value}), base_dir=tmp_path)
    assert str(scenario.value).startswith(f"s.toml: {message}"), scenario.value
    assert str(node.value).startswith(message), node.value
    if key != "fanuot":  # a node's [protocol] has keys a scenario's has not
        assert str(scenario.value) == f"s.toml: {node.value}"


def test_round_timeout_defaults_alike() -> None:
    assert ProtocolSpec().round_timeout == CoreConfig().round_timeout == 30.0
    assert parse_scenario({}).protocol.round_timeout == 30.0


# -- one checker -----------------------------------------------------------------------------


def test_what_an_integer_and_a_number_are() -> None:
    assert all(is_int(v) for v in (0, -3, np.int64(5), np.uint8(1)))
    assert not any(is_int(v) for v in (True, np.bool_(True), 1.0, "1", None))
    assert all(is_real(v) for v in (0, 1.5, math.inf, np.float32(1.0), np.int64(2)))
    assert not any(is_real(v) for v in (False, "1.5", None, 1j))


def test_check_int_and_check_number_name_the_key_and_the_range() -> None:
    assert check_int("k", np.int64(3), 1) == 3 and type(check_int("k", np.int64(3), 1)) is int
    with pytest.raises(ConfigError, match=r"^k = 0: an integer in \[1, 9\]$"):
        check_int("k", 0, 1, 9)
    with pytest.raises(ConfigError, match=r"^k = True: an integer >= 0$"):
        check_int("k", True, 0)
    assert check_number("x", 1, minimum=0, open_min=True) == 1.0
    with pytest.raises(ConfigError, match=r"^x = 1.0: a finite number in \[0, 1\)$"):
        check_number("x", 1.0, minimum=0, maximum=1, open_max=True)
    with pytest.raises(ConfigError, match=r"^x = nan: a finite number >= 0$"):
        check_number("x", math.nan, minimum=0)
    with pytest.raises(ConfigError, match=r"^t = 0: a finite number of seconds > 0$"):
        check_number("t", 0, minimum=0, open_min=True, unit="seconds")


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (
            {"devices": {"speed": {"values": [1, 0]}}},
            "devices.speed.values[1] = 0.0: a finite number > 0",
        ),
        ({"learner": {"betas": [0.9, 1.0]}}, "learner.betas[1] = 1.0: a finite number in [0, 1)"),
        (
            {"protocol": {"sample_fraction": 0}},
            "protocol.sample_fraction = 0.0: a finite number in (0, 1]",
        ),
        ({"learner": {"betas": [0.9]}}, "learner.betas = [0.9]: an array of 2 items"),
        ({"rounds": 0}, "rounds = 0: an integer in [1, 1000000000]"),
    ],
)
def test_the_whole_allowed_range_is_named_also_for_array_items_and_optional_keys(
    document: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_scenario(document, source="s.toml")
    assert str(info.value) == f"s.toml: {message}"
