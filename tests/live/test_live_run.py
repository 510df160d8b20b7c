"""Live mode without Ray: shards in this process or as plain processes, real TCP on loopback.

These run the same driver as ``p2pfl-sim run --live`` (:func:`sim.live.run_live`) with shard
handles made by the test, so the run directory, the metrics path and the disruption
primitives are covered where Ray is not installed.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from sim.cli import main
from sim.live import LiveRunError, LocalShard, ProcessShard, assign, run_live
from sim.run import run_scenario
from sim.scenario import Scenario, parse_scenario
from tests.documents import TIMELINE, live_document

RUN_FILES = {
    "scenario.toml",
    "metrics.csv",
    "summary.json",
    "events.jsonl",
    "nodes.csv",
    "edges.csv",
}


def _header(directory: Path) -> list[str]:
    with (directory / "metrics.csv").open() as handle:
        return next(csv.reader(handle))


def _rows(directory: Path) -> list[dict[str, str]]:
    with (directory / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


def _check_same_format(live: Path, virtual: Path) -> dict[str, Any]:
    """The live run directory has the virtual one's files, columns and summary keys."""
    assert {path.name for path in live.iterdir()} >= RUN_FILES
    assert _header(live) == _header(virtual)
    assert len(_rows(live)) == len(_rows(virtual))
    live_summary = json.loads((live / "summary.json").read_text())
    virtual_summary = json.loads((virtual / "summary.json").read_text())
    assert set(live_summary) == set(virtual_summary) | {"clock", "live"}
    assert live_summary["clock"] == "wall"
    return live_summary


@pytest.mark.timeout(90)
def test_local_shards_write_the_run_directory_of_a_virtual_run(tmp_path: Path) -> None:
    scenario = parse_scenario(live_document())
    handles = [LocalShard(scenario, block) for block in assign(8, 3)]
    live = run_live(scenario, tmp_path / "live", handles=handles, plots=False)
    virtual = run_scenario(scenario, tmp_path / "virtual", plots=False)
    summary = _check_same_format(live.directory, virtual.directory)
    assert summary["rounds"] == 4 and summary["live"] == {
        "shards": 3,
        "timed_out": False,
        "ray_address": summary["live"]["ray_address"],
    }
    rows = _rows(live.directory)
    assert sorted({(int(row["round"]), int(row["node"])) for row in rows}) == [
        (round_, node) for round_ in range(4) for node in range(8)
    ]
    assert all(int(row["messages_received"]) > 0 for row in rows if row["round"] == "3")
    times = [float(row["virtual_time"]) for row in rows]
    assert min(times) > 0 and max(times) <= summary["virtual_seconds"]
    # Same nodes, same data, same merge rule: synchronous rounds learn the same.
    gap = abs(summary["mean_test_accuracy"] - virtual.summary["mean_test_accuracy"])
    assert gap <= 0.05, (summary["mean_test_accuracy"], virtual.summary["mean_test_accuracy"])


@pytest.mark.timeout(90)
def test_shard_processes_speak_json_lines(tmp_path: Path) -> None:
    scenario = parse_scenario(live_document(rounds=2))
    handles = [ProcessShard(scenario, block, "127.0.0.1") for block in ([0, 1, 2, 3], [4, 5, 6, 7])]
    result = run_live(scenario, tmp_path / "run", handles=handles, plots=False)
    assert result.summary["rounds"] == 2 and result.summary["node_rounds"] == 16
    assert all(handle.process.poll() is not None for handle in handles)
    # what crossed the pipes arrived whole: every node's records, their models (base64: the
    # nodes' models differ) and traffic counters (dsgd on a ring merges a round only with
    # both neighbours' models, so a round-r record has heard at least 2(r + 1) frames)
    rows = _rows(result.directory)
    assert sorted((int(row["round"]), int(row["node"])) for row in rows) == [
        (round_, node) for round_ in range(2) for node in range(8)
    ]
    assert all(0.0 <= float(row["test_accuracy"]) <= 1.0 for row in rows)
    assert all(float(row["distance_to_mean"]) > 0.0 for row in rows)
    assert all(int(row["messages_received"]) >= 2 * (int(row["round"]) + 1) for row in rows)


def _disrupted() -> Scenario:
    """Gossip paced by its period (about 0.2 s a round), so wall-clock disruptions land
    mid-run."""
    return parse_scenario(
        live_document(
            rounds=16,
            protocol={"mode": "gossip", "period": 0.4, "fanout": 2},
            disruptions=TIMELINE,
        )
    )


@pytest.mark.timeout(90)
def test_disruptions_act_through_the_runtime(tmp_path: Path) -> None:
    scenario = _disrupted()
    handles = [LocalShard(scenario, block, checkpoints=True) for block in assign(8, 2)]
    result = run_live(scenario, tmp_path / "run", handles=handles, plots=False)
    events = [
        json.loads(line) for line in (result.directory / "events.jsonl").read_text().splitlines()
    ]
    fired = [event["kind"] for event in events if event["event"] == "disruption"]
    assert fired == ["cut", "leave", "crash", "join", "restore"]
    assert result.summary["alive_nodes"] == 7 and not result.summary["live"]["timed_out"]
    rows = _rows(result.directory)
    crashed = [int(row["round"]) for row in rows if row["node"] == "7"]
    assert max(crashed) < 15  # stopped for good before its last round
    rejoined = sorted(
        (int(row["round"]), float(row["virtual_time"])) for row in rows if row["node"] == "5"
    )
    assert rejoined[-1][0] == 15  # came back from its checkpoint and finished
    gaps = [later[1] - earlier[1] for earlier, later in zip(rejoined, rejoined[1:], strict=False)]
    assert max(gaps) >= 0.6, rejoined  # offline from 0.4 s to 1.2 s


