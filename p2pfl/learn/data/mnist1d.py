"""MNIST-1D (Greydanus 2020): ten 1-D digit templates turned into 40-point noisy sequences.

The templates and the transformation constants come from the ``mnist1d`` package (extra
``[data]``); nothing is downloaded or written to disk. Two generators:

- ``"vectorized"`` (default) applies the package's documented procedure to all examples at
  once with numpy: pad each template with 36-60 zeros, stretch it to 72 points, scale it by
  a factor in ``[0.8, 1.2]``, shift it circularly by 0-47 points, fill the zero background
  with Gaussian-smoothed noise, add i.i.d. noise, add a random linear shear and resample to
  40 points; finally the whole set is standardised. Same distribution as the package's
  generator, different random draws, about 30x faster (bench/data_generation.py).
- ``"package"`` calls the package's own ``make_dataset``, example by example: the exact
  sequences the package makes for a seed, about 1 ms per example. It seeds numpy's and
  Python's global generators; their states are restored afterwards.
"""

from __future__ import annotations

import random  # noqa: TID251  (only to restore the global state the package reseeds)
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch

from p2pfl.checks import check_int, check_seed
from p2pfl.errors import ConfigError
from p2pfl.learn.data.core import DATA_EXTRA_HINT, ArrayDataset, require

# Lengths of the package's procedure that the vectorised path relies on.
_NUM_CLASSES = 10


def mnist1d(
    n_samples: int = 5000,
    *,
    seed: int,
    generator: Literal["vectorized", "package"] = "vectorized",
) -> ArrayDataset:
    """MNIST-1D: ``n_samples`` examples of shape ``[40]``, 10 balanced classes, standardised.

    Args:
        n_samples: number of examples, >= 10 (a multiple of 10 for ``"package"``, which
            makes ``n_samples // 10`` per class); classes differ by at most one example.
        seed: seed of the draws (non-negative).
        generator: ``"vectorized"`` or ``"package"`` (see the module documentation).

    Raises:
        ConfigError: an argument is out of range.
        ImportError: the ``mnist1d`` package is not installed (extra ``[data]``).
    """
    check_int("n_samples", n_samples, _NUM_CLASSES)
    check_seed(seed)
    if generator not in ("vectorized", "package"):
        raise ConfigError("generator", generator, "'vectorized' or 'package'")
    if generator == "package" and n_samples % _NUM_CLASSES:
        raise ConfigError("n_samples", n_samples, "a multiple of 10 with generator = 'package'")
    data = require("mnist1d.data", "mnist1d", DATA_EXTRA_HINT)
    args = data.get_dataset_args()
    templates = data.get_templates()
    if generator == "package":
        x, y = _package(data, args, n_samples, seed)
    else:
        x, y = _vectorized(templates["x"], templates["y"], args, n_samples, seed)
    return ArrayDataset(torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y), _NUM_CLASSES)


def _package(
    data: Any, args: Any, n_samples: int, seed: int
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    args.num_samples = n_samples
    args.seed = seed % 2**32  # the package seeds numpy's legacy generator: 32 bits
    args.train_split = 1.0  # the federation splits off its own test set
    saved_numpy, saved_python = np.random.get_state(), random.getstate()
    try:
        made = data.make_dataset(args)
    finally:
        np.random.set_state(saved_numpy)
        random.setstate(saved_python)
    return np.asarray(made["x"], dtype=np.float64), np.asarray(made["y"], dtype=np.int64)


def _vectorized(
    templates: npt.NDArray[np.float64],
    template_labels: npt.NDArray[np.int64],
    args: Any,
    n: int,
    seed: int,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    from scipy.ndimage import gaussian_filter1d

    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n, dtype=np.int64) % len(template_labels))
    low, high = args.padding
    width = args.template_len + high  # every padded template is stretched to this length
    # 1. pad with p zeros, p uniform in [low, high]; the tiny offset keeps the signal
    #    non-zero so that step 4 can tell it from the background, as the package does.
    padded = np.zeros((n, width))
    padded[:, : args.template_len] = templates[y] + 1e-8
    lengths = args.template_len + rng.integers(low, high + 1, size=n)
    # 2. stretch each padded template (length lengths[i]) linearly onto `width` points.
    x = _resample(padded, lengths, width)
    # 3. scale, then 4. shift circularly by k in [0, max_translation).
    x *= 1 + args.scale_coeff * (rng.random((n, 1)) - 0.5)
    shift = rng.integers(0, args.max_translation, size=n)
    x = np.take_along_axis(x, (np.arange(width)[None, :] - shift[:, None]) % width, axis=1)
    # 5. correlated noise where there is no signal, i.i.d. noise everywhere.
    background = gaussian_filter1d(args.corr_noise_scale * rng.standard_normal((n, width)), 2)
    x = np.where(x != 0, x, background)
    x += args.iid_noise_scale * rng.standard_normal((n, width))
    # 6. shear by a random linear ramp, then 7. resample to the final length.
    x -= args.shear_scale * (rng.random((n, 1)) - 0.5) * np.linspace(-0.5, 0.5, width)
    # The last resampling is the same for every row: one matrix product.
    x = x @ _resample(np.eye(width), np.full(width, width), args.final_seq_length)
    x = (x - x.mean()) / x.std()
    return x, y


def _resample(
    rows: npt.NDArray[np.float64], lengths: npt.NDArray[np.int64], size: int
) -> npt.NDArray[np.float64]:
    """Linear interpolation of ``rows[i, :lengths[i]]`` onto ``size`` evenly spaced points."""
    position = np.linspace(0.0, 1.0, size)[None, :] * (lengths[:, None] - 1)
    left = np.minimum(np.floor(position).astype(np.int64), lengths[:, None] - 2)
    frac = position - left
    a = np.take_along_axis(rows, left, axis=1)
    b = np.take_along_axis(rows, left + 1, axis=1)
    result: npt.NDArray[np.float64] = a * (1 - frac) + b * frac
    return result
