"""The plots of a run, drawn only from the files of its run directory.

``plot_run(directory)`` reads ``metrics.csv``, ``events.jsonl``, ``nodes.csv``, ``edges.csv``
and ``scenario.toml`` and writes, as PNG and SVG:

* ``accuracy``: test accuracy over virtual time, the mean over honest nodes with a min-max
  band per round (a thin line per node too when there are at most 16 nodes);
* ``loss``: test loss (mean and band) and mean train loss;
* ``consensus``: consensus distance (mean squared distance of the models to their mean);
* ``traffic``: cumulative megabytes sent by all nodes;
* ``topology``: the graph with node states (data holder, relay, offline, dead, Byzantine)
  and cut links, at chosen virtual times (default: start, just after each disruption time,
  end; at most four panels);
* ``components``: mean accuracy per connected component of the live graph, with isolated
  nodes (components of one) apart.

The time plots put virtual seconds on x, or rounds with ``x="rounds"`` (``p2pfl-sim plot
--x rounds``). Disruption times are drawn as dotted vertical lines on them. Titles name the
scenario and the keys the run changed (``--set`` overrides, ``--seed``, a sweep's grid
values), as ``summary.json`` records them under ``overrides`` (for a directory without them:
the keys that differ from the shipped scenario of that name). ``compare_runs`` overlays several runs, each
curve labelled with the scenario keys in which the runs differ. Each plot has a ``draw_*``
function returning the figure (for tests and notebooks) beside the ``plot_*`` one that
saves it. Everything uses matplotlib's Agg backend; no display is needed.
"""

from __future__ import annotations

import csv
import json
import math
import textwrap
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import networkx as nx
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import LogFormatterSciNotation, MaxNLocator, ScalarFormatter

# Text as text in SVGs (smaller, searchable, and much faster to write than glyph paths).
matplotlib.rcParams["svg.fonttype"] = "none"
matplotlib.rcParams["svg.hashsalt"] = "p2pfl"
PER_NODE_LINES_UP_TO = 16
DRAW_TOPOLOGY_UP_TO = 1000
PLOT_NAMES = ("accuracy", "loss", "consensus", "traffic", "topology", "components")
XAxis = Literal["seconds", "rounds"]
X_AXES: tuple[XAxis, ...] = ("seconds", "rounds")
X_LABEL: dict[XAxis, str] = {"seconds": "virtual time (s)", "rounds": "round"}
TICK_LABEL_SIZE = 9
TITLE_CHARS = 75
"""Overrides in a title wrap at this many characters (a 7-inch figure at 10 pt)."""
LABEL_KEYS_SHOWN = 4
"""A compare legend or title names at most this many differing keys, then "+N more"."""
NOT_A_SETTING = frozenset({"output_dir", "description"})
"""Scenario keys that do not change what a run computes, left out of differences."""
STATE_STYLE = {
    "data": ("tab:blue", "o", "data holder"),
    "relay": ("tab:green", "s", "relay (no data)"),
    "offline": ("#bbbbbb", "o", "offline"),
    "dead": ("black", "x", "dead"),
    "byzantine": ("tab:red", "D", "Byzantine"),
}


@dataclass
class RunData:
    """A run directory's files, parsed."""

    directory: Path
    name: str
    metrics: dict[str, np.ndarray]
    events: list[dict[str, Any]]
    relay: list[bool]
    edges: list[tuple[int, int]]
    honest: dict[int, bool] = field(default_factory=dict)
    scenario: dict[str, Any] = field(default_factory=dict)
    """The run's resolved scenario, flattened to dotted keys (see :func:`flatten`)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Keys in which the run differs from the shipped scenario of its name (``--set``)."""

    @property
    def nodes(self) -> int:
        return len(self.relay)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.directory.name})"

    @property
    def title(self) -> str:
        """The scenario's name, with the overrides it was run with."""
        if not self.overrides:
            return self.name
        return f"{self.name} [{describe(self.overrides)}]"

    def heading(self, what: str) -> str:
        """A plot's title: ``NAME: what``, then the overrides wrapped on lines of their own,
        so a long list stays inside the figure."""
        first = f"{self.name}: {what}"
        if not self.overrides:
            return first
        return "\n".join([first, *textwrap.wrap(f"[{describe(self.overrides)}]", TITLE_CHARS)])

    def disruption_times(self) -> list[tuple[float, str]]:
        return [(e["time"], e["kind"]) for e in self.events if e.get("event") == "disruption"]


