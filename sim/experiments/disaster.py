"""The disaster study's report (docs/experiments.md): tables and a figure from sweeps.

The runs are plain ``p2pfl-sim sweep`` runs of a disaster scenario (the commands are in
docs/experiments.md); this module only reads their ``sweep.csv`` files:

    python -m sim.experiments.disaster report SWEEP_DIR... --baseline DIR [--figure PNG]

prints one markdown row per grid point (removed fraction, among, chosen by) with the mean ±
standard deviation over seeds (a bare mean where one seed only has a value) of the accuracy
of all surviving nodes, of the largest component (with its mean size), of the isolated nodes
(with their mean count) and the mean number of components, preceded by the no-removal baseline; ``--figure`` draws, for every
removed fraction, the survivors' and the largest component's accuracy per (among, by),
against the baseline.
"""

from __future__ import annotations

import argparse
import csv
import math
from collections.abc import Sequence
from pathlib import Path

FRACTION = "disruptions[0].fraction"
AMONG = "disruptions[0].among"
CHOOSE = "disruptions[0].choose"
GRID = (FRACTION, AMONG, CHOOSE)

Group = tuple[str, str, str]


def read_rows(sweep: Path) -> list[dict[str, str]]:
    """The rows of ``sweep/sweep.csv``."""
    with (sweep / "sweep.csv").open() as handle:
        return list(csv.DictReader(handle))


def _values(rows: Sequence[dict[str, str]], column: str) -> list[float]:
    """The finite values of ``column`` (a run without isolated nodes has none)."""
    cells = (row[column] for row in rows)
    return [value for value in (float(cell) for cell in cells if cell) if math.isfinite(value)]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); NaN for no values."""
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _cell(values: Sequence[float]) -> str:
    """``mean ± std``; a lone value (one seed had isolated nodes) without a spread."""
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "–"
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ± {std:.3f}"


def groups(rows: Sequence[dict[str, str]]) -> dict[Group, list[dict[str, str]]]:
    """Rows by (fraction, among, choose), in the sweep's order."""
    grouped: dict[Group, list[dict[str, str]]] = {}
    for row in rows:
        key = (row[FRACTION], row[AMONG], row[CHOOSE])
        grouped.setdefault(key, []).append(row)
    return grouped


def table(rows: Sequence[dict[str, str]], baseline: Sequence[dict[str, str]]) -> str:
    """The markdown report: the baseline line, then one table row per grid point."""
    lines = [
        f"No removal: {_cell(_values(baseline, 'final_accuracy_alive'))} ({len(baseline)} seeds).",
        "",
        "| removed | among | by | all alive | largest component (size) "
        "| isolated nodes (count) | components |",
        "|---|---|---|---|---|---|---|",
    ]
    for (fraction, among, choose), members in groups(rows).items():
        size = mean_std(_values(members, "largest_component_size"))[0]
        isolated = mean_std(_values(members, "isolated_nodes"))[0]
        components = mean_std(_values(members, "components"))[0]
        lines.append(
            f"| {float(fraction):.0%} | {among} | {choose} "
            f"| {_cell(_values(members, 'final_accuracy_alive'))} "
            f"| {_cell(_values(members, 'largest_component_accuracy'))} ({size:.1f}) "
            f"| {_cell(_values(members, 'isolated_accuracy'))} ({isolated:.1f}) "
            f"| {components:.1f} |"
        )
    return "\n".join(lines)


def figure(rows: Sequence[dict[str, str]], baseline: Sequence[dict[str, str]], out: Path) -> None:
    """Bars per removed fraction: survivors' and largest component's accuracy per (among, by),
    mean over seeds with each seed as a dot; the no-removal mean as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = groups(rows)
    fractions = list(dict.fromkeys(key[0] for key in grouped))
    kinds = list(dict.fromkeys(key[1:] for key in grouped))
    metrics = (("final_accuracy_alive", "all alive"), ("largest_component_accuracy", "LCC"))
    base = mean_std(_values(baseline, "final_accuracy_alive"))[0]
    fig, axes = plt.subplots(1, len(fractions), figsize=(4.2 * len(fractions), 3.4), sharey=True)
    for ax, fraction in zip(list(getattr(axes, "flat", [axes])), fractions, strict=True):
        width = 0.8 / len(metrics)
        for m, (column, label) in enumerate(metrics):
            for k, kind in enumerate(kinds):
                values = _values(grouped.get((fraction, *kind), []), column)
                x = k + (m - (len(metrics) - 1) / 2) * width
                mean = mean_std(values)[0]
                ax.bar(x, mean, width, color=f"C{m}", label=label if k == 0 else None)
                ax.scatter([x] * len(values), values, s=8, color="black", zorder=3)
        ax.axhline(base, color="grey", linestyle="--", label="no removal")
        ax.set_xticks(range(len(kinds)), [f"{a}\nby {c}" for a, c in kinds], fontsize=8)
        ax.set_title(f"{float(fraction):.0%} of the nodes removed", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    first = next(iter(getattr(axes, "flat", [axes])))
    first.set_ylabel("final test accuracy")
    first.legend(fontsize=7, loc="upper left")
    low = min(_values(rows, "final_accuracy_alive") + [base])
    first.set_ylim(max(0.0, low - 0.1), 1.0)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sim.experiments.disaster")
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser("report", help="markdown table (and figure) from two sweeps")
    report.add_argument("sweeps", type=Path, nargs="+", help="the removal sweeps' directories")
    report.add_argument("--baseline", type=Path, required=True, help="the no-removal sweep")
    report.add_argument("--figure", type=Path, help="write the bar chart here (PNG)")
    args = parser.parse_args(argv)
    rows = [row for sweep in args.sweeps for row in read_rows(sweep)]
    baseline = read_rows(args.baseline)
    print(table(rows, baseline))
    if args.figure is not None:
        figure(rows, baseline, args.figure)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
