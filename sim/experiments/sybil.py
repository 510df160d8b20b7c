"""One attacker with 1, 5 and 20 Sybils: targeted label-flip success under mean, FoolsGold and
SybilWall (docs/experiments.md).

    python -m sim.experiments.sybil run      # 12 runs of the shipped sybil-ba64 (sim sweep)
    python -m sim.experiments.sybil report   # table + docs/figures/sybil-success.png

``run`` sweeps ``merge.rule`` over mean, foolsgold, sybilwall and ``adversaries[0]`` over no
attacker and S = 1, 5, 20 Sybils (each a whole TOML table, as ``p2pfl-sim sweep --grid``
takes them) into ``runs/sybil``. ``report`` reads each run's ``summary.json``:
``attack_success_rate`` (share of the class-0 test samples the honest nodes' final models
predict as 1, averaged over honest nodes; with no attacker it is the natural 0 -> 1
confusion) and ``mean_test_accuracy`` (honest nodes).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path
from typing import Any

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


def run(jobs: int) -> Path:
    document, source = read_document("sybil-ba64")
    grid = [("merge.rule", list(RULES)), ("adversaries[0]", [adversary(s) for s in SYBILS])]
    runs = plan(document, source, grid, seeds=1, out=RUNS)
    started = time.perf_counter()

    def progress(done: int, total: int) -> None:
        print(f"\r{done}/{total} runs, {time.perf_counter() - started:.0f} s", end="", flush=True)

    table = run_sweep(runs, source, RUNS, jobs=jobs, metrics=("mean_test_accuracy",),
                      on_done=progress, name="sybil-ba64")  # fmt: skip
    print()
    return table


def report(out: Path) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results: dict[str, dict[int, dict[str, float | None]]] = {rule: {} for rule in RULES}
    with (RUNS / "sweep.csv").open() as handle:
        for row in csv.DictReader(handle):
            entry = json.loads(row["adversaries[0]"])
            sybils = int(entry.get("sybils") or 0)
            summary = json.loads((RUNS / row["directory"] / "summary.json").read_text())
            results[row["merge.rule"]][sybils] = {
                "attack_success_rate": summary["attack_success_rate"],
                "accuracy": summary["mean_test_accuracy"],
            }
    print("| rule | " + " | ".join(f"S = {s}" for s in SYBILS) + " |")
    print("|---" * (len(SYBILS) + 1) + "|")
    for rule in RULES:
        cells = []
        for s in SYBILS:
            cell = results[rule][s]
            rate = cell["attack_success_rate"]
            cells.append(f"{rate if rate is not None else float('nan'):.3f} "
                         f"(acc {cell['accuracy']:.3f})")  # fmt: skip
        print(f"| {rule} | " + " | ".join(cells) + " |")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for rule in RULES:
        rates = [results[rule][s]["attack_success_rate"] or 0.0 for s in SYBILS]
        accuracy = [results[rule][s]["accuracy"] or 0.0 for s in SYBILS]
        axes[0].plot(range(len(SYBILS)), rates, "o-", label=rule)
        axes[1].plot(range(len(SYBILS)), accuracy, "o-", label=rule)
    for ax, title in zip(axes, ("attack success: class 0 predicted as 1 (honest nodes)",
                                "honest mean test accuracy"), strict=True):  # fmt: skip
        ax.set_xticks(range(len(SYBILS)), [str(s) for s in SYBILS])
        ax.set_xlabel("Sybil identities of the one attacker (0 = no attacker)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "sybil-success.png", dpi=110)
    plt.close(fig)
    (out / "sybil.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sim.experiments.sybil")
    parser.add_argument("what", choices=("run", "report"))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=FIGURES)
    args = parser.parse_args(argv)
    if args.what == "run":
        print(run(args.jobs))
    else:
        report(args.out)


if __name__ == "__main__":
    main()
