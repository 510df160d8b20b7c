"""The memory estimate: huge scenarios are refused before anything is allocated."""

from __future__ import annotations

import resource
import time
from pathlib import Path

import pytest

from p2pfl.errors import ConfigError
from p2pfl.learn import mlp
from p2pfl.params import flatten
from p2pfl.protocol.gossip import GOSSIP_IN_FLIGHT
from p2pfl.sizes import dataset_shape, parameter_count
from sim import footprint
from sim.cli import main
from sim.run import run_scenario
from sim.scenario import parse_scenario

SMALL = {
    "name": "small",
    "rounds": 1,
    "topology": {"kind": "ring", "n": 4},
    "learner": {"local_steps": 1},
}


def test_parameter_count_matches_the_real_model() -> None:
    real = flatten(mlp([64, 32, 10], seed=0)).numel()
    assert parameter_count("mlp", {"hidden": [32]}, (64,), 10) == real
    # A model far too large to allocate is refused by its size, counted without allocating.
    with pytest.raises(ConfigError, match="10,001,100,010"):
        parameter_count("mlp", {"hidden": [10**5]}, (10**5,), 10)


def test_dataset_shape_without_generating() -> None:
    assert dataset_shape("digits", {}) == (1797, (64,), 10)
    shape = dataset_shape("gaussian_mixture", {"n_samples": 10**12, "dim": 7, "num_classes": 3})
    assert shape == (10**12, (7,), 3)
    assert dataset_shape("mnist1d", {"n_samples": 10**9}) == (10**9, (40,), 10)
    examples, sample_shape, classes = dataset_shape("synthetic_leaf", {"num_clients": 10**7})
    assert examples > 50 * 10**7 and (sample_shape, classes) == ((60,), 10)


def test_estimate_grows_with_nodes_and_the_complete_graph_stores_no_edges() -> None:
    small = footprint.estimate(parse_scenario({**SMALL, "topology": {"kind": "ring", "n": 100}}))
    large = footprint.estimate(parse_scenario({**SMALL, "topology": {"kind": "ring", "n": 10**4}}))
    assert small is not None and large is not None
    assert large.models == 100 * small.models
    dense = footprint.estimate(
        parse_scenario({**SMALL, "topology": {"kind": "complete", "n": 1000}})
    )
    assert dense is not None and dense.graph == 0


def test_scenario_that_does_not_fit_is_refused_in_one_line() -> None:
    scenario = parse_scenario(SMALL)
    estimate = footprint.estimate(scenario)
    assert estimate is not None
    assert footprint.check_fits(scenario, available=estimate.total) == estimate
    with pytest.raises(ConfigError) as info:
        footprint.check_fits(scenario, available=estimate.total - 1)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("topology.n = 4: needs about ")
    assert "is available" in message and "--force" in message and "learner.hidden" in message


def test_force_runs_a_scenario_the_estimate_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(footprint, "available_bytes", lambda: 1)
    scenario = parse_scenario(SMALL)
    with pytest.raises(ConfigError, match="--force"):
        run_scenario(scenario, tmp_path / "refused", plots=False)
    assert not (tmp_path / "refused").exists()
    phases: list[str] = []
    result = run_scenario(
        scenario, tmp_path / "forced", plots=False, force=True, on_phase=phases.append
    )
    assert result.summary["node_rounds"] == 4
    assert phases == [
        "estimating memory",
        "building the graph",
        "partitioning data",
        "generating keys",
        "building cores",
        "running",
    ]


def test_ten_million_nodes_exit_2_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    code = main(["run", "default", "--set", "topology.n=10000000", "--quiet"])
    assert code == 2
    assert time.perf_counter() - started < 10
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 100
    err = capsys.readouterr().err
    assert err.startswith("p2pfl-sim: error: topology.n = 10000000: needs about ")
    assert err.count("\n") == 1


def test_sweep_refuses_before_starting_a_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sim.sweep import plan, run_sweep

    runs = plan(SMALL, "<test>", [("seed", ["1", "2"])], seeds=1, out=tmp_path / "sweep")
    monkeypatch.setattr("sim.sweep.available_bytes", lambda: 1)
    with pytest.raises(ConfigError, match=r"^topology\.n = 4: needs about .*--force"):
        run_sweep(runs, "<test>", tmp_path / "sweep", jobs=2)
    assert not any((tmp_path / "sweep").glob("run-*"))


def test_the_buffered_models_are_what_each_mode_declares() -> None:
    """ModeTraits.buffered: dsgd 2 (shared decoded models), gossip 2 * fanout, modest
    sample_size received models per node, over the same base copies."""
    topology = {"kind": "complete", "n": 200}

    def models(protocol: dict[str, object]) -> int:
        scenario = parse_scenario({**SMALL, "topology": topology, "protocol": protocol})
        estimate = footprint.estimate(scenario)
        assert estimate is not None
        return estimate.models

    unit = (models({"mode": "modest", "sample_size": 8}) - models({"mode": "dsgd"})) // 6
    assert unit > 0  # one received model on every node
    assert models({"mode": "modest", "sample_size": 9}) - models({"mode": "dsgd"}) == 7 * unit
    # gossip: 2 * fanout buffered pushes plus the pushes still on their way (measured on the
    # dense-graph bench, p2pfl.protocol.gossip.GOSSIP_IN_FLIGHT).
    in_flight = int(GOSSIP_IN_FLIGHT)
    assert (
        models({"mode": "gossip", "fanout": 3}) - models({"mode": "dsgd"}) == (4 + in_flight) * unit
    )
