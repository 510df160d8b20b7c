"""Per-link overrides of the network model."""

from __future__ import annotations

import pytest

from p2pfl.errors import ConfigError
from sim.network import LinkModel
from sim.scenario import NetworkSpec, parse_scenario


def network(**fields: object) -> NetworkSpec:
    return NetworkSpec.model_validate({"latency": {"dist": "constant", "value": 0.05}, **fields})


def test_override_applies_to_both_directions_of_the_named_links_only() -> None:
    spec = network(links=[{"between": [[0, 1]], "latency": {"dist": "constant", "value": 1.0}}])
    links = LinkModel(spec, seed=1, nodes=3)
    assert links.transmit(0, 1, 100, now=2.0) == pytest.approx(3.0)
    assert links.transmit(1, 0, 100, now=2.0) == pytest.approx(3.0)
    assert links.transmit(0, 2, 100, now=2.0) == pytest.approx(2.05)


def test_bandwidth_override_serialises_frames_on_that_link() -> None:
    spec = network(bandwidth=1e9, links=[{"between": [[0, 1]], "bandwidth": 1000.0}])
    links = LinkModel(spec, seed=1, nodes=3)
    first = links.transmit(0, 1, 500, now=0.0)
    second = links.transmit(0, 1, 500, now=0.0)
    assert first == pytest.approx(0.5 + 0.05)
    assert second == pytest.approx(1.0 + 0.05)
    assert links.transmit(0, 2, 500, now=0.0) == pytest.approx(0.05 + 500 / 1e9)


def test_lossy_link_loses_frames_and_others_do_not() -> None:
    spec = network(links=[{"between": [[2, 3]], "loss": 0.9}])
    links = LinkModel(spec, seed=4, nodes=4)
    lost = sum(links.transmit(2, 3, 10, now=float(t)) is None for t in range(200))
    assert 150 <= lost <= 200
    assert all(links.transmit(0, 1, 10, now=float(t)) is not None for t in range(200))


def test_later_entry_wins_for_a_pair() -> None:
    spec = network(
        links=[
            {"between": [[0, 1]], "latency": {"dist": "constant", "value": 1.0}},
            {"between": [[1, 0]], "latency": {"dist": "constant", "value": 2.0}},
        ]
    )
    assert LinkModel(spec, seed=1, nodes=2).transmit(0, 1, 1, now=0.0) == pytest.approx(2.0)


def test_override_naming_a_missing_node_is_a_one_line_error() -> None:
    spec = network(links=[{"between": [[0, 7]], "loss": 0.5}])
    with pytest.raises(ConfigError) as info:
        LinkModel(spec, seed=1, nodes=4)
    assert "network.links[0].between" in str(info.value)
    assert "0..3" in str(info.value)


def test_a_link_to_itself_is_rejected_when_parsing() -> None:
    with pytest.raises(ConfigError) as info:
        parse_scenario({"network": {"links": [{"between": [[1, 1]], "loss": 0.1}]}})
    assert "network.links" in str(info.value)
    assert "\n" not in str(info.value)
