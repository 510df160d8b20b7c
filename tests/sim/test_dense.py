"""Complete graphs stay implicit, and run exactly as the same graph given edge by edge."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from sim.run import run_scenario
from sim.scenario import parse_scenario
from topologies import CompleteAdjacency

NODES = 12


def document(topology: dict[str, Any], mode: str, disruptions: list[dict[str, Any]]) -> dict:
    return {
        "name": "dense",
        "rounds": 4,
        "topology": topology,
        "data": {"dataset": "digits", "partition": "iid", "partition_params": {}},
        "learner": {"hidden": [8], "local_steps": 2, "batch_size": 8},
        "protocol": {"mode": mode, "fanout": 2, "round_timeout": 1.0},
        "disruptions": disruptions,
    }


DISRUPTIONS = [
    # At t=0, before the start's connections: the engine falls back to one PeerConnected per
    # reachable neighbour.
    {"kind": "cut", "at": 0.0, "links": [[0, 1], [2, 5]]},
    {"kind": "crash", "at": 0.0, "nodes": [3]},
    {"kind": "leave", "round": 2, "nodes": [4, 7], "graceful": True},
    {"kind": "join", "round": 3},
    {"kind": "restore", "round": 3},
]


@pytest.mark.parametrize("mode", ["gossip", "dsgd"])
@pytest.mark.parametrize("disruptions", [[], DISRUPTIONS], ids=["calm", "disrupted"])
def test_implicit_complete_graph_matches_the_explicit_one(
    tmp_path: Path, mode: str, disruptions: list[dict[str, Any]]
) -> None:
    edges = tmp_path / "complete.edgelist"
    edges.write_text("".join(f"{u} {v}\n" for u, v in itertools.combinations(range(NODES), 2)))
    outputs = []
    for name, topology in (
        ("implicit", {"kind": "complete", "n": NODES}),
        ("explicit", {"kind": "file", "path": str(edges)}),
    ):
        scenario = parse_scenario(document(topology, mode, disruptions))
        result = run_scenario(scenario, tmp_path / name, plots=False)
        outputs.append(
            [
                (tmp_path / name / file).read_text()
                for file in ("metrics.csv", "events.jsonl", "nodes.csv", "edges.csv")
            ]
            + [json.dumps({k: v for k, v in result.summary.items() if k != "wall_seconds"})]
        )
    assert outputs[0][:4] == outputs[1][:4]
    implicit, explicit = (json.loads(out[4]) for out in outputs)
    implicit.pop("node_rounds_per_second")
    explicit.pop("node_rounds_per_second")
    assert implicit == explicit


def test_complete_population_stores_no_edges() -> None:
    from sim.population import build_population

    population = build_population(
        parse_scenario(document({"kind": "complete", "n": 40}, "gossip", []))
    )
    assert isinstance(population.neighbours, CompleteAdjacency)
    assert population.built_graph is None
    assert list(population.neighbours[3]) == [node for node in range(40) if node != 3]
    assert population.edge_count == 40 * 39 // 2
    assert population.graph.number_of_edges() == 40 * 39 // 2  # built on demand


def test_partition_by_centrality_on_an_implicit_complete_graph(tmp_path: Path) -> None:
    # Disruptions that need the networkx graph get it built on demand.
    disruptions = [
        {"kind": "partition", "round": 1, "random": 2},
        {"kind": "crash", "round": 2, "count": 2, "choose": "betweenness"},
    ]
    scenario = parse_scenario(document({"kind": "complete", "n": NODES}, "gossip", disruptions))
    result = run_scenario(scenario, tmp_path / "run", plots=False)
    assert result.summary["components"] == 2
    assert result.summary["alive_nodes"] == NODES - 2
