"""sim.experiments.disaster: the report's numbers come from the sweeps' tables."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from sim.experiments.disaster import FRACTION, main

COLUMNS = ["final_accuracy_alive", "largest_component_accuracy", "isolated_accuracy"]
SHAPE = ["largest_component_size", "isolated_nodes", "components"]


def _sweep(directory: Path, keys: list[str], rows: list[list[str]]) -> Path:
    directory.mkdir()
    with (directory / "sweep.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["run", *keys, "seed", *COLUMNS, *SHAPE])
        writer.writerows([[str(i), *row] for i, row in enumerate(rows)])
    return directory


def test_report_averages_seeds_per_grid_point_and_draws_the_figure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = [FRACTION, "disruptions[0].among", "disruptions[0].choose"]
    sweep = _sweep(
        tmp_path / "sweep",
        keys,
        [
            ["0.3", "data", "degree", "1", "0.6", "0.7", "0.5", "30", "2", "4"],
            ["0.3", "data", "degree", "2", "0.8", "0.9", "", "32", "0", "2"],
            ["0.3", "relays", "random", "1", "0.9", "0.9", "", "40", "0", "1"],
        ],
    )
    baseline = _sweep(
        tmp_path / "base",
        [FRACTION],
        [
            ["0.1", "1", "0.85", "0.85", "", "60", "0", "1"],
            ["0.1", "2", "0.95", "0.95", "", "60", "0", "1"],
        ],
    )
    figure = tmp_path / "fig.png"
    assert main(["report", str(sweep), "--baseline", str(baseline), "--figure", str(figure)]) == 0
    printed = capsys.readouterr().out
    assert "No removal: 0.900 ± 0.071 (2 seeds)." in printed
    # two seeds: mean 0.7, sample std 0.141; the run without isolated nodes is left out
    assert (
        "| 30% | data | degree | 0.700 ± 0.141 | 0.800 ± 0.141 (31.0) | 0.500 (1.0) | 3.0 |"
        in printed
    )
    assert "| 30% | relays | random | 0.900 | 0.900 (40.0) | – (0.0) | 1.0 |" in printed
    assert figure.read_bytes().startswith(b"\x89PNG")
