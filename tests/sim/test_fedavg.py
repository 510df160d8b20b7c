"""The federated reference in the simulator: one server added to the population, FedAvg rounds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from p2pfl.errors import ConfigError
from p2pfl.protocol import PROTOCOL_MODES, register_protocol_mode
from p2pfl.protocol.core import MODE_TRAITS
from p2pfl.protocol.fedavg import FedAvgCore
from sim.engine import Engine
from sim.run import build_engine, run_scenario
from sim.scenario import parse_scenario


def digits_iid(**protocol: Any) -> dict[str, Any]:
    """10 clients on digits, IID, 10 rounds of 20 local steps."""
    return {
        "name": "fedavg-digits",
        "seed": 3,
        "rounds": 10,
        "topology": {"kind": "complete", "n": 10},
        "data": {"dataset": "digits", "partition": "iid", "partition_params": {}},
        "learner": {"hidden": [32], "lr": 0.2, "batch_size": 32, "local_steps": 20},
        "protocol": {"mode": "fedavg", **protocol},
    }


def run(document: dict[str, Any]) -> Engine:
    engine = build_engine(parse_scenario(document))
    engine.run()
    return engine


def curve(engine: Engine) -> list[float]:
    return [summary.mean_test_accuracy for summary in engine.recorder.rounds]


def test_fedavg_reaches_centralised_accuracy_on_digits_iid() -> None:
    federated = run(digits_iid())
    # one client holding all the data, trained as many sequential steps: plain SGD
    centralised = run({**digits_iid(), "topology": {"kind": "complete", "n": 1}})
    final = curve(federated)[-1]
    print(f"fedavg {final:.4f}, centralised {curve(centralised)[-1]:.4f}")
    assert final >= 0.9
    assert final >= curve(centralised)[-1] - 0.02
    assert len(curve(federated)) == 10


def test_full_participation_is_dsgd_on_a_complete_graph() -> None:
    """Every client sampled every round: FedAvg's global model is what every node of D-PSGD
    on a complete graph holds (the same sample-weighted average of the same trainings)."""
    federated = curve(run(digits_iid(sample_size=10)))
    decentralised = curve(run({**digits_iid(), "protocol": {"mode": "dsgd"}}))
    assert federated == pytest.approx(decentralised, abs=1e-9)


def test_only_the_server_reports_and_the_summary_says_so(tmp_path: Path) -> None:
    result = run_scenario(parse_scenario(digits_iid(sample_fraction=0.3)), tmp_path, plots=False)
    summary = result.summary
    assert summary["server"] == 10 and summary["nodes"] == 11
    assert summary["mean_test_accuracy"] == summary["min_test_accuracy"]
    assert summary["final_accuracy_alive"] == summary["mean_test_accuracy"]
    assert summary["final_consensus_distance"] == 0.0
    rows = (tmp_path / "metrics.csv").read_text().splitlines()[1:]
    assert [row.split(",")[:2] for row in rows] == [[str(r), "10"] for r in range(10)]
    nodes = (tmp_path / "nodes.csv").read_text().splitlines()
    assert nodes[-1].startswith("10,1,")  # the server: a relay, no data of its own
    assert (tmp_path / "edges.csv").read_text().count(",10\n") == 10


def test_same_seed_same_metrics_and_sampling_follows_the_seed(tmp_path: Path) -> None:
    texts = []
    for seed, name in ((3, "a"), (3, "b"), (4, "c")):
        document = {**digits_iid(sample_fraction=0.3), "seed": seed, "rounds": 4}
        run_scenario(parse_scenario(document), tmp_path / name, plots=False)
        texts.append((tmp_path / name / "metrics.csv").read_bytes())
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]


def test_stragglers_are_dropped_at_round_timeout() -> None:
    document = digits_iid(sample_size=10, round_timeout=1.0)
    # client 0 needs 20 steps * 0.01 s / 0.05 = 4 s per training: always too late
    document["devices"] = {"speed": {"values": [0.05] + [1.0] * 10}}
    engine = run(document)
    times = [summary.virtual_time for summary in engine.recorder.rounds]
    assert len(times) == 10
    gaps = [later - earlier for earlier, later in zip([0.0, *times], times, strict=False)]
    assert all(gap == pytest.approx(1.0) for gap in gaps)  # every round waited to the timeout
    assert curve(engine)[-1] >= 0.85  # the nine others still learn


def test_crashed_clients_are_not_waited_for() -> None:
    document = digits_iid(sample_size=10, round_timeout=30.0)
    document["disruptions"] = [
        {"kind": "crash", "round": 3, "fraction": 0.3, "among": "data", "detect_after": 0.0}
    ]
    engine = run(document)
    assert engine.status.count("dead") == 3 and engine.status[10] == "online"
    times = [summary.virtual_time for summary in engine.recorder.rounds]
    assert len(times) == 10 and times[-1] < 10.0  # never waited 30 s for a dead client
    assert curve(engine)[-1] >= 0.85


def test_server_crash_ends_the_federation() -> None:
    document = digits_iid()
    document["disruptions"] = [{"kind": "crash", "round": 4, "nodes": [10]}]
    engine = run(document)
    assert len(engine.recorder.rounds) == 4
    assert all(not engine.is_finished(node) for node in range(10))


def test_byzantine_clients_break_fedavg_and_not_a_robust_server() -> None:
    accuracy = {}
    for rule in ("weighted", "median"):
        document = digits_iid(sample_size=10)
        document["merge"] = {"rule": rule}
        document["adversaries"] = [{"attack": "sign_flip", "count": 3, "scale": 4.0}]
        engine = run(document)
        honest = engine.population.honest
        assert len(honest) == 11 and honest.count(False) == 3 and honest[10]  # server 10
        accuracy[rule] = curve(engine)[-1]
    assert accuracy["weighted"] < 0.3 <= 0.85 <= accuracy["median"], accuracy


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"protocol": {"mode": "fedavgg"}}, "protocol.mode"),
        ({"protocol": {"mode": "fedavg", "sample_fraction": 0}}, "protocol.sample_fraction"),
        ({"adversaries": [{"attack": "sign_flip", "sybils": 2}]}, "adversaries[0].sybils"),
    ],
)
def test_bad_fedavg_scenarios_are_one_line_errors(change: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_engine(parse_scenario({**digits_iid(), **change}))
    assert key in caught.value.key
    assert "\n" not in str(caught.value)


def test_scenario_modes_are_the_registry_s() -> None:
    with pytest.raises(ConfigError, match="one of dsgd, fedavg, gossip, modest, spsa"):
        parse_scenario({"protocol": {"mode": "federated"}})
    register_protocol_mode("federated")(FedAvgCore)  # a plug-in, under its own name
    try:
        assert parse_scenario({"protocol": {"mode": "federated"}}).protocol.mode == "federated"
    finally:
        del PROTOCOL_MODES["federated"], MODE_TRAITS["federated"]
