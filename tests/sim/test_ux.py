"""What a researcher sees: `validate`, titles with overrides, the progress line, TensorBoard
scalars, and the Python API of the README."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pytest
from rich.console import Console

from sim.cli import human_bytes, last_accuracy, main, run_progress, shown
from sim.live import LocalShard, assign, run_live
from sim.metrics import COLUMNS, RoundSummary
from sim.plots import draw, read_run
from sim.run import NodeRound, load_scenario, run_scenario
from sim.scenario import parse_scenario, read_document, to_toml
from tests.sim.conftest import _small_document

SmallDocument = Callable[..., dict[str, Any]]
README = Path(__file__).resolve().parents[2] / "README.md"


def _mine_toml(**overrides: Any) -> str:
    """A small scenario as a user's own file would hold it (8 nodes, 3 rounds)."""
    document = _small_document(name="mine", description="a scenario of the user's own")
    return to_toml(parse_scenario({**document, **overrides}))


SMALL_TOML = _mine_toml()


@pytest.fixture
def mine(tmp_path: Path) -> Path:
    """A small scenario file of the user's own."""
    path = tmp_path / "mine.toml"
    path.write_text(SMALL_TOML)
    return path


# -- validate ------------------------------------------------------------------------------


def test_validate_prints_the_resolved_scenario_a_run_would_use(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["validate", "default", "--set", "learner.lr=0.05", "--seed", "7"]) == 0
    printed = capsys.readouterr().out
    scenario, changed = load_scenario("default", ["learner.lr=0.05"], seed=7)
    assert printed == to_toml(scenario)
    resolved = tomllib.loads(printed)
    assert resolved["learner"]["lr"] == 0.05 and resolved["seed"] == 7
    assert resolved["protocol"]["mode"] == "dsgd"  # defaults written out
    assert changed == {"seed": 7, "learner.lr": 0.05}


