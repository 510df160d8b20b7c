"""A simulation run: its directory, its determinism, its CLI."""

from __future__ import annotations

import csv
import io
import json
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from p2pfl.errors import ConfigError
from sim.cli import main
from sim.run import build_engine, run_scenario
from sim.scenario import Scenario, parse_scenario, read_document, shipped_scenarios

SmallDocument = Callable[..., dict[str, Any]]


def test_run_directory_holds_scenario_metrics_and_summary(
    small_scenario: Scenario, tmp_path: Path
) -> None:
    result = run_scenario(small_scenario, tmp_path / "run")
    files = {path.name for path in result.directory.iterdir()}
    assert {"scenario.toml", "metrics.csv", "summary.json"} <= files
    rows = (result.directory / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 8 * 3
    summary = json.loads((result.directory / "summary.json").read_text())
    for key in ("nodes", "rounds", "mean_test_accuracy", "virtual_seconds", "wall_seconds", "seed"):
        assert key in summary
    assert summary["nodes"] == 8 and summary["rounds"] == 3 and summary["seed"] == 5
    resolved, _ = read_document(str(result.directory / "scenario.toml"))
    assert parse_scenario(resolved) == small_scenario


def test_same_seed_gives_identical_metrics_bytes_and_another_seed_differs(
    small_document: SmallDocument, tmp_path: Path
) -> None:
    first = run_scenario(parse_scenario(small_document()), tmp_path / "a", plots=False)
    second = run_scenario(parse_scenario(small_document()), tmp_path / "b", plots=False)
    other = run_scenario(parse_scenario(small_document(seed=6)), tmp_path / "c", plots=False)
    metrics = [(run.directory / "metrics.csv").read_bytes() for run in (first, second, other)]
    assert metrics[0] == metrics[1]
    assert metrics[0] != metrics[2]


def test_gossip_mode_runs_its_rounds(small_document: SmallDocument) -> None:
    document = small_document(protocol={"mode": "gossip", "period": 0.1, "fanout": 2})
    engine = build_engine(parse_scenario(document))
    engine.link_log = []
    engine.run()
    rows = list(csv.DictReader(io.StringIO(engine.recorder.csv_text())))
    # every node records each of its three rounds, one after the other in its own time
    for node in range(8):
        mine = [row for row in rows if row["node"] == str(node)]
        assert [row["round"] for row in mine] == ["0", "1", "2"]
        times = [float(row["virtual_time"]) for row in mine]
        assert times == sorted(times) and times[0] < times[-1]
    # pushes are gossip: each goes to fanout=2 ring neighbours at one instant, and every
    # node both pushed and received a neighbour's model
    pushes: dict[tuple[int, float], set[int]] = {}
    for at, src, dst, _size in engine.link_log:
        assert (src - dst) % 8 in (1, 7), f"{src}->{dst} is not a ring link"
        pushes.setdefault((src, at), set()).add(dst)
    assert all(targets == {(src - 1) % 8, (src + 1) % 8} for (src, _), targets in pushes.items())
    assert {src for src, _ in pushes} == set(range(8))
    assert {dst for _, _, dst, _ in engine.link_log} == set(range(8))


def test_training_improves_accuracy(small_document: SmallDocument, tmp_path: Path) -> None:
    before = run_scenario(parse_scenario(small_document(rounds=1)), tmp_path / "one", plots=False)
    after = run_scenario(parse_scenario(small_document(rounds=8)), tmp_path / "eight", plots=False)
    assert after.summary["mean_test_accuracy"] > before.summary["mean_test_accuracy"] + 0.05


def test_cli_scenarios_lists_each_with_its_description_the_default_first(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["scenarios"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == shipped_scenarios()
    assert lines[0].split()[0] == "default"
    for line, name in zip(lines, shipped_scenarios(), strict=True):
        document, source = read_document(name)
        description = parse_scenario(document, source=source).description
        assert description, f"{name}.toml has no description"
        assert line.split(None, 1)[1] == description


def test_cli_bad_override_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "default", "--set", "learner.lr=-1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "learner.lr" in err


def test_cli_run_with_overrides_writes_run_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "small.toml"
    path.write_text(
        "\n".join(
            [
                'name = "cli"',
                "rounds = 2",
                "[topology]",
                'kind = "ring"',
                "n = 6",
                "[data]",
                'dataset = "gaussian_mixture"',
                "params = { n_samples = 300, dim = 6, num_classes = 3 }",
                'partition = "iid"',
                "partition_params = {}",
            ]
        )
    )
    out = tmp_path / "run"
    code = main(
        [
            "run",
            str(path),
            "--set",
            "learner.local_steps=2",
            "--seed",
            "9",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seed"] == 9 and summary["nodes"] == 6
    assert "mean_test_accuracy" in capsys.readouterr().out
    # the run is the file with the overrides applied, and its directory says so
    resolved, _ = read_document(str(out / "scenario.toml"))
    ran = parse_scenario(resolved)
    assert (ran.seed, ran.learner.local_steps, ran.rounds) == (9, 2, 2)
    assert parse_scenario(resolved) == parse_scenario(
        {**tomllib.loads(path.read_text()), "seed": 9, "learner": {"local_steps": 2}}
    )


def _metric_columns(path: Path) -> dict[str, list[str]]:
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    return {name: [line.split(",")[i] for line in lines[1:]] for i, name in enumerate(header)}


def test_eval_every_and_eval_samples_thin_the_evaluation_only(
    small_document: SmallDocument, tmp_path: Path
) -> None:
    document = small_document(rounds=5)
    full = run_scenario(parse_scenario(document), tmp_path / "full", plots=False)
    thin_document = {**document, "metrics": {"eval_every": 2}}
    thin = run_scenario(parse_scenario(thin_document), tmp_path / "thin", plots=False)
    few_document = {**document, "metrics": {"eval_samples": 7}}
    few = run_scenario(parse_scenario(few_document), tmp_path / "few", plots=False)
    full_columns, thin_columns, few_columns = (
        _metric_columns(run.directory / "metrics.csv") for run in (full, thin, few)
    )
    # Rounds 1 and 3 (every 2nd) and the last (4) are evaluated, as in the full run; the
    # others' evaluation columns are empty; nothing else changes.
    for name, values in full_columns.items():
        for row, value in enumerate(values):
            skipped = int(full_columns["round"][row]) in (0, 2)
            if name in ("test_loss", "test_accuracy") and skipped:
                assert thin_columns[name][row] == "nan"
            else:
                assert thin_columns[name][row] == value, name
    assert thin.summary["mean_test_accuracy"] == full.summary["mean_test_accuracy"]
    # Seven test examples: accuracies are multiples of 1/7, training is unchanged.
    assert few_columns["train_loss"] == full_columns["train_loss"]
    assert few_columns["test_accuracy"] != full_columns["test_accuracy"]
    for value in few_columns["test_accuracy"]:
        assert abs(float(value) * 7 - round(float(value) * 7)) < 1e-5


@pytest.mark.parametrize(("key", "value"), [("eval_every", 0), ("eval_samples", 0)])
def test_bad_metrics_keys_are_named(small_document: SmallDocument, key: str, value: int) -> None:
    with pytest.raises(ConfigError, match=f"metrics.{key}"):
        parse_scenario(small_document(metrics={key: value}))


def test_worker_threads_change_no_metric_byte(small_document: SmallDocument) -> None:
    # Rounds evaluated in a worker thread or in the loop's thread:
    # the same bytes, late rows of a node that was offline included.
    document = small_document(
        rounds=5,
        disruptions=[
            {"kind": "leave", "at": 0.05, "nodes": [2]},
            {"kind": "join", "at": 3.0, "nodes": [2]},
        ],
    )
    texts = []
    for workers in (True, False):
        engine = build_engine(parse_scenario(document))
        engine.workers = workers
        engine.run()
        texts.append(engine.recorder.csv_text())
    assert texts[0] == texts[1]
    rows = list(csv.DictReader(io.StringIO(texts[0])))
    late = [row for row in rows if row["node"] == "2" and row["distance_to_mean"] == "nan"]
    assert late, "node 2 caught up after its rounds completed: late rows"
