"""The shipped MNIST-1D scenarios (docs/experiments.md): what they promise, and tiny runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sim.cli import main
from sim.scenario import parse_scenario, read_document

pytest.importorskip("mnist1d", reason="the [data] extra")

# A few nodes, rounds and examples: the shipped set-up otherwise, so the run path is the same.
TINY = [
    "--set",
    "topology.n=8",
    "--set",
    "rounds=2",
    "--set",
    "data.params.n_samples=600",
    "--set",
    "data.test_fraction=0.2",
    "--set",
    "learner.local_steps=2",
]


def test_mnist1d_cnn_is_the_promised_workload() -> None:
    document, source = read_document("mnist1d-cnn")
    scenario = parse_scenario(document, source=source)
    assert scenario.topology.model_extra is not None
    assert scenario.topology.model_extra["n"] >= 256
    assert scenario.data.dataset == "mnist1d"
    assert scenario.data.partition == "dirichlet"
    assert scenario.learner.model == "cnn1d"
    assert scenario.learner.optimizer == "sgd"
    assert scenario.learner.momentum > 0
    # every node has a reasonable share of the training set
    train = scenario.data.params["n_samples"] * (1 - scenario.data.test_fraction)
    assert train / scenario.topology.model_extra["n"] >= 100


@pytest.mark.parametrize(
    ("scenario", "extra", "model"),
    [
        ("mnist1d-cnn", [], "cnn1d"),
        ("mnist1d-cnn", ["--set", "learner.model=mlp", "--set", "learner.model_params={}"], "mlp"),
        ("disaster-mnist1d", ["--set", "disruptions[0].round=1"], "cnn1d"),
    ],
)
def test_tiny_override_runs_what_it_says_and_prints_its_summary(
    scenario: str,
    extra: list[str],
    model: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "run"
    assert main(["run", scenario, *TINY, *extra, "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert "mean_test_accuracy" in printed
    assert summary["scenario"] == scenario
    # the overrides are what ran: 8 nodes, 2 rounds of 2 steps, the model asked for
    ran, _ = read_document(str(out / "scenario.toml"))
    resolved = parse_scenario(ran)
    assert (summary["nodes"], summary["rounds"]) == (8, 2)
    assert (resolved.learner.local_steps, resolved.learner.model) == (2, model)
    rows = (out / "metrics.csv").read_text().splitlines()[1:]
    assert sorted({row.split(",")[0] for row in rows}) == ["0", "1"]
    if resolved.disruptions:  # moved to round 1: it fired once the first node got there
        events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
        fired = [event for event in events if event.get("event") == "disruption"]
        assert [event["index"] for event in fired] == [0] and fired[0]["nodes"]
        assert summary["unfired_disruptions"] == []
        assert summary["alive_nodes"] == 8 - len(fired[0]["nodes"])
