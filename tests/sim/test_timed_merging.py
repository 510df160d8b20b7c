"""Time-triggered gossip (FedFix-style): each neighbour's expected merge weight is its data
share whatever its device speed; count-triggered weights follow the speed instead."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from p2pfl.errors import ConfigError
from p2pfl.protocol.gossip import GossipCore
from sim.run import build_engine
from sim.scenario import parse_scenario

SEEDS = range(6)
HORIZON = 20.0
INTERVAL = 0.25


def _scenario(seed: int, **protocol: Any) -> dict[str, Any]:
    return {
        "name": "timed",
        "seed": seed,
        "rounds": 100_000,  # nobody finishes: every stream stays stationary up to the horizon
        "horizon": HORIZON,
        "topology": {"kind": "ring", "n": 8},
        "data": {
            "dataset": "gaussian_mixture",
            "params": {"n_samples": 800, "dim": 4, "num_classes": 2},
            "partition": "quantity_skew",
            "partition_params": {"alpha": 5.0},
        },
        # a training takes 0.25 s / speed: about one merge interval at the median speed
        "learner": {
            "hidden": [],
            "lr": 0.05,
            "batch_size": 8,
            "local_steps": 1,
            "step_time": 0.25,
        },
        "protocol": {
            "mode": "gossip",
            "merge_trigger": "time",
            "merge_interval": INTERVAL,
            "period": 0.01,
            "period_jitter": 0.0,
            "fanout": 2,
            **protocol,
        },
        "network": {"latency": {"value": 0.005}},
        # lognormal speeds: the fastest of 8 nodes trains 2.7x to 10x as often as the slowest
        "devices": {"speed": {"dist": "lognormal", "sigma": 0.5}},
        # the property is about weights: skip the test-set evaluation of every training
        "metrics": {"eval_every": 1_000_000, "eval_samples": 1},
    }


def _ratios() -> tuple[list[float], list[float], list[float], int]:
    """Per (node, neighbour, seed): log speed of the neighbour, and the applied and plain
    weight sums divided by (ticks * data share)."""
    speeds: list[float] = []
    applied: list[float] = []
    plain: list[float] = []
    clipped = 0
    for seed in SEEDS:
        engine = build_engine(parse_scenario(_scenario(seed)))
        engine.run()
        population = engine.population
        index = {core.node_id: i for i, core in enumerate(engine.cores)}
        for i, core in enumerate(engine.cores):
            assert isinstance(core, GossipCore) and core.timed is not None
            timed = core.timed
            clipped += timed.clipped
            neighbours = [index[peer] for peer in core._peers.neighbours]
            total = population.samples[i] + sum(population.samples[j] for j in neighbours)
            for peer in core._peers.neighbours:
                j = index[peer]
                share = population.samples[j] / total
                speeds.append(float(np.log(population.speed[j])))
                applied.append(timed.applied.get(peer, 0.0) / (timed.ticks * share))
                plain.append(timed.plain.get(peer, 0.0) / (timed.ticks * share))
    return speeds, applied, plain, clipped


def test_expected_weight_is_the_data_share_whatever_the_speed() -> None:
    speeds, applied, plain, clipped = _ratios()
    x = np.array(speeds)
    corrected = np.array(applied)
    uncorrected = np.array(plain)
    # unbiased: on average each neighbour gets its data share per tick ...
    assert abs(corrected.mean() - 1.0) < 0.05, corrected.mean()
    # ... and the fast do not get more than the slow: no trend in log speed
    slope = np.polyfit(x, corrected, 1)[0]
    assert abs(slope) < 0.1, slope
    # count-triggered weights do follow the speed (so this test can tell the two apart)
    plain_slope = np.polyfit(x, uncorrected, 1)[0]
    assert plain_slope > 0.25, plain_slope
    assert abs(slope) < plain_slope / 3
    assert clipped > 0  # the capped ticks happened and their owed weight was paid later


@pytest.mark.parametrize(
    ("protocol", "message"),
    [
        ({"mode": "dsgd"}, "protocol.merge_trigger = 'time': 'count' unless mode is gossip"),
        ({"merge_interval": 0.0}, "merge_interval"),
        ({"merge_trigger": "size"}, "merge_trigger"),
        ({"peer_sampling": "membership"}, "'count' with peer_sampling 'membership'"),
    ],
)
def test_bad_settings_name_the_key(protocol: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_engine(parse_scenario(_scenario(0, **protocol)))
