"""Krum's pairwise distances: exact (each pair from its own differences) against the Gram
matrix they replaced, measured in the same run.

For every ``n`` (rows, own included) and ``P`` (vector length) the script builds one random
float32 ``[n, P]`` stack and times, ``--repeat`` times in alternation, the exact
``p2pfl.merge._common.pairwise_squared_distances`` and the Gram-matrix distances
(``‖a‖² + ‖b‖² − 2⟨a, b⟩`` around the first row, as Krum computed them before issue 12,
defect 7). It prints the median times and their ratio, and the largest relative difference
between the two on these well-scaled rows (where the Gram form is still accurate).

    OMP_NUM_THREADS=1 .venv/bin/python bench/krum_distances.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from p2pfl.merge._common import gram_matrix, pairwise_squared_distances

SHAPES = (
    (5, 100_000),
    (9, 100_000),
    (17, 100_000),
    (5, 1_000_000),
    (9, 1_000_000),
    (17, 1_000_000),
)


def gram_distances(stack: torch.Tensor) -> torch.Tensor:
    """The distances Krum used before: from the Gram matrix centred on the own (first) row."""
    gram = gram_matrix(stack, stack[0])
    norms = torch.diagonal(gram)
    distances = norms[:, None] + norms[None, :] - 2.0 * gram
    return distances.clamp_(min=0.0).fill_diagonal_(0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, {os.cpu_count()} cpus, torch threads "
        f"{torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; "
        f"median of {args.repeat} runs"
    )
    print(
        f"{'n':>3} {'P':>9} {'exact ms':>10} {'gram ms':>10} {'exact/gram':>11} {'max rel diff':>13}"
    )
    for n, size in SHAPES:
        stack = torch.randn(n, size)
        exact_times, gram_times = [], []
        for _ in range(args.repeat):
            start = time.perf_counter()
            exact = pairwise_squared_distances(stack)
            exact_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            gram = gram_distances(stack)
            gram_times.append(time.perf_counter() - start)
        off = ~torch.eye(n, dtype=torch.bool)
        diff = float(((exact - gram).abs()[off] / exact[off]).max())
        e, g = statistics.median(exact_times), statistics.median(gram_times)
        print(f"{n:>3} {size:>9} {e * 1e3:>10.1f} {g * 1e3:>10.1f} {e / g:>10.2f}x {diff:>13.1e}")


if __name__ == "__main__":
    main()
