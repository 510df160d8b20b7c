"""The robustness matrix of docs/experiments.md: merge rules x attacks x Byzantine fraction.

    python -m sim.experiments.robustness run --topology ba64     # ~144 runs, sim sweep, 2 jobs
    python -m sim.experiments.robustness run --topology ring64
    python -m sim.experiments.robustness alie-formula            # ALIE with z_max, 20%, BA(64)
    python -m sim.experiments.robustness report                  # tables + figure

``run`` is one ``p2pfl-sim sweep`` of the shipped scenario ``robust-<topology>`` over two grid
keys, each value a whole TOML table: ``merge`` (a rule with its parameters) and
``adversaries[0]`` (an attack with its parameters and fraction); ``--print-command`` prints the
equivalent CLI line. The sweep directory is ``runs/robustness/<topology>`` (``sweep.csv``: one
row per run, ``mean_test_accuracy`` = mean test accuracy of the honest nodes' final models).
``report`` reads both tables and writes ``docs/figures/robustness-matrix.png`` and
``docs/figures/robustness.json`` and prints the markdown tables of the document.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import time
from pathlib import Path
from typing import Any

from sim.scenario import read_document
from sim.sweep import plan, run_sweep

FIGURES = Path("docs/figures")
RUNS = Path("runs/robustness")
TOPOLOGIES = ("ba64", "ring64")
RULES: dict[str, str] = {
    "mean": '{rule = "mean"}',
    "median": '{rule = "median"}',
    "trimmed_mean": '{rule = "trimmed_mean", params = {f = 1}}',
    "krum": '{rule = "krum", params = {f = 1}}',
    "geometric_median": '{rule = "geometric_median"}',
    "centered_clipping": '{rule = "centered_clipping"}',
    "clipped_gossip": '{rule = "clipped_gossip"}',
    "balance": '{rule = "balance"}',
    "nna": '{rule = "nna", params = {f = 1}}',
}
ATTACKS: dict[str, str] = {
    "sign_flip": 'attack = "sign_flip"',
    "gaussian": 'attack = "gaussian", sigma = 200.0',
    "alie": 'attack = "alie", z = 10.0',
    "ipm": 'attack = "ipm", epsilon = 0.1',
    "label_flip": 'attack = "label_flip", mode = "all"',
}
FRACTIONS = (0.1, 0.2, 0.3)
KEY_ATTACKS = ("alie", "ipm", "sign_flip")


def adversary_values() -> list[str]:
    values = ['{attack = "none", count = 0}']
    for fraction in FRACTIONS:
        values += [f"{{{spec}, fraction = {fraction}}}" for spec in ATTACKS.values()]
    return values


def grid() -> list[tuple[str, list[str]]]:
    return [("merge", list(RULES.values())), ("adversaries[0]", adversary_values())]


def command(topology: str) -> str:
    parts = ["p2pfl-sim", "sweep", f"robust-{topology}"]
    for key, values in grid():
        parts += ["--grid", f"{key}={','.join(values)}"]
    parts += ["--jobs", "2", "--metric", "mean_test_accuracy", "--out", str(RUNS / topology)]
    return shlex.join(parts)


def run(
    topology: str, jobs: int, *, values: list[str] | None = None, out: Path | None = None
) -> Path:
    document, source = read_document(f"robust-{topology}")
    chosen = grid() if values is None else [("merge", list(RULES.values())),
                                             ("adversaries[0]", values)]  # fmt: skip
    directory = out or RUNS / topology
    runs = plan(document, source, chosen, seeds=1, out=directory)
    started = time.perf_counter()

    def progress(done: int, total: int) -> None:
        print(f"\r{done}/{total} runs, {time.perf_counter() - started:.0f} s", end="", flush=True)

    table = run_sweep(
        runs,
        source,
        directory,
        jobs=jobs,
        metrics=("mean_test_accuracy",),
        on_done=progress,
        name=f"robust-{topology}",
    )
    print()
    return table


def _cell(row: dict[str, str]) -> tuple[str, str, float]:
    merge = json.loads(row["merge"])
    adversary = json.loads(row["adversaries[0]"])
    attack = adversary["attack"]
    fraction = 0.0 if attack == "none" else float(adversary["fraction"])
    return merge["rule"], attack, fraction


def read_table(path: Path) -> dict[tuple[str, str, float], float]:
    with path.open() as handle:
        return {
            _cell(row): float(row["mean_test_accuracy"] or "nan") for row in csv.DictReader(handle)
        }


def report(out: Path) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    result: dict[str, Any] = {}
    fig, axes = plt.subplots(1, len(TOPOLOGIES), figsize=(7.2 * len(TOPOLOGIES), 5.2))
    columns = ["none", *ATTACKS]
    for ax, topology in zip(axes, TOPOLOGIES, strict=True):
        table = read_table(RUNS / topology / "sweep.csv")
        result[topology] = {f"{rule}/{attack}/{fraction}": value
                            for (rule, attack, fraction), value in table.items()}  # fmt: skip
        grid_values = np.array(
            [
                [table[(rule, "none", 0.0)]]
                + [table.get((rule, attack, 0.2), float("nan")) for attack in ATTACKS]
                for rule in RULES
            ]
        )
        image = ax.imshow(grid_values, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
        for i in range(len(RULES)):
            for j in range(len(columns)):
                ax.text(j, i, f"{grid_values[i, j]:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
        ax.set_yticks(range(len(RULES)), list(RULES))
        ax.set_title(f"{topology}: honest mean accuracy, 20% Byzantine ('none': no attack)")
        fig.colorbar(image, ax=ax, fraction=0.046)
        print(f"\n### {topology}\n")
        print("| rule | no attack | " + " | ".join(
            f"{attack} {int(f * 100)}%" for attack in ATTACKS for f in FRACTIONS) + " |")  # fmt: skip
        print("|---" * (2 + len(ATTACKS) * len(FRACTIONS)) + "|")
        for rule in RULES:
            cells = [f"{table[(rule, 'none', 0.0)]:.3f}"]
            cells += [f"{table.get((rule, a, f), float('nan')):.3f}" for a in ATTACKS
                      for f in FRACTIONS]  # fmt: skip
            print(f"| {rule} | " + " | ".join(cells) + " |")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "robustness-matrix.png", dpi=110)
    plt.close(fig)
    ba = read_table(RUNS / "ba64" / "sweep.csv")
    reference = ba[("mean", "none", 0.0)]
    print("\n### acceptance (BA(64), 20%): rules keeping >= 95% of the attack-free run")
    acceptance: dict[str, Any] = {}
    for attack in KEY_ATTACKS:
        keep_own = [r for r in RULES if ba[(r, attack, 0.2)] >= 0.95 * ba[(r, "none", 0.0)]]
        keep_mean = [r for r in RULES if ba[(r, attack, 0.2)] >= 0.95 * reference]
        acceptance[attack] = {"own_baseline": keep_own, "mean_baseline": keep_mean,
                              "mean_rule": ba[("mean", attack, 0.2)]}  # fmt: skip
        print(f"{attack}: vs own attack-free {keep_own}; vs mean attack-free ({reference:.3f}) "
              f"{keep_mean}; plain mean {ba[('mean', attack, 0.2)]:.3f}")  # fmt: skip
    result["acceptance"] = acceptance
    formula = RUNS / "alie-formula" / "sweep.csv"
    if formula.exists():
        result["alie_formula_ba64_20"] = {
            rule: value for (rule, _a, _f), value in read_table(formula).items()
        }
        print("\nALIE with z_max (formula), 20%, BA(64):", result["alie_formula_ba64_20"])
    (out / "robustness.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sim.experiments.robustness")
    parser.add_argument("what", choices=("run", "alie-formula", "report"))
    parser.add_argument("--topology", choices=TOPOLOGIES, default="ba64")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=FIGURES)
    parser.add_argument("--print-command", action="store_true")
    args = parser.parse_args(argv)
    if args.print_command:
        print(command(args.topology))
        return
    if args.what == "run":
        print(run(args.topology, args.jobs))
    elif args.what == "alie-formula":
        print(run("ba64", args.jobs, values=['{attack = "alie", fraction = 0.2}'],
                  out=RUNS / "alie-formula"))  # fmt: skip
    else:
        report(args.out)


if __name__ == "__main__":
    main()
