"""One attacker with 1, 5 and 20 Sybils: targeted label-flip success under mean, FoolsGold and
SybilWall (docs/experiments.md).

    python -m sim.experiments.sybil run      # 36 runs (12 cells x 3 seeds) of sybil-ba64
    python -m sim.experiments.sybil report   # table + docs/figures/sybil-success.png

``run`` sweeps ``merge.rule`` over mean, foolsgold, sybilwall and ``adversaries[0]`` over no
attacker and S = 1, 5, 20 Sybils (each a whole TOML table, as ``p2pfl-sim sweep --grid``
takes them) into ``runs/sybil``. ``report`` reads each run's ``summary.json``:
``attack_success_rate`` (share of the class-0 test samples the honest nodes' final models
predict as 1, averaged over honest nodes; with no attacker it is the natural 0 -> 1
confusion), ``mean_test_accuracy`` (honest nodes) and ``protected_accuracy`` (honest nodes
with less than one third of their neighbours Sybils), each as mean ± std over the seeds.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path
from typing import Any

from sim.experiments.robustness import SEEDS, mean_std
from sim.scenario import read_document
from sim.sweep import plan, run_sweep

FIGURES = Path("docs/figures")
RUNS = Path("runs/sybil")
RULES = ("mean", "foolsgold", "sybilwall")
SYBILS = (0, 1, 5, 20)
ATTACKER = 'attack = "label_flip", mode = "targeted", source = 0, target = 1, sybil_edges = 4'


def adversary(sybils: int) -> str:
    if sybils == 0:
        return '{attack = "none", count = 0}'
    return f"{{{ATTACKER}, sybils = {sybils}}}"


def run(jobs: int, *, seeds: int = SEEDS, resume: bool = False) -> Path:
    document, source = read_document("sybil-ba64")
    grid = [("merge.rule", list(RULES)), ("adversaries[0]", [adversary(s) for s in SYBILS])]
    runs = plan(document, source, grid, seeds=seeds, out=RUNS)
    started = time.perf_counter()

    def progress(done: int, total: int) -> None:
        print(f"\r{done}/{total} runs, {time.perf_counter() - started:.0f} s", end="", flush=True)

    table = run_sweep(runs, source, RUNS, jobs=jobs, metrics=("mean_test_accuracy",),
                      on_done=progress, name="sybil-ba64", resume=resume)  # fmt: skip
    print()
    return table


MEASURES = ("attack_success_rate", "accuracy", "protected_accuracy", "protected_nodes")


def read_results() -> dict[str, dict[int, dict[str, list[float]]]]:
    """rule -> S -> measure -> one value per seed (NaN where a run has none)."""
    results: dict[str, dict[int, dict[str, list[float]]]] = {rule: {} for rule in RULES}
    with (RUNS / "sweep.csv").open() as handle:
        for row in csv.DictReader(handle):
            entry = json.loads(row["adversaries[0]"])
            sybils = int(entry.get("sybils") or 0)
            summary = json.loads((RUNS / row["directory"] / "summary.json").read_text())
            values = {
                "attack_success_rate": summary["attack_success_rate"],
                "accuracy": summary["mean_test_accuracy"],
                "protected_accuracy": summary["protected_accuracy"],
                "protected_nodes": summary["protected_nodes"],
            }
            cell = results[row["merge.rule"]].setdefault(sybils, {m: [] for m in MEASURES})
            for measure, value in values.items():
                cell[measure].append(float("nan") if value is None else float(value))
    return results


def _text(values: list[float]) -> str:
    mean, std = mean_std(values)
    return "–" if mean != mean else f"{mean:.3f} ± {std:.3f}"  # NaN: no value (no attacker)


def _print_table(results: dict[str, dict[int, dict[str, list[float]]]], cell: str) -> None:
    """A markdown table, a row per rule and a column per S; ``cell`` names the measures."""
    print("| rule | " + " | ".join(f"S = {s}" for s in SYBILS) + " |")
    print("|---" * (len(SYBILS) + 1) + "|")
    for rule in RULES:
        cells = [
            cell.format(**{measure: _text(values) for measure, values in results[rule][s].items()})
            for s in SYBILS
        ]
        print(f"| {rule} | " + " | ".join(cells) + " |")


def report(out: Path) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = read_results()
    seeds = max(len(cell["accuracy"]) for rule in RULES for cell in results[rule].values())
    print(f"attack success (honest mean accuracy), mean ± std over {seeds} seeds\n")
    _print_table(results, "{attack_success_rate} ({accuracy})")
    print("\nhonest accuracy: all honest nodes / those with < 1/3 Sybil neighbours\n")
    _print_table(results, "{accuracy} / {protected_accuracy}")
    counts = [f"S = {s}: {mean_std(results['mean'][s]['protected_nodes'])[0]:.1f}" for s in SYBILS]
    print(f"\nhonest nodes with < 1/3 Sybil neighbours (of 64): {', '.join(counts)}")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for rule in RULES:
        for ax, measure in zip(axes, ("attack_success_rate", "accuracy"), strict=True):
            stats = [mean_std(results[rule][s][measure]) for s in SYBILS]
            ax.errorbar(range(len(SYBILS)), [m for m, _ in stats], yerr=[e for _, e in stats],
                        fmt="o-", capsize=3, label=rule)  # fmt: skip
    for ax, title in zip(axes, ("attack success: class 0 predicted as 1 (honest nodes)",
                                "honest mean test accuracy"), strict=True):  # fmt: skip
        ax.set_xticks(range(len(SYBILS)), [str(s) for s in SYBILS])
        ax.set_xlabel(
            f"Sybil identities of the one attacker (0 = no attacker); ± std, {seeds} seeds"
        )
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "sybil-success.png", dpi=110)
    plt.close(fig)
    summary = {rule: {s: {m: mean_std(v) for m, v in cell.items()}
                      for s, cell in results[rule].items()} for rule in RULES}  # fmt: skip
    (out / "sybil.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sim.experiments.sybil")
    parser.add_argument("what", choices=("run", "report"))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=SEEDS, help=f"seeds per cell ({SEEDS})")
    parser.add_argument("--resume", action="store_true", help="run only the missing runs")
    parser.add_argument("--out", type=Path, default=FIGURES)
    args = parser.parse_args(argv)
    if args.what == "run":
        print(run(args.jobs, seeds=args.seeds, resume=args.resume))
    else:
        report(args.out)


if __name__ == "__main__":
    main()
