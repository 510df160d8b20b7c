"""Plots a researcher can put in a paper: labelled ticks, x by choice, legends and titles
that name what differs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.axes import Axes
from matplotlib.axis import Axis
from matplotlib.figure import Figure

from sim.cli import main
from sim.plots import (
    PLOT_NAMES,
    RunData,
    draw,
    draw_compare,
    draw_consensus,
    read_run,
)
from sim.run import run_scenario
from sim.scenario import apply_overrides, parse_scenario, read_document, to_toml

SmallDocument = Callable[..., dict[str, Any]]


def tick_labels(fig: Figure, axis: Axis) -> list[str]:
    """The tick labels a reader sees on ``axis`` (major and minor, within the view)."""
    fig.canvas.draw()
    low, high = sorted(axis.get_view_interval())
    return [
        label.get_text()
        for tick in [*axis.get_major_ticks(), *axis.get_minor_ticks()]
        for label in (tick.label1,)
        if label.get_visible() and label.get_text() and low <= tick.get_loc() <= high
    ]


def synthetic(consensus: list[float]) -> RunData:
    """Two nodes, one round per value, consensus distance as given."""
    rounds = np.repeat(np.arange(len(consensus), dtype=float), 2)
    metrics = {
        "round": rounds,
        "node": np.tile([0.0, 1.0], len(consensus)),
        "virtual_time": rounds * 0.5 + 0.25,
        "consensus_distance": np.repeat(consensus, 2),
        "test_accuracy": np.full(len(rounds), 0.5),
    }
    return RunData(Path("synthetic"), "synthetic", metrics, [], [False, False], [(0, 1)])


@pytest.mark.parametrize(
    ("values", "scale"),
    [
        ([4e-3, 1.4e-2, 1.75e-2], "linear"),  # within one decade: a log axis had no labels
        ([0.05, 0.3, 0.7], "log"),  # just over a decade: one power of ten in view
        ([1.0, 1e-2, 1e-4, 1e-6], "log"),
    ],
)
def test_consensus_axis_has_labelled_ticks_whatever_the_range(
    values: list[float], scale: str
) -> None:
    fig = draw_consensus(synthetic(values))
    ax = fig.axes[0]
    assert ax.get_yscale() == scale
    labels = tick_labels(fig, ax.yaxis)
    assert len(labels) >= 3, labels
    assert len(tick_labels(fig, ax.xaxis)) >= 3
    plt.close(fig)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.sim.conftest import _small_document

    document = _small_document(rounds=4, disruptions=[{"kind": "crash", "round": 2, "nodes": [6]}])
    out = tmp_path_factory.mktemp("plots") / "run"
    return run_scenario(parse_scenario(document), out, plots=False).directory


@pytest.mark.parametrize("x", ["seconds", "rounds"])
def test_every_axis_of_every_plot_has_readable_ticks(small_run: Path, x: str) -> None:
    run = read_run(small_run)
    for name in PLOT_NAMES:
        fig = draw(run, name, x=x)  # type: ignore[arg-type]
        if name != "topology":  # the graph drawing has no axes to read
            ax: Axes = fig.axes[0]
            assert len(tick_labels(fig, ax.xaxis)) >= 3, (name, x)
            assert len(tick_labels(fig, ax.yaxis)) >= 3, (name, x)
            assert ax.get_xlabel() == ("round" if x == "rounds" else "virtual time (s)")
            if x == "rounds":
                assert all(label.lstrip("−-").isdigit() for label in tick_labels(fig, ax.xaxis))
                assert ax.get_xlim()[1] <= 3.5  # rounds 0..3, not seconds
        plt.close(fig)


def test_cli_plot_x_rounds_puts_rounds_on_x(small_run: Path) -> None:
    assert main(["plot", str(small_run), "--x", "rounds"]) == 0
    svg = (small_run / "accuracy.svg").read_text()
    assert ">round<" in svg and "virtual time (s)" not in svg
    with pytest.raises(SystemExit) as info:  # argparse: usage and the choices, exit 2
        main(["plot", str(small_run), "--x", "minutes"])
    assert info.value.code == 2


def test_compare_legend_names_the_keys_that_differ(
    small_document: SmallDocument, tmp_path: Path
) -> None:
    runs = []
    for lr in (0.05, 0.2):
        document = small_document(rounds=2)
        document["learner"] = {**document["learner"], "lr": lr}
        out = tmp_path / f"lr{lr}"
        runs.append(run_scenario(parse_scenario(document), out, plots=False).directory)
    fig = draw_compare([read_run(run) for run in runs])
    for ax in fig.axes:
        legend = ax.get_legend()
        assert legend is not None
        texts = [text.get_text() for text in legend.get_texts()]
        assert texts == ["learner.lr=0.05", "learner.lr=0.2"]
        assert len(tick_labels(fig, ax.yaxis)) >= 3
    assert "differing in learner.lr" in fig.axes[0].get_title()
    assert len(tick_labels(fig, fig.axes[1].xaxis)) >= 3
    plt.close(fig)
    # the same run twice differs in nothing: the directories tell the curves apart
    same = draw_compare([read_run(runs[0]), read_run(runs[0])])
    texts = [text.get_text() for text in same.axes[0].get_legend().get_texts()]
    assert texts == [f"small ({runs[0].name})"] * 2
    plt.close(same)


def test_a_run_with_overrides_is_titled_with_them(tmp_path: Path) -> None:
    document, source = read_document("default")
    overridden = apply_overrides(document, ["learner.lr=0.05", "seed=7"])
    for name, scenario in (
        ("plain", parse_scenario(document, source=source)),
        ("overridden", parse_scenario(overridden, source=source)),
    ):
        directory = tmp_path / name
        directory.mkdir()
        (directory / "scenario.toml").write_text(to_toml(scenario))
        (directory / "metrics.csv").write_text(
            "round,node,virtual_time,test_accuracy,consensus_distance\n0,0,0.5,0.5,0.1\n"
        )
    assert read_run(tmp_path / "plain").title == "default"
    # a scenario of the user's own, named after no shipped one, has nothing to differ from
    own = tmp_path / "own"
    own.mkdir()
    (own / "scenario.toml").write_text(
        (tmp_path / "overridden" / "scenario.toml").read_text().replace('"default"', '"mine"')
    )
    (own / "metrics.csv").write_text((tmp_path / "plain" / "metrics.csv").read_text())
    assert read_run(own).title == "mine" and not read_run(own).overrides
    run = read_run(tmp_path / "overridden")
    assert run.overrides == {"seed": 7, "learner.lr": 0.05}
    fig = draw(run, "accuracy")
    assert fig.axes[0].get_title() == "default: test accuracy\n[learner.lr=0.05, seed=7]"
    plt.close(fig)
