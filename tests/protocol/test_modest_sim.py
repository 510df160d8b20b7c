"""A 20-node ``modest`` simulation through the simulator: rounds complete and it learns."""

from __future__ import annotations

from sim.run import build_engine
from sim.scenario import apply_overrides, parse_scenario, read_document


def test_twenty_node_modest_simulation_learns() -> None:
    document, _ = read_document("modest-20")
    scenario = parse_scenario(apply_overrides(document, ["rounds=25"]))
    engine = build_engine(scenario)
    engine.run()
    rounds = engine.recorder.rounds
    assert [summary.round for summary in rounds] == list(range(25))
    # only the sampled nodes report a round: the trainers that adopted its aggregate
    assert all(1 <= summary.nodes <= scenario.protocol.sample_size for summary in rounds)
    first, last = rounds[0].mean_test_accuracy, rounds[-1].mean_test_accuracy
    assert last > 0.8 and last > first + 0.3, (first, last)
    assert sum(traffic.rejected for traffic in engine.traffic) == 0
