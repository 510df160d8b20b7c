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

Disruption times are drawn as dotted vertical lines on the time plots. ``compare_runs``
overlays several runs. Everything uses matplotlib's Agg backend; no display is needed.
"""

from __future__ import annotations

import csv
import json
import math
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import networkx as nx
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import NullFormatter

# Text as text in SVGs (smaller, searchable, and much faster to write than glyph paths).
matplotlib.rcParams["svg.fonttype"] = "none"
matplotlib.rcParams["svg.hashsalt"] = "p2pfl"
PER_NODE_LINES_UP_TO = 16
DRAW_TOPOLOGY_UP_TO = 1000
PLOT_NAMES = ("accuracy", "loss", "consensus", "traffic", "topology", "components")
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

    @property
    def nodes(self) -> int:
        return len(self.relay)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.directory.name})"

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
    scenario_path = directory / "scenario.toml"
    if scenario_path.exists():
        name = str(tomllib.loads(scenario_path.read_text()).get("name", name))
    honest: dict[int, bool] = {}
    if "honest" in metrics:
        for node, flag in zip(metrics["node"], metrics["honest"], strict=True):
            honest[int(node)] = bool(flag) and honest.get(int(node), True)
    return RunData(directory, name, metrics, events, relay, edges, honest)


# -- per-round aggregates -------------------------------------------------------------------


def _rounds(run: RunData, column: str, *, honest_only: bool = True) -> dict[str, np.ndarray]:
    """Per round: mean virtual time and mean/min/max of ``column`` over finite values."""
    metrics = run.metrics
    if not metrics or not len(metrics["round"]):
        empty = np.array([])
        return {"time": empty, "mean": empty, "min": empty, "max": empty}
    mask = np.ones(len(metrics["round"]), dtype=bool)
    if honest_only and "honest" in metrics:
        mask &= metrics["honest"] == 1
    values = metrics[column]
    rounds = np.unique(metrics["round"][mask])
    out: dict[str, list[float]] = {"time": [], "mean": [], "min": [], "max": []}
    for round_ in rounds:
        select = mask & (metrics["round"] == round_)
        finite = values[select][np.isfinite(values[select])]
        if not len(finite):
            continue
        out["time"].append(float(metrics["virtual_time"][select].mean()))
        out["mean"].append(float(finite.mean()))
        out["min"].append(float(finite.min()))
        out["max"].append(float(finite.max()))
    return {key: np.array(value) for key, value in out.items()}


def _mark_disruptions(ax: Axes, run: RunData) -> None:
    seen: set[tuple[float, str]] = set()
    for time, kind in run.disruption_times():
        if (time, kind) in seen:
            continue
        seen.add((time, kind))
        ax.axvline(time, color="tab:purple", linestyle=":", linewidth=1)
        ax.annotate(
            kind,
            (time, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(2, -10),
            textcoords="offset points",
            fontsize=7,
            color="tab:purple",
        )


def _band_plot(
    ax: Axes, run: RunData, column: str, *, label: str, color: str, per_node: bool
) -> None:
    stats = _rounds(run, column)
    if per_node and run.nodes <= PER_NODE_LINES_UP_TO:
        metrics = run.metrics
        for node in range(run.nodes):
            select = metrics["node"] == node
            if select.any():
                order = np.argsort(metrics["round"][select])
                ax.plot(
                    metrics["virtual_time"][select][order],
                    metrics[column][select][order],
                    linewidth=0.6,
                    alpha=0.35,
                    color=color,
                )
    if len(stats["time"]):
        ax.fill_between(
            stats["time"], stats["min"], stats["max"], alpha=0.2, color=color, label="min–max"
        )
        ax.plot(stats["time"], stats["mean"], color=color, linewidth=2, label=label)


def _save(fig: Figure, directory: Path, name: str) -> list[Path]:
    paths = [directory / f"{name}.png", directory / f"{name}.svg"]
    fig.savefig(paths[0], dpi=110)
    fig.savefig(paths[1])
    plt.close(fig)
    return paths


def _time_axes(title: str, ylabel: str) -> tuple[Figure, Axes]:
    fig, ax = plt.subplots(figsize=(7, 4))
    # fixed margins: tight_layout would measure every tick label, which costs more than
    # drawing the figure
    fig.subplots_adjust(left=0.11, right=0.97, bottom=0.13, top=0.91)
    ax.set_title(title)
    ax.set_xlabel("virtual time (s)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _per_node_legend(ax: Axes, run: RunData, color: str) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if run.nodes <= PER_NODE_LINES_UP_TO:
        handles.append(Line2D([], [], color=color, linewidth=0.6, alpha=0.5))
        labels.append("one node")
    ax.legend(handles, labels, loc="best", fontsize=8)


# -- the plots --------------------------------------------------------------------------


def plot_accuracy(run: RunData, out: Path) -> list[Path]:
    fig, ax = _time_axes(f"{run.name}: test accuracy", "test accuracy (fraction correct)")
    _band_plot(
        ax, run, "test_accuracy", label="mean (honest nodes)", color="tab:blue", per_node=True
    )
    _mark_disruptions(ax, run)
    _per_node_legend(ax, run, "tab:blue")
    return _save(fig, out, "accuracy")


def plot_loss(run: RunData, out: Path) -> list[Path]:
    fig, ax = _time_axes(f"{run.name}: loss", "cross-entropy loss (nats)")
    _band_plot(ax, run, "test_loss", label="test loss, mean", color="tab:orange", per_node=True)
    train = _rounds(run, "train_loss")
    if len(train["time"]):
        ax.plot(
            train["time"],
            train["mean"],
            color="tab:brown",
            linestyle="--",
            label="train loss, mean",
        )
    _mark_disruptions(ax, run)
    _per_node_legend(ax, run, "tab:orange")
    return _save(fig, out, "loss")


def plot_consensus(run: RunData, out: Path) -> list[Path]:
    fig, ax = _time_axes(
        f"{run.name}: consensus distance", "mean squared distance to the mean model"
    )
    stats = _rounds(run, "consensus_distance", honest_only=False)
    if len(stats["time"]):
        ax.plot(
            stats["time"], stats["mean"], color="tab:red", marker=".", label="consensus distance"
        )
        if (stats["mean"] > 0).all():
            ax.set_yscale("log")
            ax.yaxis.set_minor_formatter(NullFormatter())
    _mark_disruptions(ax, run)
    ax.legend(loc="best", fontsize=8)
    return _save(fig, out, "consensus")


def _cumulative_bytes(run: RunData) -> tuple[np.ndarray, np.ndarray]:
    metrics = run.metrics
    if not metrics or not len(metrics["round"]):
        return np.array([]), np.array([])
    rounds = np.unique(metrics["round"])
    latest = np.zeros(max(run.nodes, int(metrics["node"].max()) + 1))
    times, totals = [], []
    for round_ in rounds:
        select = metrics["round"] == round_
        latest[metrics["node"][select].astype(int)] = metrics["bytes_sent"][select]
        times.append(float(metrics["virtual_time"][select].max()))
        totals.append(float(latest.sum()) / 1e6)
    return np.array(times), np.array(totals)


def plot_traffic(run: RunData, out: Path) -> list[Path]:
    fig, ax = _time_axes(f"{run.name}: traffic", "bytes sent, all nodes (MB, cumulative)")
    times, totals = _cumulative_bytes(run)
    if len(times):
        ax.plot(times, totals, color="tab:green", marker=".", label="bytes sent")
    _mark_disruptions(ax, run)
    ax.legend(loc="best", fontsize=8)
    return _save(fig, out, "traffic")


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


def plot_topology(run: RunData, out: Path, times: Sequence[float] | None = None) -> list[Path]:
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
    fig.suptitle(f"{run.name}: topology and node states over virtual time")
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.1, top=0.86, wspace=0.05)
    paths = [out / "topology.png", out / "topology.svg"]
    fig.savefig(paths[0], dpi=110)
    fig.savefig(paths[1])
    plt.close(fig)
    return paths


def component_series(run: RunData) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Mean accuracy per round of: each component (when there are few), or the largest
    component and the other non-isolated ones; and the isolated nodes."""
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
        time = float(metrics["virtual_time"][select].mean())
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


