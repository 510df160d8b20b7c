"""Plots, `p2pfl-sim plot` / `compare` / `sweep`, and the link model."""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sim.cli import main
from sim.network import LinkModel
from sim.plots import PLOT_NAMES
from sim.run import run_scenario
from sim.scenario import NetworkSpec, parse_scenario
from sim.sweep import MetricStats

SmallDocument = Callable[..., dict[str, Any]]

TINY = """\
name = "tiny"
seed = 3
rounds = 2
[topology]
kind = "ring"
n = 5
[data]
dataset = "gaussian_mixture"
params = { n_samples = 200, dim = 4, num_classes = 2 }
partition = "iid"
partition_params = {}
[learner]
hidden = [4]
local_steps = 1
[[disruptions]]
kind = "crash"
round = 1
count = 1
"""


def plot_files(directory: Path) -> set[str]:
    return {f"{name}.{ext}" for name in PLOT_NAMES for ext in ("png", "svg")} & {
        path.name for path in directory.iterdir()
    }


def test_every_run_draws_its_plots_and_plot_redraws_them(
    small_document: SmallDocument, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    document = small_document(
        rounds=4,
        disruptions=[
            {"kind": "partition", "round": 1, "groups": [[0, 1, 2, 3]]},
            {"kind": "crash", "round": 2, "nodes": [6]},
        ],
    )
    run = run_scenario(parse_scenario(document), tmp_path / "run").directory
    expected = {f"{name}.{ext}" for name in PLOT_NAMES for ext in ("png", "svg")}
    assert plot_files(run) == expected
    assert {"events.jsonl", "nodes.csv", "edges.csv"} <= {p.name for p in run.iterdir()}
    svg = (run / "accuracy.svg").read_text()
    assert "small" in svg and "virtual time (s)" in svg  # title names the scenario; units
    for name in expected:
        (run / name).unlink()
    assert main(["plot", str(run), "--at", "0.1"]) == 0
    assert plot_files(run) == expected
    assert main(["compare", str(run), str(run), "--out", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 1000
    assert main(["plot", str(tmp_path)]) == 2
    assert "metrics.csv" in capsys.readouterr().err


def test_a_2x3_sweep_with_2_seeds_writes_its_table_and_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(TINY)
    out = tmp_path / "sweep"
    code = main(
        [
            "sweep",
            str(scenario),
            "--grid",
            "disruptions[0].count=1,2",
            "--grid",
            "learner.lr=0.05,0.1,0.2",
            "--seeds",
            "2",
            "--jobs",
            "2",
            "--set",
            "learner.batch_size=16",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    with (out / "sweep.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12
    assert {(r["disruptions[0].count"], r["learner.lr"], r["seed"]) for r in rows} == {
        (count, lr, seed)
        for count in ("1", "2")
        for lr in ("0.05", "0.1", "0.2")
        for seed in ("3", "4")
    }
    assert {r["alive_nodes"] for r in rows} == {"4", "3"}
    assert all(r["final_accuracy_alive"] for r in rows)
    assert (out / "sweep.png").stat().st_size > 1000 and (out / "sweep.svg").exists()
    assert (out / "run-011" / "metrics.csv").exists()
    first = json.loads((out / "run-000" / "summary.json").read_text())
    assert first["overrides"] == {
        "learner.batch_size": 16,
        "disruptions[0].count": 1,
        "learner.lr": 0.05,
        "seed": 3,
    }
    # one row per grid point: mean and sample std over its two seeds, printed and written
    with (out / "sweep-summary.csv").open() as handle:
        points = list(csv.DictReader(handle))
    assert len(points) == 6 and all(point["seeds"] == "2" for point in points)
    printed = capsys.readouterr().out
    markdown = (out / "sweep-summary.md").read_text()
    for point in points:
        values = [
            float(row["final_accuracy_alive"])
            for row in rows
            if (row["disruptions[0].count"], row["learner.lr"])
            == (point["disruptions[0].count"], point["learner.lr"])
        ]
        assert len(values) == 2 and point["final_accuracy_alive_n"] == "2"
        assert float(point["final_accuracy_alive_mean"]) == pytest.approx(statistics.mean(values))
        assert float(point["final_accuracy_alive_std"]) == pytest.approx(statistics.stdev(values))
        shown = MetricStats(statistics.mean(values), statistics.stdev(values), 2).text()
        assert shown in markdown
        assert shown in printed


def test_bad_grid_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(TINY)
    assert main(["sweep", str(scenario), "--grid", "learner.lr=-1,0.1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "learner.lr" in err


def test_bandwidth_serialises_back_to_back_frames() -> None:
    links = LinkModel(NetworkSpec(bandwidth=1000.0), seed=1)
    first = links.transmit(0, 1, 1000, now=0.0)
    second = links.transmit(0, 1, 1000, now=0.0)
    other = links.transmit(0, 2, 500, now=0.0)
    assert first == pytest.approx(1.0 + 0.05)
    assert second == pytest.approx(2.0 + 0.05)
    assert other == pytest.approx(0.5 + 0.05)  # another link does not queue behind them
    later = links.transmit(0, 1, 1000, now=10.0)
    assert later == pytest.approx(11.05)


def test_jitter_never_reorders_a_link_and_loss_drops_about_p() -> None:
    spec = NetworkSpec.model_validate(
        {"latency": {"dist": "uniform", "low": 0.0, "high": 0.1}, "jitter": 0.05, "loss": 0.2}
    )
    links = LinkModel(spec, seed=3)
    arrivals = [links.transmit(0, 1, 100, now=i * 0.001) for i in range(3000)]
    delivered = [t for t in arrivals if t is not None]
    assert delivered == sorted(delivered)
    assert 0.17 < 1 - len(delivered) / len(arrivals) < 0.23
    again = LinkModel(spec, seed=3)
    assert [again.transmit(0, 1, 100, now=i * 0.001) for i in range(3000)] == arrivals