def test_validate_refuses_a_bad_value_in_one_line_and_exit_2(
    mine: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["validate", str(mine), "--set", "topology.n=-3"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "ring: n = -3" in captured.err  # as `run` says
    mine.write_text(SMALL_TOML.replace('description = "', 'description = "two\\nlines'))
    assert main(["validate", str(mine)]) == 2
    assert "description" in capsys.readouterr().err


def test_validate_warns_when_this_machine_could_not_run_it(
    mine: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # too many nodes to build the graph here: kind and types are checked, memory is a warning
    assert main(["validate", str(mine), "--set", "topology.n=30000000"]) == 0
    captured = capsys.readouterr()
    assert tomllib.loads(captured.out)["topology"]["n"] == 30_000_000
    assert "warning: on this machine `run` refuses it" in captured.err
    assert main(["validate", str(mine), "--set", "topology.n=3e7"]) == 2
    assert "must be of type int" in capsys.readouterr().err


# -- titles ------------------------------------------------------------------------------


def test_a_run_of_your_own_file_with_overrides_is_titled_with_them(
    mine: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    args = ["run", str(mine), "--set", "learner.lr=0.2", "--seed", "9", "--out", str(out)]
    assert main([*args, "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["overrides"] == {"seed": 9, "learner.lr": 0.2}
    printed = capsys.readouterr().out
    assert "mine [learner.lr=0.2, seed=9]" in printed.replace("\n", " ")  # the table's title
    svg = (out / "accuracy.svg").read_text()
    assert "mine: test accuracy" in svg and "[learner.lr=0.2, seed=9]" in svg
    # redrawing reads them back from summary.json
    (out / "accuracy.svg").unlink()
    assert main(["plot", str(out), "--x", "rounds"]) == 0
    assert "[learner.lr=0.2, seed=9]" in (out / "accuracy.svg").read_text()


def test_a_run_without_overrides_keeps_its_name_as_title(mine: Path, tmp_path: Path) -> None:
    result = run_scenario(mine, tmp_path / "run", plots=False)
    assert result.summary["overrides"] == {}
    fig = draw(read_run(tmp_path / "run"), "accuracy")
    assert fig.axes[0].get_title() == "mine: test accuracy"
    plt.close(fig)


# -- the progress line ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "text"),
    [(0, "0 B"), (999, "999 B"), (1000, "1 kB"), (35_412_480, "35.4 MB"), (2.5e9, "2.5 GB")],
)
def test_bytes_are_shown_in_si_units(count: float, text: str) -> None:
    assert human_bytes(count) == text


def _round(index: int, accuracy: float) -> RoundSummary:
    return RoundSummary(index, 4, accuracy, accuracy, accuracy, 0.1, float(index))


def test_progress_shows_the_last_evaluated_accuracy_never_nan() -> None:
    assert last_accuracy([]) == "—"
    assert last_accuracy([_round(0, math.nan)]) == "—"
    evaluated = [_round(0, math.nan), _round(1, 0.5), _round(2, math.nan), _round(3, math.nan)]
    assert last_accuracy(evaluated) == "0.500"


def test_cli_progress_with_eval_every_shows_no_nan(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text(_mine_toml(metrics={"eval_every": 2}))
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=200)
    assert main(["run", str(path), "--out", str(tmp_path / "run")], console=console) == 0
    text = screen.getvalue()
    assert "acc=—" in text and "acc=0." in text and "nan" not in text
    assert re.search(r"sent=\d+(\.\d+)? kB", text) and "eta" in text


def test_a_setup_error_erases_the_progress_bar() -> None:
    file = io.StringIO()
    console = Console(file=file, force_terminal=True, width=120)
    progress = run_progress(console, quiet=False)
    progress.add_task("doomed", total=3, vtime=0.0, accuracy="—", sent="0 B")
    with pytest.raises(RuntimeError), shown(progress):
        raise RuntimeError("a setup error")
    # the bar was drawn, then the cursor went back up and the line was erased: nothing of
    # it is left for the error line to follow
    output = file.getvalue()
    assert "doomed" in output
    assert output.rstrip("\n").endswith("\x1b[2K")
    ok = io.StringIO()
    kept = run_progress(Console(file=ok, force_terminal=True, width=120), quiet=False)
    kept.add_task("fine", total=3, vtime=0.0, accuracy="—", sent="0 B")
    with shown(kept):
        pass
    assert "fine" in ok.getvalue().rsplit("\x1b[2K", 1)[-1]  # a finished bar stays


# -- TensorBoard ---------------------------------------------------------------------------


def test_tensorboard_scalars_per_round(mine: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = tmp_path / "tb"
    out = tmp_path / "run"
    assert main(["run", str(mine), "--out", str(out), "--tensorboard", str(logdir), "--quiet"]) == 0
    events = EventAccumulator(str(logdir))
    events.Reload()
    accuracy = [(event.step, event.value) for event in events.Scalars("accuracy/mean")]
    rows = [row.split(",") for row in (out / "metrics.csv").read_text().splitlines()[1:]]
    expected = {
        int(round_): sum(float(r[6]) for r in rows if r[0] == round_)
        / sum(1 for r in rows if r[0] == round_)
        for round_ in {r[0] for r in rows}
    }
    assert [step for step, _ in accuracy] == [0, 1, 2]
    for step, value in accuracy:
        assert value == pytest.approx(expected[step], abs=1e-6)
    assert {"consensus_distance", "traffic/megabytes_sent", "virtual_time"} <= set(
        events.Tags()["scalars"]
    )


def test_tensorboard_missing_is_one_line_naming_the_extra(
    mine: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    out = tmp_path / "run"
    code = main(["run", str(mine), "--out", str(out), "--tensorboard", str(tmp_path / "tb")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "p2pfl-gossip[tensorboard]" in err
    assert not out.exists()  # refused before the run started


# -- the Python API ------------------------------------------------------------------------


def _readme_block(heading: str) -> str:
    text = README.read_text()
    section = text.split(f"### {heading}\n", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_python_api_example_runs_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(_readme_block("Python API"), "README.md", "exec"), {})
    lines = printed.getvalue().splitlines()
    assert [line.split()[0] for line in lines[:5]] == ["0", "1", "2", "3", "4"]
    assert lines[5].endswith("{'seed': 3, 'rounds': 5, 'topology.n': 12}")
    assert lines[6].startswith("12 nodes; sent ")
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_in_memory_rows_are_the_metrics_csv_of_the_same_run(
    small_document: SmallDocument, tmp_path: Path
) -> None:
    assert NodeRound._fields == COLUMNS
    scenario = parse_scenario(small_document(rounds=3))
    memory = run_scenario(scenario)
    written = run_scenario(scenario, tmp_path / "run", plots=False)
    assert memory.directory is None and written.directory == tmp_path / "run"
    lines = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:]
    as_csv = [
        ",".join(repr(value) if isinstance(value, float) else str(value) for value in row)
        for row in memory.rows
    ]
    assert as_csv == lines
    assert [summary.round for summary in memory.rounds] == [0, 1, 2]
    assert memory.rounds == written.rounds
    assert memory.summary["mean_test_accuracy"] == written.summary["mean_test_accuracy"]


def test_overrides_through_the_api_are_validated(small_document: SmallDocument) -> None:
    from p2pfl.errors import ConfigError

    with pytest.raises(ConfigError, match="learner.lr"):
        run_scenario(parse_scenario(small_document()), overrides=["learner.lr=-1"])
    document, source = read_document("default")
    scenario, changed = load_scenario(parse_scenario(document, source=source), ["rounds=2"])
    assert scenario.rounds == 2 and changed == {"rounds": 2}


# -- live progress -------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_live_mode_reports_its_phases_while_shards_start(
    small_document: SmallDocument, tmp_path: Path
) -> None:
    document = small_document(rounds=2, horizon=60.0)
    document["protocol"] = {"mode": "dsgd", "round_timeout": 10.0}
    scenario = parse_scenario(document)
    phases: list[str] = []
    handles = [LocalShard(scenario, block) for block in assign(8, 2)]
    run_live(scenario, tmp_path / "live", handles=handles, plots=False, on_phase=phases.append)
    assert phases[-3:] == [
        "binding shard 2/2 (loads its data)",
        "starting 8 nodes",
        "running",
    ]
    assert "binding shard 1/2 (loads its data)" in phases
    assert any("partitioning" in phase for phase in phases)  # the population's own phases
