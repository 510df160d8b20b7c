"""Time to build each dataset a run can start from, and mnist1d's two generators compared.

Generated sets (mnist1d, synthetic_leaf) are timed as a run builds them; file loaders are
timed on files of the real datasets' sizes written here first (random pixels: the
loaders' cost does not depend on the values). The mnist1d ratio compares the package's
own per-example generator with the vectorised one at the same size, in the same process.

    .venv/bin/python bench/data_generation.py [--mnist1d 100000] [--package 5000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from p2pfl.learn.datasets import make_dataset


def timed(build: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = build()
    return time.perf_counter() - start, result


def write_mnist_layout(root: Path, train: int, test: int) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, count in (("train", train), ("t10k", test)):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = (np.arange(count) % 10).astype(np.uint8)
        for name, array in (("images-idx3", images), ("labels-idx1", labels)):
            dims = np.array(array.shape, dtype=">u4").tobytes()
            header = bytes([0, 0, 0x08, array.ndim]) + dims
            (raw / f"{prefix}-{name}-ubyte").write_bytes(header + array.tobytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mnist1d", type=int, default=100_000, help="vectorised examples")
    parser.add_argument("--package", type=int, default=5_000, help="examples for the ratio")
    args = parser.parse_args()
    print(f"cores={os.cpu_count()} OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    make_dataset("mnist1d", n_samples=10, seed=0)  # imports (scipy, mnist1d) not timed

    seconds, _ = timed(lambda: make_dataset("mnist1d", n_samples=args.mnist1d, seed=1))
    print(f"mnist1d vectorized  n={args.mnist1d:>7}  {seconds:7.2f} s")
    n = args.package
    vectorized, _ = timed(lambda: make_dataset("mnist1d", n_samples=n, seed=1))
    package, _ = timed(lambda: make_dataset("mnist1d", n_samples=n, seed=1, generator="package"))
    print(f"mnist1d vectorized  n={n:>7}  {vectorized:7.3f} s")
    print(
        f"mnist1d package     n={n:>7}  {package:7.3f} s   ratio package/vectorized "
        f"{package / vectorized:.0f}x"
    )

    for clients in (30, 1000):
        seconds, ds = timed(lambda c=clients: make_dataset("synthetic_leaf", num_clients=c, seed=1))
        print(f"synthetic_leaf      clients={clients:>5}  {len(ds):>8} examples  {seconds:6.2f} s")

    with tempfile.TemporaryDirectory() as folder:
        write_mnist_layout(Path(folder), 60_000, 10_000)
        seconds, data = timed(lambda: make_dataset("torchvision", name="MNIST", root=folder))
        print(f"torchvision MNIST layout 60000+10000 images  {seconds:6.2f} s")
        path = Path(folder) / "mnist-like.npz"
        np.savez(path, x_train=data.train.x.numpy(), y_train=data.train.y.numpy())
        seconds, _ = timed(lambda: make_dataset("npz", path=str(path)))
        print(f"npz float32 [60000, 1, 28, 28]  {seconds:6.2f} s")


if __name__ == "__main__":
    main()
