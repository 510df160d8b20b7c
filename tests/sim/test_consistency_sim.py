"""DFedSAM-MGS in the simulator: more gossip steps per round, smaller consensus distance."""

from __future__ import annotations

from sim.run import build_engine
from sim.scenario import parse_scenario
from tests.sim.conftest import SmallDocument


def _final(
    small_document: SmallDocument, learner: dict[str, object], steps: int
) -> tuple[float, float, int]:
    document = small_document(
        rounds=4,
        learner={"hidden": [8], "lr": 0.1, "batch_size": 16, "local_steps": 3, **learner},
        protocol={"mode": "dsgd", "gossip_steps": steps},
    )
    engine = build_engine(parse_scenario(document))
    engine.run()
    last = engine.recorder.rounds[-1]
    sent = sum(traffic.messages_sent for traffic in engine.traffic)
    return last.consensus_distance, last.mean_test_accuracy, sent


def test_gossip_steps_shrink_the_consensus_distance(small_document: SmallDocument) -> None:
    plain, _, sent = _final(small_document, {}, 1)
    two, _, sent_two = _final(small_document, {}, 2)
    four, _, sent_four = _final(small_document, {}, 4)
    assert four < two < plain
    # a ring of 8: every node sends to 2 neighbours per exchange, Q exchanges per round
    assert (sent, sent_two, sent_four) == (8 * 2 * 4, 8 * 2 * 4 * 2, 8 * 2 * 4 * 4)


def test_sam_runs_batched_and_reproducibly(small_document: SmallDocument) -> None:
    sam = _final(small_document, {"optimizer": "sam", "rho": 0.05}, 2)
    assert sam == _final(small_document, {"optimizer": "sam", "rho": 0.05}, 2)
    assert sam != _final(small_document, {}, 2)
