"""The robustness matrix of docs/experiments.md: merge rules x attacks x Byzantine fraction.

    python -m sim.experiments.robustness run --topology ba64     # 432 runs (3 seeds), 2 jobs
    python -m sim.experiments.robustness run --topology ring64
    python -m sim.experiments.robustness alie-formula            # ALIE with z_max, 20%, BA(64)
    python -m sim.experiments.robustness report                  # tables + figure

``run`` is one ``p2pfl-sim sweep`` of the shipped scenario ``robust-<topology>`` over two grid
keys, each value a whole TOML table: ``merge`` (a rule with its parameters) and
``adversaries[0]`` (an attack with its parameters and fraction); ``--print-command`` prints the
equivalent CLI line. The sweep directory is ``runs/robustness/<topology>`` (``sweep.csv``: one
row per run and seed, ``mean_test_accuracy`` = mean test accuracy of the honest nodes' final
models, ``protected_accuracy`` = the same over the honest nodes of which less than one third of
the neighbours are Byzantine). ``--seeds`` (default 3) runs seeds 1..N of every cell;
``--resume`` runs only the runs missing from the sweep directory. ``report`` reads both tables,
gives every cell as mean ± std over the seeds, writes ``docs/figures/robustness-matrix.png`` and
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
ACCEPTANCE_RULES = ("geometric_median", "centered_clipping", "median", "mean")
"""The rules of the acceptance table of docs/experiments.md."""


def adversary_values() -> list[str]:
    values = ['{attack = "none", count = 0}']
    for fraction in FRACTIONS:
        values += [f"{{{spec}, fraction = {fraction}}}" for spec in ATTACKS.values()]
    return values


def grid() -> list[tuple[str, list[str]]]:
    return [("merge", list(RULES.values())), ("adversaries[0]", adversary_values())]


SEEDS = 3
"""Seeds per cell (seeds 1, 2, ...): every value is reported as mean ± std over them."""
MEASURES = ("mean_test_accuracy", "protected_accuracy")
"""``mean_test_accuracy``: all honest nodes; ``protected_accuracy``: the honest nodes of which
less than one third of the neighbours are Byzantine (the nodes a rule can protect)."""

Cell = tuple[str, str, float]


def command(topology: str, seeds: int = SEEDS) -> str:
    parts = ["p2pfl-sim", "sweep", f"robust-{topology}"]
    for key, values in grid():
        parts += ["--grid", f"{key}={','.join(values)}"]
    parts += ["--seeds", str(seeds), "--jobs", "2", "--metric", "mean_test_accuracy"]
    parts += ["--out", str(RUNS / topology)]
    return shlex.join(parts)


def run(
    topology: str,
    jobs: int,
    *,
    seeds: int = SEEDS,
    values: list[str] | None = None,
    out: Path | None = None,
    resume: bool = False,
) -> Path:
    document, source = read_document(f"robust-{topology}")
    chosen = grid() if values is None else [("merge", list(RULES.values())),
                                             ("adversaries[0]", values)]  # fmt: skip
    directory = out or RUNS / topology
    runs = plan(document, source, chosen, seeds=seeds, out=directory)
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
        resume=resume,
    )
    print()
    return table


def _cell(row: dict[str, str]) -> Cell:
    merge = json.loads(row["merge"])
    adversary = json.loads(row["adversaries[0]"])
    attack = adversary["attack"]
    fraction = 0.0 if attack == "none" else float(adversary["fraction"])
    return merge["rule"], attack, fraction


def read_table(path: Path, measure: str = "mean_test_accuracy") -> dict[Cell, list[float]]:
    """Every cell's values of ``measure``, one per seed (NaN where a run has none)."""
    table: dict[Cell, list[float]] = {}
    with path.open() as handle:
        for row in csv.DictReader(handle):
            table.setdefault(_cell(row), []).append(float(row[measure] or "nan"))
    return table


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for one value) of the finite values."""
    import numpy as np

    finite = np.array([value for value in values if value == value], dtype=float)
    if len(finite) == 0:
        return float("nan"), float("nan")
    spread = float(finite.std(ddof=1)) if len(finite) > 1 else 0.0
    return float(finite.mean()), spread


def _text(values: list[float] | None) -> str:
    if not values:
        return "–"
    mean, std = mean_std(values)
    return f"{mean:.3f} ± {std:.3f}"


def report(out: Path) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    result: dict[str, Any] = {}
    fig, axes = plt.subplots(1, len(TOPOLOGIES), figsize=(7.2 * len(TOPOLOGIES), 5.2))
    columns = ["none", *ATTACKS]
    for ax, topology in zip(axes, TOPOLOGIES, strict=True):
        path = RUNS / topology / "sweep.csv"
        table = read_table(path) if path.exists() else {}
        if not table:
            print(f"\n{topology}: no runs yet ({path})")
            continue
        protected = read_table(path, "protected_accuracy")
        nodes = read_table(path, "protected_nodes")
        seeds = max(len(values) for values in table.values())
        missing = len(RULES) * (1 + len(ATTACKS) * len(FRACTIONS)) * seeds - sum(
            len(values) for values in table.values()
        )
        if missing:
            print(f"\n{topology}: {missing} runs missing (cells without them show –)")
        result[topology] = {
            f"{rule}/{attack}/{fraction}": {
                "mean_test_accuracy": mean_std(values),
                "protected_accuracy": mean_std(protected[(rule, attack, fraction)]),
                "protected_nodes": mean_std(nodes[(rule, attack, fraction)]),
                "seeds": len(values),
            }
            for (rule, attack, fraction), values in table.items()
        }
        grid_values = np.array(
            [
                [mean_std(table.get((rule, "none", 0.0), []))[0]]
                + [mean_std(table.get((rule, attack, 0.2), []))[0] for attack in ATTACKS]
                for rule in RULES
            ]
        )
        image = ax.imshow(grid_values, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
        for i in range(len(RULES)):
            for j in range(len(columns)):
                ax.text(j, i, f"{grid_values[i, j]:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
        ax.set_yticks(range(len(RULES)), list(RULES))
        ax.set_title(f"{topology}: honest mean accuracy, 20% Byzantine, mean of {seeds} seeds")
        fig.colorbar(image, ax=ax, fraction=0.046)
        print(f"\n### {topology}: all honest nodes, mean ± std over {seeds} seeds\n")
        shares = "/".join(str(int(f * 100)) for f in FRACTIONS)
        print("| rule | no attack | " + " | ".join(f"{a} {shares}%" for a in ATTACKS) + " |")
        print("|---" * (2 + len(ATTACKS)) + "|")
        for rule in RULES:
            cells = [_text(table.get((rule, "none", 0.0)))]
            cells += [" / ".join(_text(table.get((rule, a, f))) for f in FRACTIONS)
                      for a in ATTACKS]  # fmt: skip
            print(f"| {rule} | " + " | ".join(cells) + " |")
        print(f"\n### {topology}: honest nodes with < 1/3 Byzantine neighbours, 20%\n")
        print("| rule | " + " | ".join(f"{attack}: all / protected" for attack in ATTACKS) + " |")
        print("|---" * (1 + len(ATTACKS)) + "|")
        for rule in RULES:
            cells = [f"{_text(table.get((rule, a, 0.2)))} / {_text(protected.get((rule, a, 0.2)))}"
                     for a in ATTACKS]  # fmt: skip
            print(f"| {rule} | " + " | ".join(cells) + " |")
        counts = [
            f"{f:.0%}: {mean_std(nodes.get(('mean', 'sign_flip', f), []))[0]:.1f}"
            for f in FRACTIONS
        ]
        print(f"\nprotected honest nodes (mean over seeds): {', '.join(counts)}")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "robustness-matrix.png", dpi=110)
    plt.close(fig)
    ba_path = RUNS / "ba64" / "sweep.csv"
    result["acceptance"] = _acceptance(
        read_table(ba_path), read_table(ba_path, "protected_accuracy")
    )
    formula = RUNS / "alie-formula" / "sweep.csv"
    if formula.exists():
        result["alie_formula_ba64_20"] = {
            rule: mean_std(values) for (rule, _a, _f), values in read_table(formula).items()
        }
        print("\nALIE with z_max (formula), 20%, BA(64):", result["alie_formula_ba64_20"])
    (out / "robustness.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    return result


def _acceptance(ba: dict[Cell, list[float]], protected: dict[Cell, list[float]]) -> dict[str, Any]:
    """Which rules keep >= 95% of the attack-free accuracy at 20% on BA(64), seed by seed.

    Each seed's attacked run is compared with the same seed's attack-free run (same graph,
    data split and initial model); a rule passes when the mean of those ratios is >= 0.95.
    The same ratio is given for the protected nodes (honest, < 1/3 Byzantine neighbours):
    their accuracy under attack over the attack-free accuracy of all nodes (with no attacker
    every node is protected).
    """
    import numpy as np

    print("\n### acceptance (BA(64), 20%): share of the attack-free run, mean ± std over seeds")
    reference = ba[("mean", "none", 0.0)]
    acceptance: dict[str, Any] = {}
    table_rows: list[str] = []
    for attack in KEY_ATTACKS:
        entry: dict[str, Any] = {}
        for rule in RULES:
            if (rule, attack, 0.2) not in ba or (rule, "none", 0.0) not in ba:
                continue  # not run yet
            baseline = np.array(ba[(rule, "none", 0.0)])
            own = np.array(ba[(rule, attack, 0.2)]) / baseline
            shielded = np.array(protected[(rule, attack, 0.2)]) / baseline
            entry[rule] = {
                "own_baseline": mean_std(list(own)),
                "mean_baseline": mean_std(list(np.array(ba[(rule, attack, 0.2)]) / reference)),
                "protected_own_baseline": mean_std(list(shielded)),
                "per_seed_own": [round(float(value), 4) for value in own],
                "per_seed_protected": [round(float(value), 4) for value in shielded],
            }
        keep = [rule for rule in entry if entry[rule]["own_baseline"][0] >= 0.95]
        keep_protected = [
            rule for rule in entry if entry[rule]["protected_own_baseline"][0] >= 0.95
        ]
        acceptance[attack] = {
            "rules": entry,
            "keep_own_95": keep,
            "keep_own_95_protected": keep_protected,
        }
        print(f"{attack}: >= 95% of own attack-free run: all honest {keep}, "
              f"protected {keep_protected}")  # fmt: skip
        for rule, values in entry.items():
            own_mean, own_std = values["own_baseline"]
            shield_mean, shield_std = values["protected_own_baseline"]
            if rule in ACCEPTANCE_RULES:
                table_rows.append(
                    f"| {rule} | {attack} | {own_mean:.1%} ± {own_std:.1%} | "
                    + ", ".join(f"{100 * v:.1f}" for v in values["per_seed_own"])
                    + f" | {shield_mean:.1%} ± {shield_std:.1%} | "
                    + ", ".join(f"{100 * v:.1f}" for v in values["per_seed_protected"])
                    + " |"
                )
            shield_mean, shield_std = values["protected_own_baseline"]
            print(f"  {rule}: all {own_mean:.1%} ± {own_std:.1%} {values['per_seed_own']}; "
                  f"protected {shield_mean:.1%} ± {shield_std:.1%} "
                  f"{values['per_seed_protected']}")  # fmt: skip
    print("\n| rule | attack | all honest nodes | per seed | protected nodes | per seed |")
    print("|---|---|---|---|---|---|")
    print("\n".join(sorted(table_rows, key=lambda row: ACCEPTANCE_RULES.index(row.split()[1]))))
    return acceptance


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sim.experiments.robustness")
    parser.add_argument("what", choices=("run", "alie-formula", "report"))
    parser.add_argument("--topology", choices=TOPOLOGIES, default="ba64")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=SEEDS, help=f"seeds per cell ({SEEDS})")
    parser.add_argument("--resume", action="store_true", help="run only the missing runs")
    parser.add_argument("--out", type=Path, default=FIGURES)
    parser.add_argument("--print-command", action="store_true")
    args = parser.parse_args(argv)
    if args.print_command:
        print(command(args.topology, args.seeds))
        return
    if args.what == "run":
        print(run(args.topology, args.jobs, seeds=args.seeds, resume=args.resume))
    elif args.what == "alie-formula":
        print(run("ba64", args.jobs, seeds=args.seeds, resume=args.resume,
                  values=['{attack = "alie", fraction = 0.2}'],
                  out=RUNS / "alie-formula"))  # fmt: skip
    else:
        report(args.out)


if __name__ == "__main__":
    main()