def test_live_without_ray_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    path = tmp_path / "s.toml"
    path.write_text('name = "x"\n')
    assert main(["run", str(path), "--live", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'p2pfl-gossip[ray]'" in err[0]


@pytest.mark.timeout(90)
def test_a_shard_that_cannot_bind_fails_the_run_and_every_shard_is_closed(
    tmp_path: Path,
) -> None:
    scenario = parse_scenario(live_document(rounds=2))
    good = ProcessShard(scenario, [0, 1, 2, 3], "127.0.0.1")
    bad = ProcessShard(scenario, [4, 5, 6, 7], "203.0.113.254")  # TEST-NET-3: not ours
    with pytest.raises(LiveRunError, match="could not bind"):
        run_live(scenario, tmp_path / "run", handles=[good, bad], plots=False)
    assert good.process.poll() is not None and bad.process.poll() is not None
    assert not (tmp_path / "run").exists()


@pytest.mark.timeout(90)
def test_the_wall_limit_stops_a_run_and_still_writes_its_directory(tmp_path: Path) -> None:
    scenario = parse_scenario(
        live_document(rounds=1000, horizon=1.5, protocol={"mode": "gossip", "period": 0.3})
    )
    handles = [LocalShard(scenario, block) for block in assign(8, 2)]
    result = run_live(scenario, tmp_path / "run", handles=handles, plots=False)
    assert result.summary["live"]["timed_out"]
    assert 1.5 <= result.summary["virtual_seconds"] < 30
    assert 0 < result.summary["rounds"] < 1000
    assert all(not handle.shard._thread.is_alive() for handle in handles)  # type: ignore[union-attr]


def _modest() -> Scenario:
    """Sampled committees on a ring: the cores send to nodes that are not their neighbours."""
    return parse_scenario(
        live_document(
            data={"dataset": "digits", "partition": "iid", "partition_params": {}},
            learner={"hidden": [32], "lr": 0.1, "batch_size": 32, "local_steps": 20},
            protocol={
                "mode": "modest",
                "sample_size": 3,
                "aggregators": 1,
                "min_models": 2,
                "ping_timeout": 0.5,
                "aggregation_timeout": 1.5,
                "ack_timeout": 2.0,
                "view_entries": 8,
            },
        )
    )


@pytest.mark.timeout(60)
def test_modest_committees_reach_beyond_the_neighbours(tmp_path: Path) -> None:
    scenario = _modest()
    handles = [LocalShard(scenario, block) for block in assign(8, 2)]
    nodes = {node: handle.shard for handle in handles for node in handle.nodes}
    result = run_live(scenario, tmp_path / "run", handles=handles, plots=False)
    summary = result.summary
    # Not every node finishes (those not sampled near the end wait for nobody): the run
    # ends once the last round's model exists and nothing is left to happen.
    assert summary["rounds"] == 4 and not summary["live"]["timed_out"], summary
    assert summary["virtual_seconds"] < 30
    rows = _rows(result.directory)
    assert {int(row["round"]) for row in rows} == set(range(4))
    accuracy: dict[int, list[float]] = {}
    for row in rows:
        accuracy.setdefault(int(row["round"]), []).append(float(row["test_accuracy"]))
    first, last = max(accuracy[0]), max(accuracy[3])
    print(f"modest live: accuracy {first:.3f} after round 0, {last:.3f} after round 3")
    assert last > first + 0.05 and last > 0.5, accuracy
    # every node got the whole address book; ring neighbours are 2 of them
    built = [slot.node for shard in nodes.values() for slot in shard._slots.values()]
    assert all(node is not None and len(node.config.bootstrap) == 7 for node in built)
    assert sum(node.stats["dials_on_demand"] for node in built if node is not None) > 0
    assert sum(node.stats["misbehaviour"] for node in built if node is not None) == 0


@pytest.mark.timeout(90)
def test_fedavg_server_and_clients_run_live(tmp_path: Path) -> None:
    scenario = parse_scenario(live_document(protocol={"mode": "fedavg", "round_timeout": 10.0}))
    handles = [LocalShard(scenario, block) for block in assign(9, 3)]  # 8 clients + server
    result = run_live(scenario, tmp_path / "run", handles=handles, plots=False)
    summary = result.summary
    assert summary["server"] == 8 and summary["rounds"] == 4, summary
    assert not summary["live"]["timed_out"]
    rows = _rows(result.directory)
    assert [(int(row["round"]), int(row["node"])) for row in rows] == [(r, 8) for r in range(4)]
    accuracy = [float(row["test_accuracy"]) for row in rows]
    print("fedavg live: global model accuracy per round", accuracy)
    assert accuracy[-1] > accuracy[0]
