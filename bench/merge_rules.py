"""Merge-rule throughput, as a ratio to the plain "mean" rule measured in the same run.

For every ``k`` (received rows) and ``P`` (vector length) the script builds one random float32
own vector and a ``[k, P]`` received stack, calls each rule ``--repeat`` times and keeps the
median wall time. Throughput is the bytes of the ``[k, P]`` stack divided by that time (GB/s
read); ``x mean`` is the rule's time over the "mean" rule's time at the same ``(k, P)``, which
drifts much less with machine load than absolute speed (the rules take turns in every
repetition). Two reference rows time the bare ``torch.mean(dim=0)`` and
``torch.median(dim=0)`` over the stack (no finiteness check, no own vector). The issue's target: median and
trimmed mean within 10x of mean.

    OMP_NUM_THREADS=1 .venv/bin/python bench/merge_rules.py [--repeat 5] [--rules median,krum]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Any

import torch

from p2pfl.merge import MergeContext, make_merge_rule
from p2pfl.params import ParamLayout

KS = (4, 8, 16)
SIZES = (100_000, 1_000_000)

# name, parameters: every rule must accept k = 4 received rows (n = 5 inputs with own)
RULES: list[tuple[str, dict[str, Any]]] = [
    ("mean", {}),
    ("weighted", {}),
    ("age_weighted", {}),
    ("variance_corrected", {}),
    ("median", {}),
    ("trimmed_mean", {"f": 1}),
    ("krum", {"f": 1}),
    ("multi_krum", {"f": 1}),
    ("geometric_median", {}),
    ("centered_clipping", {}),
    ("clipped_gossip", {}),
    ("balance", {}),
    ("nna", {"f": 1}),
]


def layout_for(size: int) -> ParamLayout:
    """A plausible model layout: one 2-D weight per 10,000 elements plus a bias each."""
    shapes: list[tuple[str, tuple[int, ...]]] = []
    left, index = size, 0
    while left > 0:
        bias = 100 if left > 10_100 else 0
        weight = min(10_000, left - bias)
        shapes.append((f"layer{index}.weight", (weight // 100, 100)))
        left -= (weight // 100) * 100
        if bias:
            shapes.append((f"layer{index}.bias", (bias,)))
            left -= bias
        elif left:
            shapes.append((f"layer{index}.rest", (left,)))
            left = 0
        index += 1
    return ParamLayout.from_shapes(shapes)


TORCH_ROWS = ("torch.mean(dim=0)", "torch.median(dim=0)")


class _TorchOp:
    """The bare torch reduction over the received stack, for reference (not a merge rule)."""

    def __init__(self, op: str) -> None:
        self.op = op

    def __call__(self, own: torch.Tensor, received: torch.Tensor, *_: Any) -> torch.Tensor:
        if self.op == "mean":
            return received.mean(dim=0)
        return received.median(dim=0).values


def timings(rules: list[Any], args: tuple[Any, ...], repeat: int) -> list[float]:
    """Median seconds per rule; the rules take turns in every repetition, so load that comes
    and goes during the run hits all of them alike."""
    for rule in rules:
        rule(*args)  # warm-up: caches, allocator, compiled networks
    times: list[list[float]] = [[] for _ in rules]
    for _ in range(repeat):
        for rule, taken in zip(rules, times, strict=True):
            start = time.perf_counter()
            rule(*args)
            taken.append(time.perf_counter() - start)
    return [statistics.median(taken) for taken in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--rules", default="", help="comma-separated subset (mean always runs)")
    options = parser.parse_args()
    wanted = {name for name in options.rules.split(",") if name}
    rules = [(n, p) for n, p in RULES if not wanted or n in wanted or n == "mean"]
    assert rules[0][0] == "mean"

    torch.set_num_threads(1)
    print(
        f"torch {torch.__version__}, {os.cpu_count()} cpus, torch threads "
        f"{torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}, "
        f"{platform.processor() or platform.machine()}; median of {options.repeat} runs"
    )
    print(f"{'rule':<20}" + "".join(f"{f'k={k} P={p:.0e}':>22}" for p in SIZES for k in KS))
    print(f"{'':<20}" + "".join(f"{'GB/s  x mean':>22}" for _ in SIZES for _ in KS))
    names = [name for name, _ in rules] + list(TORCH_ROWS)
    results: dict[str, list[str]] = {name: [] for name in names}
    for size in SIZES:
        layout = layout_for(size)
        for k in KS:
            generator = torch.Generator().manual_seed(k * size)
            own = torch.randn(size, generator=generator) * 0.05
            received = own + torch.randn(k, size, generator=generator) * 0.01
            weights = torch.full((k,), 32.0)
            ctx = MergeContext(
                rounds=tuple(range(k)),
                own_round=k,
                layout=layout,
                degree=k,
                peer_degrees=(k,) * k,
                total_rounds=100,
                state={},
            )
            args = (own, received, weights, ctx)
            stack_bytes = received.numel() * received.element_size()
            built = [make_merge_rule(name, **params) for name, params in rules]
            built += [_TorchOp("mean"), _TorchOp("median")]
            medians = timings(built, args, options.repeat)
            baseline = medians[0]  # "mean" always runs first
            for name, taken in zip(names, medians, strict=True):
                cell = f"{stack_bytes / taken / 1e9:>10.2f} {taken / baseline:>6.1f}x"
                results[name].append(cell)
    for name in names:
        print(f"{name:<20}" + "".join(f"{cell:>22}" for cell in results[name]))


if __name__ == "__main__":
    main()