def plot_components(run: RunData, out: Path) -> list[Path]:
    fig, ax = _time_axes(
        f"{run.name}: accuracy per connected component", "test accuracy (fraction correct)"
    )
    for key, (times, values) in component_series(run).items():
        style = {"linestyle": "--", "color": "black"} if key == "isolated nodes" else {}
        ax.plot(times, values, marker=".", label=key, **style)
    _mark_disruptions(ax, run)
    ax.legend(loc="best", fontsize=8)
    return _save(fig, out, "components")


def plot_run(
    directory: Path, *, topology_times: Sequence[float] | None = None, out: Path | None = None
) -> list[Path]:
    """Draw every plot of a run directory into ``out`` (default: the directory itself).

    Raises:
        FileNotFoundError: ``directory`` holds no ``metrics.csv``.
    """
    run = read_run(directory)
    target = out or directory
    target.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    paths += plot_accuracy(run, target)
    paths += plot_loss(run, target)
    paths += plot_consensus(run, target)
    paths += plot_traffic(run, target)
    paths += plot_topology(run, target, topology_times)
    paths += plot_components(run, target)
    return paths


def compare_runs(directories: Sequence[Path], out: Path) -> list[Path]:
    """Overlay runs: mean accuracy (with min-max band) and consensus distance over time.

    Raises:
        FileNotFoundError: a directory holds no ``metrics.csv``.
    """
    runs = [read_run(directory) for directory in directories]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.08, top=0.94, hspace=0.08)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for number, run in enumerate(runs):
        color = colors[number % len(colors)]
        stats = _rounds(run, "test_accuracy")
        if len(stats["time"]):
            top.fill_between(stats["time"], stats["min"], stats["max"], alpha=0.12, color=color)
            top.plot(stats["time"], stats["mean"], color=color, label=run.label)
        consensus = _rounds(run, "consensus_distance", honest_only=False)
        if len(consensus["time"]):
            bottom.plot(consensus["time"], consensus["mean"], color=color, label=run.label)
    names = sorted({run.name for run in runs})
    top.set_title(f"compare: {', '.join(names)}")
    top.set_ylabel("test accuracy (mean, min–max band)")
    bottom.set_ylabel("consensus distance")
    bottom.set_xlabel("virtual time (s)")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    out.mkdir(parents=True, exist_ok=True)
    return _save(fig, out, "compare")


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
