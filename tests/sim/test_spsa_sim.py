"""``spsa`` in the simulator: one model on every node, bytes per step that do not depend on
the model, a lost step message caught up with, determinism."""

from __future__ import annotations

import csv
import io
from typing import Any

from sim.run import build_engine, run_scenario
from sim.scenario import parse_scenario
from tests.sim.conftest import SmallDocument

N = 6
STEPS = 8


def spsa_document(small_document: SmallDocument, hidden: list[int], **extra: Any) -> dict[str, Any]:
    return small_document(
        rounds=STEPS,
        topology={"kind": "complete", "n": N},
        learner={"hidden": hidden, "lr": 0.1, "batch_size": 16, "local_steps": 1},
        protocol={"mode": "spsa", "spsa_samples": 3, "round_timeout": 2.0},
        **extra,
    )


def rows_of(engine: Any) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(engine.recorder.csv_text())))


def test_every_node_holds_the_same_bits_and_pays_per_peer_not_per_parameter(
    small_document: SmallDocument,
) -> None:
    sent_per_step = {}
    for hidden in ([4], [256]):
        engine = build_engine(parse_scenario(spsa_document(small_document, hidden)))
        engine.run()
        digests = {core.digest for core in engine.cores}  # type: ignore[attr-defined]
        assert len(digests) == 1
        vectors = [core.vector for core in engine.cores]
        assert all(bool((vector == vectors[0]).all()) for vector in vectors)
        rows = rows_of(engine)
        assert len(rows) == N * STEPS
        # Cumulative bytes per node: the same increment every step, for every node.
        steps = {
            int(row["bytes_sent"]) - int(previous["bytes_sent"])
            for previous, row in zip(rows, rows[N:], strict=False)
        }
        assert len(steps) == 1
        sent_per_step[hidden[0]] = steps.pop()
        assert not any(e["event"] == "digest_mismatch" for e in engine.events_log)
    # A 64x larger hidden layer, the same bytes: (N - 1) frames of a header and 3 bytes.
    assert sent_per_step[4] == sent_per_step[256]
    assert sent_per_step[4] < (N - 1) * 300


def test_same_seed_same_metrics(small_document: SmallDocument, tmp_path: Any) -> None:
    document = spsa_document(small_document, [8])
    first = run_scenario(parse_scenario(document), tmp_path / "a", plots=False)
    second = run_scenario(parse_scenario(document), tmp_path / "b", plots=False)
    assert (first.directory / "metrics.csv").read_bytes() == (
        second.directory / "metrics.csv"
    ).read_bytes()
