"""The World interface: both drivers implement all of it, and one timeline drives either."""

from __future__ import annotations

from typing import Any

import pytest

from sim.disruptions import Disruptions
from sim.engine import Engine
from sim.live import LiveWorld
from sim.metrics import MetricsRecorder
from sim.population import build_population
from sim.run import build_engine
from sim.scenario import parse_scenario
from sim.world import DEAD, OFFLINE, ONLINE, World, WorldState
from tests.documents import TIMELINE, small_document

METHODS = [
    "status",
    "log",
    "is_finished",
    "schedule",
    "farewell",
    "take_down",
    "bring_up",
    "cut_link",
    "restore_link",
]


@pytest.mark.parametrize("world", [Engine, LiveWorld])
def test_every_world_implements_the_whole_interface(world: type[WorldState]) -> None:
    assert issubclass(world, WorldState)
    missing = [name for name in METHODS if getattr(world, name) is getattr(World, name)]
    assert missing == [], f"{world.__name__} leaves {missing} to the protocol's stubs"


class RecordingShard:
    """A shard handle that only records the commands a live world sends it."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes
        self.commands: list[tuple[str, int, int | None]] = []

    def command(self, name: str, node: int, peer: int | None = None) -> None:
        self.commands.append((name, node, peer))


def test_one_timeline_drives_the_live_world_through_shard_commands() -> None:
    document = small_document(disruptions=[*TIMELINE, {"kind": "crash", "nodes": [2], "round": 1}])
    scenario = parse_scenario(document)
    population = build_population(scenario)
    recorder = MetricsRecorder(num_nodes=8, evaluate=lambda vectors: (vectors[:, 0], vectors[:, 0]))
    shard = RecordingShard(list(range(8)))
    owners: dict[int, Any] = dict.fromkeys(range(8), shard)
    timeline = Disruptions(scenario.disruptions, population, seed=scenario.seed)
    world = LiveWorld(population, recorder, owners, disruptions=timeline)
    timeline.start(world)
    world.now = 0.5
    world.fire_due()
    assert shard.commands == [("cut", 0, 1), ("cut", 1, 0), ("leave", 5, None)]
    assert world.status[5] is OFFLINE and not world.network.link_up(0, 1)
    world.now = 2.0
    world.fire_due()
    assert shard.commands[3:] == [("stop", 7, None), ("join", 5, None), ("restore", 0, 1),
                                  ("restore", 1, 0)]  # fmt: skip
    assert (world.status[5], world.status[7]) == (ONLINE, DEAD)
    assert not world.pending()
    # a round trigger fires when a node's record of that round comes in
    world.record(
        {
            "node": 3,
            "round": 0,
            "time": 2.1,
            "loss": 0.5,
            "vector": bytes(16),
            "traffic": [0, 0, 0, 0, 0],
        }  # fmt: skip
    )
    world.fire_due()
    assert shard.commands[-1] == ("stop", 2, None) and world.status[2] is DEAD
    assert world.completed_rounds[3] == 1
    fired = [entry["index"] for entry in world.events_log if entry["event"] == "disruption"]
    assert fired == [0, 1, 2, 3, 4, 5]


def test_the_engine_runs_the_same_timeline_in_virtual_time() -> None:
    document = small_document(
        rounds=4,
        disruptions=[
            {"kind": "cut", "links": [[0, 1]], "at": 0.0},
            {"kind": "leave", "nodes": [5], "round": 1},
        ],
    )
    engine = build_engine(parse_scenario(document))
    assert isinstance(engine.disruptions, Disruptions)  # handed over when it was built
    engine.run()
    fired = [entry for entry in engine.events_log if entry.get("event") == "disruption"]
    assert [(entry["kind"], entry["time"] == 0.0) for entry in fired] == [
        ("cut", True),
        ("leave", False),
    ]
    assert engine.status[5] is OFFLINE and not engine.network.link_up(0, 1)
