"""Every disruption kind shows its effect in the metrics, the events and the traffic."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import networkx as nx
import pytest
import torch

from p2pfl.errors import ConfigError
from p2pfl.protocol.membership import Status
from p2pfl.protocol.modest import ModestCore
from sim.engine import Engine
from sim.metrics import MetricsRecorder, Traffic
from sim.run import build_engine, run_scenario
from sim.scenario import apply_overrides, parse_scenario, read_document

SmallDocument = Callable[..., dict[str, Any]]


def run_engine(document: dict[str, Any], hook: Callable[[Engine], None] | None = None) -> Engine:
    engine = build_engine(parse_scenario(document), on_round=hook)
    engine.link_log = []
    engine.run()
    return engine


def rows_of(engine: Engine) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(engine.recorder.csv_text())))


def frames(engine: Engine, a: int, b: int) -> list[float]:
    """Arrival times of frames delivered between a and b, either way."""
    assert engine.link_log is not None
    return [t for t, src, dst, _ in engine.link_log if {src, dst} == {a, b}]


def test_partition_stops_consensus_across_the_cut_and_heal_restores_it(
    small_document: SmallDocument,
) -> None:
    left, right = [0, 1, 2, 3], [4, 5, 6, 7]
    document = small_document(
        rounds=16,
        data={
            "dataset": "gaussian_mixture",
            "params": {"n_samples": 800, "dim": 8, "num_classes": 4},
            "partition": "shards",
            "partition_params": {"k": 1},
        },
        disruptions=[
            {"kind": "partition", "round": 2, "groups": [left]},
            {"kind": "heal", "round": 9, "trigger": "all"},
        ],
    )
    gaps: dict[int, float] = {}

    def gap(engine: Engine) -> None:
        rounds = engine.completed_rounds
        if len(set(rounds)) == 1 and rounds[0] not in gaps:
            vectors = torch.stack([core.vector for core in engine.cores])
            gaps[rounds[0]] = float((vectors[left].mean(0) - vectors[right].mean(0)).norm())

    engine = run_engine(document, gap)
    cut_at = next(e["time"] for e in engine.events_log if e.get("kind") == "partition")
    heal_at = next(e["time"] for e in engine.events_log if e.get("kind") == "heal")
    crossing = [(0, 7), (3, 4)]
    for a, b in crossing:
        assert not [t for t in frames(engine, a, b) if cut_at < t <= heal_at]
        assert [t for t in frames(engine, a, b) if t > heal_at]
    # the two halves drift apart while cut, and come back together once healed
    assert gaps[8] > 2 * gaps[2]
    assert gaps[16] < 0.5 * gaps[9]
    rows = rows_of(engine)
    during = {r["component"] for r in rows if r["round"] == "5"}
    assert during == {"0", "4"}
    assert {r["component_size"] for r in rows if r["round"] == "15"} == {"8"}


def test_a_crashed_node_sends_nothing_after_its_crash_time(
    small_document: SmallDocument,
) -> None:
    engine = run_engine(
        small_document(rounds=6, disruptions=[{"kind": "crash", "at": 0.2, "nodes": [3]}])
    )
    assert engine.link_log is not None
    assert [t for t, src, _dst, _ in engine.link_log if src == 3]
    assert not [t for t, src, _dst, _ in engine.link_log if src == 3 and t > 0.2]
    assert not [t for t, _src, dst, _ in engine.link_log if dst == 3 and t > 0.2]
    rows = rows_of(engine)
    assert all(float(r["virtual_time"]) <= 0.2 for r in rows if r["node"] == "3")
    # everyone else ran every round, and the recorder did not wait for the dead node
    assert {r["round"] for r in rows if r["node"] == "4"} == {str(r) for r in range(6)}
    assert engine.status[3] == "dead"
    # crash noticed at once (a reset connection): nobody waited for a timeout
    assert engine.now < 5.0


def test_a_silent_crash_is_noticed_only_by_timeouts(small_document: SmallDocument) -> None:
    silent = run_engine(
        small_document(
            rounds=3,
            disruptions=[{"kind": "crash", "at": 0.1, "nodes": [3], "detect_after": float("inf")}],
        )
    )
    noticed = run_engine(
        small_document(rounds=3, disruptions=[{"kind": "crash", "at": 0.1, "nodes": [3]}])
    )

    def closed(engine: Engine) -> dict[tuple[int, int], float]:
        return {
            (int(r["node"]), int(r["round"])): float(r["virtual_time"]) for r in rows_of(engine)
        }

    waited, at_once = closed(silent), closed(noticed)
    # round 0 closed at 0.08 before the crash; in rounds 1 and 2 neighbours 2 and 4 each
    # wait out the full 5 s round timeout for node 3's model
    for node in (2, 4):
        assert waited[node, 1] >= 0.1 + 5.0
        assert waited[node, 2] - waited[node, 1] >= 5.0
    # a node two hops away waits only for the neighbours that waited (round 2), and one
    # three hops away never waits
    assert waited[1, 1] < 1.0 and waited[1, 2] >= 5.0
    assert waited[0, 2] < 1.0 and waited[7, 2] < 1.0
    # the same crash noticed at once (a reset connection) costs nobody a timeout
    assert max(at_once.values()) < 1.0


def test_a_cut_link_carries_nothing_until_restored(small_document: SmallDocument) -> None:
    engine = run_engine(
        small_document(
            rounds=10,
            disruptions=[
                {"kind": "cut", "at": 0.1, "links": [[0, 1]]},
                {"kind": "restore", "at": 0.5},
            ],
        )
    )
    times = frames(engine, 0, 1)
    assert [t for t in times if t <= 0.1]
    assert not [t for t in times if 0.1 < t <= 0.5]
    assert [t for t in times if t > 0.5]
    downs = [e for e in engine.events_log if e.get("event") == "link"]
    assert [(e["state"], e["link"]) for e in downs] == [("down", [0, 1]), ("up", [0, 1])]


def test_churn_from_a_trace_keeps_nodes_absent_while_offline(tmp_path: Path) -> None:
    (tmp_path / "traces").mkdir()
    (tmp_path / "traces" / "churn.csv").write_text(
        "node,online_from,online_until\n2,0,0.2\n2,0.6,1000\n5,0.1,1000\n"
    )
    scenario_path = tmp_path / "churn.toml"
    scenario_path.write_text(
        "\n".join(
            [
                'name = "churn"',
                "rounds = 8",
                "[topology]",
                'kind = "ring"',
                "n = 8",
                "[data]",
                'dataset = "gaussian_mixture"',
                "params = { n_samples = 400, dim = 8, num_classes = 4 }",
                'partition = "iid"',
                "partition_params = {}",
                "[learner]",
                "hidden = [8]",
                "local_steps = 3",
                "[[disruptions]]",
                'kind = "churn"',
                "at = 0.0",
                'trace = "traces/churn.csv"',
            ]
        )
    )
    document, source = read_document(str(scenario_path))
    scenario = parse_scenario(document, source=source)
    trace = scenario.disruptions[0]
    assert Path(getattr(trace, "trace", "")).is_absolute()
    engine = build_engine(scenario)
    engine.link_log = []
    engine.run()
    rows = rows_of(engine)
    node2 = [float(r["virtual_time"]) for r in rows if r["node"] == "2"]
    assert node2 and not [t for t in node2 if 0.2 < t < 0.6]
    assert [t for t in node2 if t >= 0.6]
    assert not [t for t, s, d, _ in engine.link_log if 2 in (s, d) and 0.2 < t < 0.6]
    node5 = [float(r["virtual_time"]) for r in rows if r["node"] == "5"]
    assert min(node5) > 0.1  # joined late: started at 0.1
    states = [(e["node"], e["state"]) for e in engine.events_log if e.get("event") == "node"]
    assert states.index((5, "offline")) < states.index((5, "online"))


def test_generated_churn_nodes_report_nothing_while_offline(
    small_document: SmallDocument,
) -> None:
    engine = run_engine(
        small_document(
            rounds=8,
            disruptions=[
                {
                    "kind": "churn",
                    "at": 0.0,
                    "nodes": [1, 6],
                    "mean_online": 0.3,
                    "mean_offline": 0.3,
                }
            ],
        )
    )
    rows = rows_of(engine)
    for node in (1, 6):
        spans: list[tuple[float, float]] = []
        offline_at = None
        for event in engine.events_log:
            if event.get("event") == "node" and event["node"] == node:
                if event["state"] == "offline":
                    offline_at = event["time"]
                elif offline_at is not None:
                    spans.append((offline_at, event["time"]))
                    offline_at = None
        assert spans, "the generator took the node offline at least once"
        times = [float(r["virtual_time"]) for r in rows if r["node"] == str(node)]
        for start, end in spans:
            assert not [t for t in times if start < t < end]
        assert len(times) == 8  # it came back and finished its rounds


def test_a_battery_drained_node_stops_after_n_trainings(small_document: SmallDocument) -> None:
    engine = run_engine(
        small_document(
            rounds=6, disruptions=[{"kind": "battery", "at": 0.0, "nodes": [2], "trainings": 3}]
        )
    )
    rows = rows_of(engine)
    assert sorted(r["round"] for r in rows if r["node"] == "2") == ["0", "1", "2"]
    assert engine.trainings_started[2] == 3
    assert engine.status[2] == "dead"
    assert len([r for r in rows if r["node"] == "1"]) == 6


def test_graceful_leave_and_join(small_document: SmallDocument) -> None:
    engine = run_engine(
        small_document(
            rounds=8,
            disruptions=[
                {"kind": "leave", "at": 0.1, "nodes": [4]},
                {"kind": "join", "at": 0.4},
            ],
        )
    )
    rows = rows_of(engine)
    node4 = [float(r["virtual_time"]) for r in rows if r["node"] == "4"]
    assert not [t for t in node4 if 0.1 < t < 0.4]
    assert len(node4) == 8
    # neighbours were told at once: nobody waited for a timeout before the join
    assert max(float(r["virtual_time"]) for r in rows if r["node"] == "0") < 5.0 + 0.5
    assert engine.status[4] == "online"


def test_removal_by_degree_removes_the_top_degree_nodes(
    small_document: SmallDocument,
) -> None:
    document = small_document(
        rounds=3,
        topology={"kind": "barabasi_albert", "n": 20, "m": 2},
        disruptions=[{"kind": "remove", "round": 1, "count": 3, "choose": "degree"}],
    )
    engine = run_engine(document)
    graph: nx.Graph = engine.population.graph
    top = sorted(graph.nodes, key=lambda node: (-graph.degree(node), node))[:3]
    fired = next(e for e in engine.events_log if e.get("event") == "disruption")
    assert sorted(fired["nodes"]) == sorted(top)
    assert all(engine.status[node] == "dead" for node in top)


@pytest.mark.parametrize("among", ["data", "relays"])
def test_removal_among_a_role_picks_only_that_role(
    small_document: SmallDocument, among: str
) -> None:
    document = small_document(
        rounds=2,
        topology={"kind": "barabasi_albert", "n": 20, "m": 2},
        roles={"relay_fraction": 0.5},
        disruptions=[
            {"kind": "remove", "round": 1, "fraction": 0.3, "choose": "betweenness", "among": among}
        ],
    )
    engine = run_engine(document)
    removed = next(e for e in engine.events_log if e.get("event") == "disruption")["nodes"]
    assert len(removed) == 6
    assert all(engine.population.relay[node] == (among == "relays") for node in removed)


def test_relays_merge_and_forward_without_training(small_document: SmallDocument) -> None:
    engine = run_engine(small_document(rounds=6, roles={"relays": [1, 5]}))
    rows = rows_of(engine)
    relay_rows = [r for r in rows if r["node"] in ("1", "5")]
    assert all(r["relay"] == "1" and r["train_loss"] == "nan" for r in relay_rows)
    # a relay's model changes: it merges its neighbours' models and sends them on
    accuracy = [float(r["test_accuracy"]) for r in relay_rows if r["node"] == "1"]
    assert accuracy[-1] > accuracy[0]
    assert engine.population.samplers[1] is None and engine.population.samples[1] >= 1


def test_a_slow_device_makes_rounds_longer(small_document: SmallDocument) -> None:
    fast = run_engine(small_document(rounds=3))
    speeds = [1.0] * 8
    speeds[0] = 0.1
    slow = run_engine(small_document(rounds=3, devices={"speed": {"values": speeds}}))
    steps, step_time = 3, 0.01
    assert fast.now == pytest.approx(3 * (steps * step_time + 0.05))
    # the slow node never waits: its neighbours' models arrive while it still trains
    assert slow.now == pytest.approx(3 * steps * step_time / 0.1 + 0.05)


def test_same_seed_identical_metrics_with_disruptions_loss_and_bandwidth(
    small_document: SmallDocument, tmp_path: Path
) -> None:
    document = small_document(
        rounds=6,
        topology={"kind": "barabasi_albert", "n": 16, "m": 2},
        roles={"relay_fraction": 0.25},
        network={
            "latency": {"dist": "lognormal", "mean": 0.05},
            "bandwidth": 50_000.0,
            "loss": 0.05,
            "jitter": 0.02,
        },
        devices={"speed": {"dist": "lognormal", "sigma": 0.3}},
        disruptions=[
            {"kind": "remove", "round": 2, "fraction": 0.2, "choose": "random"},
            {"kind": "partition", "at": 0.3, "random": 2},
            {"kind": "heal", "at": 0.8},
            {"kind": "churn", "at": 0.0, "fraction": 0.2, "mean_online": 1.0, "mean_offline": 0.3},
        ],
    )
    first = run_scenario(parse_scenario(document), tmp_path / "a", plots=False)
    second = run_scenario(parse_scenario(document), tmp_path / "b", plots=False)
    for name in ("metrics.csv", "events.jsonl"):
        assert (first.directory / name).read_bytes() == (second.directory / name).read_bytes()
    events = [json.loads(line) for line in (first.directory / "events.jsonl").open()]
    assert {e.get("kind") for e in events} >= {"remove", "partition", "heal", "churn"}


def test_recorder_completes_a_round_when_every_active_node_reported() -> None:
    completed: list[int] = []
    recorder = MetricsRecorder(
        num_nodes=3,
        evaluate=lambda v: (torch.zeros(len(v)), torch.ones(len(v))),
        on_complete=completed.append,
    )
    for node in (0, 1):
        recorder.record(0, node, now=1.0, train_loss=0.0, vector=torch.zeros(2), traffic=Traffic())
    assert completed == []
    recorder.set_active(2, False)
    assert completed == [0] and not recorder._pending
    recorder.record(0, 2, now=2.0, train_loss=0.0, vector=torch.zeros(2), traffic=Traffic())
    late = [row for row in recorder.rows if row[1] == 2]
    assert len(late) == 1  # a late row, evaluated on its own


@pytest.mark.parametrize(
    ("disruption", "named"),
    [
        ({"kind": "crash", "at": 1.0, "fraction": 1.5}, "disruptions[0].fraction = 1.5"),
        ({"kind": "crsh", "at": 1.0}, "disruptions[0].kind"),
        ({"kind": "crash", "nodes": [1]}, "disruptions[0]"),
        ({"kind": "crash", "at": 1.0, "nodes": [1], "colour": 1}, "disruptions[0].colour"),
        ({"kind": "partition", "at": 1.0}, "disruptions[0]"),
        ({"kind": "churn", "at": 0.0, "trace": "no-such.csv"}, "disruptions[0].trace"),
        ({"kind": "battery", "at": 0.0, "nodes": [1]}, "disruptions[0].trainings"),
    ],
)
def test_bad_disruptions_are_one_line_errors_naming_the_key(
    small_document: SmallDocument, disruption: dict[str, Any], named: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_scenario(small_document(disruptions=[disruption]))
    assert "\n" not in str(info.value)
    assert named in str(info.value)


def test_disruptions_that_do_not_fit_the_topology_are_config_errors(
    small_document: SmallDocument,
) -> None:
    with pytest.raises(ConfigError, match=r"disruptions\[0\]\.links"):
        build_engine(
            parse_scenario(
                small_document(disruptions=[{"kind": "cut", "at": 0, "links": [[0, 4]]}])
            )
        )
    with pytest.raises(ConfigError, match=r"disruptions\[0\]\.nodes"):
        build_engine(
            parse_scenario(small_document(disruptions=[{"kind": "crash", "at": 0, "nodes": [99]}]))
        )


def test_overrides_index_arrays_of_tables(small_document: SmallDocument) -> None:
    document = small_document(disruptions=[{"kind": "crash", "at": 1.0, "fraction": 0.1}])
    changed = apply_overrides(document, ["disruptions[0].fraction=0.3", "disruptions[0].at=2"])
    scenario = parse_scenario(changed)
    assert getattr(scenario.disruptions[0], "fraction", None) == 0.3
    with pytest.raises(ConfigError, match="--set"):
        apply_overrides(document, ["disruptions[3].fraction=0.3"])


def test_a_leave_for_good_says_goodbye_first_and_never_comes_back(
    small_document: SmallDocument,
) -> None:
    """The leaving modest node's core is told LeaveRequested: every peer ends up holding
    its signed LEAVE (and drops it from the committees), then it dies; a join skips it."""
    leaver = 3
    document = small_document(
        rounds=6,
        topology={"kind": "complete", "n": 8},
        protocol={
            "mode": "modest",
            "sample_size": 3,
            "aggregators": 1,
            "success_fraction": 1.0,
            "min_models": 2,
            "ping_timeout": 0.5,
            "aggregation_timeout": 2.0,
            "ack_timeout": 3.0,
        },
        disruptions=[
            {"kind": "leave", "round": 2, "nodes": [leaver], "for_good": True},
            {"kind": "join", "round": 4},
        ],
    )
    engine = run_engine(document)
    fired = next(e for e in engine.events_log if e.get("kind") == "leave")
    gone = [e for e in engine.events_log if e.get("event") == "node" and e["node"] == leaver]
    assert [(e["state"], e["cause"]) for e in gone] == [("dead", "leave")]  # no join
    assert gone[0]["time"] > fired["time"]  # once its goodbye had arrived
    assert engine.status[leaver] == "dead"
    leaver_id = engine.cores[leaver].node_id
    for index, core in enumerate(engine.cores):
        if index == leaver:
            continue
        assert isinstance(core, ModestCore)
        advert = core.membership.advert(leaver_id)
        assert advert is not None and advert.status is Status.LEAVE, index
        assert leaver_id not in core.membership.candidates(core.round)
    assert engine.cores[leaver].finished and engine.cores[leaver].round < 6
    assert max(core.round for core in engine.cores) == 6  # the others ran every round