def read_run(directory: Path) -> RunData:
    """Parse a run directory.

    Raises:
        FileNotFoundError: ``metrics.csv`` is missing (not a run directory).
    """
    with (directory / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    columns = list(rows[0]) if rows else []
    metrics = {
        column: np.array([float(row[column]) for row in rows], dtype=float) for column in columns
    }
    events: list[dict[str, Any]] = []
    events_path = directory / "events.jsonl"
    if events_path.exists():
        events = [json.loads(line) for line in events_path.read_text().splitlines() if line]
    relay: list[bool] = []
    nodes_path = directory / "nodes.csv"
    if nodes_path.exists():
        with nodes_path.open() as handle:
            relay = [row["relay"] == "1" for row in csv.DictReader(handle)]
    elif "node" in metrics and len(metrics["node"]):
        relay = [False] * (int(metrics["node"].max()) + 1)
    edges: list[tuple[int, int]] = []
    edges_path = directory / "edges.csv"
    if edges_path.exists():
        with edges_path.open() as handle:
            edges = [(int(row["u"]), int(row["v"])) for row in csv.DictReader(handle)]
    name = directory.name
    scenario: dict[str, Any] = {}
    scenario_path = directory / "scenario.toml"
    if scenario_path.exists():
        scenario = flatten(tomllib.loads(scenario_path.read_text()))
        name = str(scenario.get("name", name))
    honest: dict[int, bool] = {}
    if "honest" in metrics:
        for node, flag in zip(metrics["node"], metrics["honest"], strict=True):
            honest[int(node)] = bool(flag) and honest.get(int(node), True)
    overrides = recorded_overrides(directory)
    if overrides is None:  # a run directory written before summary.json recorded them
        baseline = shipped_baseline(name) if scenario else {}
        overrides = differences([baseline, scenario])[1] if baseline else {}
    return RunData(directory, name, metrics, events, relay, edges, honest, scenario, overrides)


def recorded_overrides(directory: Path) -> dict[str, Any] | None:
    """The keys the run changed (``--set``, ``--seed``, a sweep's grid values), as its
    ``summary.json`` records them; None when it records none."""
    try:
        summary = json.loads((directory / "summary.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    overrides = summary.get("overrides") if isinstance(summary, dict) else None
    return overrides if isinstance(overrides, dict) else None


# -- what differs between scenarios ---------------------------------------------------------


def flatten(document: Any, prefix: str = "") -> dict[str, Any]:
    """A TOML document as ``{dotted.key: value}``; arrays of tables as ``key[i].field``."""
    out: dict[str, Any] = {}
    if isinstance(document, dict):
        for key, value in document.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(document, list) and document and all(isinstance(v, dict) for v in document):
        for index, value in enumerate(document):
            out.update(flatten(value, f"{prefix}[{index}]"))
    else:
        out[prefix] = document
    return out


_MISSING = object()


def differences(scenarios: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per scenario (flattened), the keys whose values are not the same in all of them.

    A key one scenario lacks counts as differing (shown as ``-``); keys in
    :data:`NOT_A_SETTING` never do. Keys keep the order they first appear in.
    """
    keys = list(dict.fromkeys(key for scenario in scenarios for key in scenario))
    differing = []
    for key in keys:
        if key in NOT_A_SETTING:
            continue
        values = [scenario.get(key, _MISSING) for scenario in scenarios]
        if any(value is _MISSING or value != values[0] for value in values):
            differing.append(key)
    return [{key: scenario.get(key, "-") for key in differing} for scenario in scenarios]


def _show(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 24 else text[:23] + "…"


def describe(keys: dict[str, Any]) -> str:
    """``learner.lr=0.05, seed=7``: the keys sorted (the same wherever the dict came from,
    ``summary.json`` sorts them), at most :data:`LABEL_KEYS_SHOWN` then ``+N more``."""
    shown = sorted(keys.items())[:LABEL_KEYS_SHOWN]
    parts = [f"{key}={_show(value)}" for key, value in shown]
    if len(keys) > LABEL_KEYS_SHOWN:
        parts.append(f"+{len(keys) - LABEL_KEYS_SHOWN} more")
    return ", ".join(parts)


def shipped_baseline(name: str) -> dict[str, Any]:
    """The shipped scenario ``name``, resolved and flattened; empty when none has that name.

    A run of a shipped scenario with ``--set`` overrides differs from it in exactly the
    overridden keys; a run of the user's own file named after no shipped scenario has no
    baseline, so its title is its name alone.
    """
    from sim.scenario import parse_scenario, read_document, shipped_scenarios, to_toml

    if name not in shipped_scenarios():
        return {}
    document, source = read_document(name)
    return flatten(tomllib.loads(to_toml(parse_scenario(document, source=source))))


# -- per-round aggregates -------------------------------------------------------------------


def _rounds(run: RunData, column: str, *, honest_only: bool = True) -> dict[str, np.ndarray]:
    """Per round: the round, mean virtual time and mean/min/max of ``column`` over finite
    values."""
    metrics = run.metrics
    if not metrics or not len(metrics["round"]):
        empty = np.array([])
        return {"round": empty, "time": empty, "mean": empty, "min": empty, "max": empty}
    mask = np.ones(len(metrics["round"]), dtype=bool)
    if honest_only and "honest" in metrics:
        mask &= metrics["honest"] == 1
    values = metrics[column]
    rounds = np.unique(metrics["round"][mask])
    out: dict[str, list[float]] = {"round": [], "time": [], "mean": [], "min": [], "max": []}
    for round_ in rounds:
        select = mask & (metrics["round"] == round_)
        finite = values[select][np.isfinite(values[select])]
        if not len(finite):
            continue
        out["round"].append(float(round_))
        out["time"].append(float(metrics["virtual_time"][select].mean()))
        out["mean"].append(float(finite.mean()))
        out["min"].append(float(finite.min()))
        out["max"].append(float(finite.max()))
    return {key: np.array(value) for key, value in out.items()}


def _x(stats: dict[str, np.ndarray], x: XAxis) -> np.ndarray:
    return stats["time"] if x == "seconds" else stats["round"]


def _time_to_round(run: RunData, time: float) -> float:
    """Where virtual ``time`` falls on a rounds axis: between the rounds it falls between."""
    metrics = run.metrics
    if not metrics or not len(metrics["round"]):
        return 0.0
    rounds = np.unique(metrics["round"])
    ends = np.array([metrics["virtual_time"][metrics["round"] == r].mean() for r in rounds])
    # mean round times almost always increase; interp needs them to
    return float(np.interp(time, np.maximum.accumulate(ends), rounds))


def _mark_disruptions(ax: Axes, run: RunData, x: XAxis = "seconds") -> None:
    seen: set[tuple[float, str]] = set()
    for time, kind in run.disruption_times():
        if (time, kind) in seen:
            continue
        seen.add((time, kind))
        at = time if x == "seconds" else _time_to_round(run, time)
        ax.axvline(at, color="tab:purple", linestyle=":", linewidth=1)
        ax.annotate(
            kind,
            (at, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(2, -10),
            textcoords="offset points",
            fontsize=7,
            color="tab:purple",
        )


def _band_plot(
    ax: Axes,
    run: RunData,
    column: str,
    *,
    label: str,
    color: str,
    per_node: bool,
    x: XAxis = "seconds",
) -> None:
    stats = _rounds(run, column)
    if per_node and run.nodes <= PER_NODE_LINES_UP_TO:
        metrics = run.metrics
        xs = metrics["virtual_time"] if x == "seconds" else metrics["round"]
        for node in range(run.nodes):
            select = metrics["node"] == node
            if select.any():
                order = np.argsort(metrics["round"][select])
                ax.plot(
                    xs[select][order],
                    metrics[column][select][order],
                    linewidth=0.6,
                    alpha=0.35,
                    color=color,
                )
    if len(stats["time"]):
        ax.fill_between(
            _x(stats, x), stats["min"], stats["max"], alpha=0.2, color=color, label="min–max"
        )
        ax.plot(_x(stats, x), stats["mean"], color=color, linewidth=2, label=label)


def _save(fig: Figure, directory: Path, name: str) -> list[Path]:
    paths = [directory / f"{name}.png", directory / f"{name}.svg"]
    fig.savefig(paths[0], dpi=110)
    fig.savefig(paths[1])
    plt.close(fig)
    return paths


def _style_axes(ax: Axes, x: XAxis) -> None:
    """Readable ticks: a few labelled ticks on each axis, whole numbers for rounds."""
    ax.set_xlabel(X_LABEL[x])
    ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=x == "rounds"))
    ax.yaxis.set_major_locator(MaxNLocator(nbins=6))
    formatter = ScalarFormatter(useMathText=True)
    formatter.set_powerlimits((-3, 4))  # 1e-4 reads as "1×10⁻⁴" beside the axis, not 0.0001
    ax.yaxis.set_major_formatter(formatter)
    ax.tick_params(labelsize=TICK_LABEL_SIZE)
    ax.grid(alpha=0.3)


def _scale_for(ax: Axes, values: np.ndarray) -> None:
    """A log y axis when positive values span more than a decade, else a linear one;
    either way every decade and enough ticks in between carry labels."""
    finite = values[np.isfinite(values)]
    if not len(finite) or (finite <= 0).any() or finite.max() < 10 * finite.min():
        return  # within one decade a log axis would have one labelled tick or none
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(LogFormatterSciNotation())
    # under two decades label the ticks between powers of ten too (2x, 5x, ...)
    ax.yaxis.set_minor_formatter(
        LogFormatterSciNotation(labelOnlyBase=False, minor_thresholds=(2, 0.5))
    )
    ax.tick_params(which="minor", labelsize=TICK_LABEL_SIZE - 1)


def _time_axes(title: str, ylabel: str, x: XAxis = "seconds") -> tuple[Figure, Axes]:
    if x not in X_AXES:
        raise ValueError(f"x = {x!r}: one of {', '.join(X_AXES)}")
    fig, ax = plt.subplots(figsize=(7, 4))
    # fixed margins: tight_layout would measure every tick label, which costs more than
    # drawing the figure; each extra title line takes 4.5% of the height
    lines = title.count("\n")
    fig.subplots_adjust(left=0.11, right=0.97, bottom=0.13, top=0.91 - 0.045 * lines)
    ax.set_title(title, fontsize=11 if not lines else 10)
    ax.set_ylabel(ylabel)
    _style_axes(ax, x)
    return fig, ax


def _per_node_legend(ax: Axes, run: RunData, color: str) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if run.nodes <= PER_NODE_LINES_UP_TO:
        handles.append(Line2D([], [], color=color, linewidth=0.6, alpha=0.5))
        labels.append("one node")
    ax.legend(handles, labels, loc="best", fontsize=8)


# -- the plots --------------------------------------------------------------------------


def draw_accuracy(run: RunData, x: XAxis = "seconds") -> Figure:
    fig, ax = _time_axes(run.heading("test accuracy"), "test accuracy (fraction correct)", x)
    _band_plot(
        ax, run, "test_accuracy", label="mean (honest nodes)", color="tab:blue", per_node=True, x=x
    )
    _mark_disruptions(ax, run, x)
    _per_node_legend(ax, run, "tab:blue")
    return fig


def draw_loss(run: RunData, x: XAxis = "seconds") -> Figure:
    fig, ax = _time_axes(run.heading("loss"), "cross-entropy loss (nats)", x)
    _band_plot(
        ax, run, "test_loss", label="test loss, mean", color="tab:orange", per_node=True, x=x
    )
    train = _rounds(run, "train_loss")
    if len(train["time"]):
        ax.plot(
            _x(train, x),
            train["mean"],
            color="tab:brown",
            linestyle="--",
            label="train loss, mean",
        )
    _mark_disruptions(ax, run, x)
    _per_node_legend(ax, run, "tab:orange")
    return fig


def draw_consensus(run: RunData, x: XAxis = "seconds") -> Figure:
    fig, ax = _time_axes(
        run.heading("consensus distance"), "mean squared distance to the mean model", x
    )
    stats = _rounds(run, "consensus_distance", honest_only=False)
    if len(stats["time"]):
        ax.plot(
            _x(stats, x), stats["mean"], color="tab:red", marker=".", label="consensus distance"
        )
        _scale_for(ax, stats["mean"])
    _mark_disruptions(ax, run, x)
    ax.legend(loc="best", fontsize=8)
    return fig


def _cumulative_bytes(run: RunData) -> dict[str, np.ndarray]:
    """Per round: the round, its last virtual time, and megabytes sent by all nodes so far."""
    metrics = run.metrics
    if not metrics or not len(metrics["round"]):
        return {"round": np.array([]), "time": np.array([]), "mean": np.array([])}
    rounds = np.unique(metrics["round"])
    latest = np.zeros(max(run.nodes, int(metrics["node"].max()) + 1))
    times, totals = [], []
    for round_ in rounds:
        select = metrics["round"] == round_
        latest[metrics["node"][select].astype(int)] = metrics["bytes_sent"][select]
        times.append(float(metrics["virtual_time"][select].max()))
        totals.append(float(latest.sum()) / 1e6)
    return {"round": rounds, "time": np.array(times), "mean": np.array(totals)}


def draw_traffic(run: RunData, x: XAxis = "seconds") -> Figure:
    fig, ax = _time_axes(run.heading("traffic"), "bytes sent, all nodes (MB, cumulative)", x)
    traffic = _cumulative_bytes(run)
    if len(traffic["time"]):
        ax.plot(_x(traffic, x), traffic["mean"], color="tab:green", marker=".", label="bytes sent")
    _mark_disruptions(ax, run, x)
    ax.legend(loc="best", fontsize=8)
    return fig


def state_at(run: RunData, time: float) -> tuple[dict[int, str], set[tuple[int, int]]]:
    """Node states (only those not online) and the links down, just after ``time``."""
    states: dict[int, str] = {}
    down: set[tuple[int, int]] = set()
    for event in run.events:
        if event["time"] > time:
            break
        if event.get("event") == "node":
            if event["state"] == "online":
                states.pop(event["node"], None)
            else:
                states[event["node"]] = event["state"]
        elif event.get("event") == "link":
            link = (event["link"][0], event["link"][1])
            if event["state"] == "down":
                down.add(link)
            else:
                down.discard(link)
    return states, down


def default_topology_times(run: RunData) -> list[float]:
    end = (
        float(run.metrics["virtual_time"].max())
        if len(run.metrics.get("virtual_time", []))
        else 0.0
    )
    times = sorted({float(time) for time, _kind in run.disruption_times()})
    picked = [0.0, *times[:2], end] if times else [0.0, end]
    unique: list[float] = []
    for time in picked:
        if not unique or time > unique[-1]:
            unique.append(time)
    return unique[:4]


def draw_topology(run: RunData, times: Sequence[float] | None = None) -> Figure:
    chosen = list(times) if times else default_topology_times(run)
    fig, axes = plt.subplots(1, len(chosen), figsize=(4.2 * len(chosen), 4.6), squeeze=False)
    graph = nx.Graph()
    graph.add_nodes_from(range(run.nodes))
    graph.add_edges_from(run.edges)
    drawable = run.nodes <= DRAW_TOPOLOGY_UP_TO
    positions = nx.spring_layout(graph, seed=1, iterations=60) if drawable else {}
    for ax, time in zip(axes[0], chosen, strict=True):
        ax.set_title(f"t = {time:.2f} s", fontsize=10)
        ax.set_axis_off()
        if not drawable:
            ax.text(0.5, 0.5, f"{run.nodes} nodes: too many to draw", ha="center")
            continue
        states, down = state_at(run, time)
        dead = {node for node, state in states.items() if state == "dead"}
        up_edges = [e for e in run.edges if e not in down and not (set(e) & dead)]
        cut_edges = [e for e in run.edges if e in down and not (set(e) & dead)]
        dead_edges = [e for e in run.edges if set(e) & dead]
        nx.draw_networkx_edges(
            graph, positions, edgelist=up_edges, ax=ax, edge_color="#888888", width=0.7
        )
        nx.draw_networkx_edges(
            graph,
            positions,
            edgelist=cut_edges,
            ax=ax,
            edge_color="tab:red",
            style="dashed",
            width=0.7,
        )
        nx.draw_networkx_edges(
            graph, positions, edgelist=dead_edges, ax=ax, edge_color="#dddddd", width=0.4
        )
        groups: dict[str, list[int]] = {key: [] for key in STATE_STYLE}
        for node in range(run.nodes):
            if node in states:
                groups[states[node]].append(node)
            elif not run.honest.get(node, True):
                groups["byzantine"].append(node)
            else:
                groups["relay" if run.relay[node] else "data"].append(node)
        size = 60 if run.nodes <= 100 else 15
        for key, nodes in groups.items():
            if nodes:
                color, marker, _label = STATE_STYLE[key]
                nx.draw_networkx_nodes(
                    graph,
                    positions,
                    nodelist=nodes,
                    ax=ax,
                    node_color=color,
                    node_shape=marker,
                    node_size=size,
                )
    handles = [
        Line2D([], [], color=color, marker=marker, linestyle="", label=label)
        for color, marker, label in STATE_STYLE.values()
    ]
    handles.append(Line2D([], [], color="tab:red", linestyle="--", label="link down"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8)
    heading = run.heading("topology and node states over virtual time")
    fig.suptitle(heading)
    fig.subplots_adjust(
        left=0.02, right=0.98, bottom=0.1, top=0.86 - 0.04 * heading.count("\n"), wspace=0.05
    )
    return fig


def component_series(
    run: RunData, x: XAxis = "seconds"
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Mean accuracy per round (at the round's mean time, or the round) of: each component
    (when there are few), or the largest component and the other non-isolated ones; and the
    isolated nodes."""
    metrics = run.metrics
    if not metrics or "component" not in metrics or not len(metrics["round"]):
        return {}
    labels = np.unique(metrics["component"][metrics["component_size"] > 1])
    few = len(labels) <= 6
    series: dict[str, tuple[list[float], list[float]]] = {}

    def add(key: str, time: float, value: float) -> None:
        times, values = series.setdefault(key, ([], []))
        times.append(time)
        values.append(value)

    for round_ in np.unique(metrics["round"]):
        select = metrics["round"] == round_
        time = float(metrics["virtual_time"][select].mean()) if x == "seconds" else float(round_)
        sizes = metrics["component_size"][select]
        comps = metrics["component"][select]
        accuracy = metrics["test_accuracy"][select]
        isolated = sizes == 1
        if isolated.any():
            add("isolated nodes", time, float(accuracy[isolated].mean()))
        if not (~isolated).any():
            continue
        largest = sizes[~isolated].max()
        if few:
            for label in np.unique(comps[~isolated]):
                members = comps == label
                add(f"component of node {int(label)}", time, float(accuracy[members].mean()))
        else:
            main = sizes == largest
            add("largest component", time, float(accuracy[main].mean()))
            rest = ~isolated & ~main
            if rest.any():
                add("other components", time, float(accuracy[rest].mean()))
    return {key: (np.array(t), np.array(v)) for key, (t, v) in series.items()}


def draw_components(run: RunData, x: XAxis = "seconds") -> Figure:
    fig, ax = _time_axes(
        run.heading("accuracy per connected component"), "test accuracy (fraction correct)", x
    )
    for key, (xs, values) in component_series(run, x).items():
        style: dict[str, Any] = (
            {"linestyle": "--", "color": "black"} if key == "isolated nodes" else {}
        )
        ax.plot(xs, values, marker=".", label=key, **style)
    _mark_disruptions(ax, run, x)
    ax.legend(loc="best", fontsize=8)
    return fig


def draw(
    run: RunData,
    name: str,
    *,
    topology_times: Sequence[float] | None = None,
    x: XAxis = "seconds",
) -> Figure:
    """The plot ``name`` (one of :data:`PLOT_NAMES`) of a run; close it with ``plt.close``.

    Raises:
        KeyError: ``name`` is not a plot name.
        ValueError: ``x`` is not one of :data:`X_AXES`.
    """
    if name == "topology":
        return draw_topology(run, topology_times)
    return _TIME_PLOTS[name](run, x)


_TIME_PLOTS: dict[str, Callable[[RunData, XAxis], Figure]] = {
    "accuracy": draw_accuracy,
    "loss": draw_loss,
    "consensus": draw_consensus,
    "traffic": draw_traffic,
    "components": draw_components,
}


def plot_run(
    directory: Path,
    *,
    topology_times: Sequence[float] | None = None,
    out: Path | None = None,
    x: XAxis = "seconds",
    overrides: dict[str, Any] | None = None,
) -> list[Path]:
    """Draw every plot of a run directory into ``out`` (default: the directory itself),
    with virtual seconds or rounds on x; ``overrides`` (the keys the run changed) title
    the plots instead of those :func:`read_run` finds.

    Raises:
        FileNotFoundError: ``directory`` holds no ``metrics.csv``.
        ValueError: ``x`` is not one of :data:`X_AXES`.
    """
    run = read_run(directory)
    if overrides is not None:
        run.overrides = dict(overrides)
    target = out or directory
    target.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for name in PLOT_NAMES:  # one figure at a time: a large run's figures are big
        paths += _save(draw(run, name, topology_times=topology_times, x=x), target, name)
    return paths


def compare_labels(runs: Sequence[RunData]) -> list[str]:
    """One legend label per run naming the scenario keys in which the runs differ
    (``learner.lr=0.05``); runs of one scenario fall back to their directory names."""
    differing = differences([run.scenario for run in runs])
    labels = [describe(keys) for keys in differing]
    if len(set(labels)) < len(labels):
        return [f"{label} ({run.directory.name})" if label else run.label
                for label, run in zip(labels, runs, strict=True)]  # fmt: skip
    return labels


def draw_compare(runs: Sequence[RunData], x: XAxis = "seconds") -> Figure:
    """Mean accuracy (with min-max band) and consensus distance of several runs.

    Raises:
        ValueError: ``x`` is not one of :data:`X_AXES`.
    """
    if x not in X_AXES:
        raise ValueError(f"x = {x!r}: one of {', '.join(X_AXES)}")
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.08, top=0.94, hspace=0.08)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    consensus_values: list[np.ndarray] = []
    for number, (run, label) in enumerate(zip(runs, compare_labels(runs), strict=True)):
        color = colors[number % len(colors)]
        stats = _rounds(run, "test_accuracy")
        if len(stats["time"]):
            top.fill_between(_x(stats, x), stats["min"], stats["max"], alpha=0.12, color=color)
            top.plot(_x(stats, x), stats["mean"], color=color, label=label)
        consensus = _rounds(run, "consensus_distance", honest_only=False)
        if len(consensus["time"]):
            bottom.plot(_x(consensus, x), consensus["mean"], color=color, label=label)
            consensus_values.append(consensus["mean"])
    names = sorted({run.name for run in runs})
    differing = list(differences([run.scenario for run in runs])[0])
    title = f"compare: {', '.join(names)}"
    if differing:
        shown = differing[:LABEL_KEYS_SHOWN]
        more = len(differing) - len(shown)
        title += f"; differing in {', '.join(shown)}" + (f" +{more} more" if more > 0 else "")
    top.set_title(title, fontsize=10)
    top.set_ylabel("test accuracy (mean, min–max band)")
    bottom.set_ylabel("consensus distance")
    for ax in (top, bottom):
        _style_axes(ax, x)
        ax.legend(loc="best", fontsize=8)
    top.set_xlabel("")
    top.tick_params(labelbottom=False)
    if consensus_values:
        _scale_for(bottom, np.concatenate(consensus_values))
    return fig


def compare_runs(directories: Sequence[Path], out: Path, *, x: XAxis = "seconds") -> list[Path]:
    """Overlay runs into ``out/compare.png`` and ``.svg``; see :func:`draw_compare`.

    Raises:
        FileNotFoundError: a directory holds no ``metrics.csv``.
        ValueError: ``x`` is not one of :data:`X_AXES`.
    """
    runs = [read_run(directory) for directory in directories]
    fig = draw_compare(runs, x)
    out.mkdir(parents=True, exist_ok=True)
    return _save(fig, out, "compare")


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
