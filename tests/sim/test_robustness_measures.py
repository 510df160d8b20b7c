"""The measures of the robustness and Sybil experiments (issue 12, defect 8).

``protected_accuracy`` averages the honest nodes of which less than one third of the
neighbours are Byzantine; the experiment reports give every cell as mean ± std over seeds.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sim.experiments import robustness, sybil
from sim.run import run_scenario
from sim.scenario import parse_scenario
from sim.sweep import SUMMARY_COLUMNS

SmallDocument = Callable[..., dict[str, Any]]


def test_protected_accuracy_is_over_honest_nodes_with_under_a_third_byzantine_neighbours(
    small_document: SmallDocument, tmp_path: Path
) -> None:
    # Ring of 8, Byzantine 0 and 1: node 7 has neighbours 6 and 0 (1 of 2 Byzantine), node 2
    # has 1 and 3 (1 of 2); nodes 3..6 have none. A third of 2 is below 1: so 3, 4, 5, 6.
    document = small_document(rounds=2, adversaries=[{"attack": "sign_flip", "nodes": [0, 1]}])
    result = run_scenario(parse_scenario(document), tmp_path / "run", plots=False)
    summary = result.summary
    assert summary["protected_nodes"] == 4
    with (tmp_path / "run" / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    last = {int(row["node"]): float(row["test_accuracy"]) for row in rows}
    expected = sum(last[node] for node in (3, 4, 5, 6)) / 4
    assert summary["protected_accuracy"] == pytest.approx(expected)
    honest = sum(last[node] for node in range(2, 8)) / 6
    assert summary["final_accuracy_alive"] == pytest.approx(honest)
    assert "protected_accuracy" in SUMMARY_COLUMNS and "protected_nodes" in SUMMARY_COLUMNS


def test_without_attackers_every_honest_node_is_protected(
    small_document: SmallDocument, tmp_path: Path
) -> None:
    summary = run_scenario(parse_scenario(small_document(rounds=1)), tmp_path / "r", plots=False)
    assert summary.summary["protected_nodes"] == 8
    assert summary.summary["protected_accuracy"] == pytest.approx(
        summary.summary["final_accuracy_alive"]
    )


def test_mean_std_is_over_the_finite_seeds() -> None:
    mean, std = robustness.mean_std([0.8, 0.9, 1.0])
    assert mean == pytest.approx(0.9) and std == pytest.approx(0.1)
    assert robustness.mean_std([0.5, math.nan]) == (0.5, 0.0)
    assert all(math.isnan(value) for value in robustness.mean_std([]))


def _sweep_table(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_robustness_table_groups_seeds_by_cell(tmp_path: Path) -> None:
    rows = [
        {
            "merge": json.dumps({"rule": "median"}),
            "adversaries[0]": json.dumps({"attack": "alie", "fraction": 0.2}),
            "seed": str(seed),
            "mean_test_accuracy": str(value),
            "protected_accuracy": str(value + 0.05),
        }
        for seed, value in ((1, 0.8), (2, 0.7), (3, 0.9))
    ]
    _sweep_table(tmp_path / "sweep.csv", rows)
    table = robustness.read_table(tmp_path / "sweep.csv")
    assert table == {("median", "alie", 0.2): [0.8, 0.7, 0.9]}
    protected = robustness.read_table(tmp_path / "sweep.csv", "protected_accuracy")
    assert protected[("median", "alie", 0.2)] == pytest.approx([0.85, 0.75, 0.95])


def test_sybil_results_collect_every_seed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = []
    for index, (rule, sybils, seed) in enumerate(
        [("mean", 0, 1), ("mean", 0, 2), ("mean", 5, 1), ("mean", 5, 2)]
    ):
        directory = tmp_path / f"run-{index:03d}"
        directory.mkdir()
        summary = {
            "attack_success_rate": 0.1 * index,
            "mean_test_accuracy": 0.8,
            "protected_accuracy": 0.85,
            "protected_nodes": 60,
        }
        (directory / "summary.json").write_text(json.dumps(summary))
        adversary = {"attack": "none"} if sybils == 0 else {"attack": "label_flip", "sybils": 5}
        rows.append(
            {
                "merge.rule": rule,
                "adversaries[0]": json.dumps(adversary),
                "seed": str(seed),
                "directory": directory.name,
            }
        )
    _sweep_table(tmp_path / "sweep.csv", rows)
    monkeypatch.setattr(sybil, "RUNS", tmp_path)
    results = sybil.read_results()
    assert results["mean"][0]["attack_success_rate"] == pytest.approx([0.0, 0.1])
    assert results["mean"][5]["attack_success_rate"] == pytest.approx([0.2, 0.3])
    assert results["mean"][5]["protected_nodes"] == [60.0, 60.0]
