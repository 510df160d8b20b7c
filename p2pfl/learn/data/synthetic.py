"""Synthetic(alpha, beta), the federated task of the FedProx paper (Li et al., 2020) and LEAF.

Every client ``k`` has its own linear-softmax labelling model and its own input
distribution, so the data is non-IID by construction and each example carries its client
as owner (the ``natural`` partition gives each node one client or more):

- ``u_k ~ N(0, alpha)`` and ``B_k ~ N(0, beta)`` (alpha and beta are standard deviations,
  as in the reference generator);
- ``W_k`` (``classes x features``) and ``b_k`` have i.i.d. ``N(u_k, 1)`` entries;
- the input mean ``v_k`` has i.i.d. ``N(B_k, 1)`` entries;
- ``x ~ N(v_k, Sigma)`` with ``Sigma`` diagonal, ``Sigma_jj = j ** -1.2`` (j from 1);
- ``y = argmax(softmax(W_k x + b_k))``;
- client sizes ``min_size + floor(LogNormal(size_mean, size_sigma))`` (a heavy tail, a few
  clients hold most of the data), capped at ``max_size`` if given.

alpha controls how much the labelling models differ between clients, beta how much their
inputs do; Synthetic(0, 0), (0.5, 0.5) and (1, 1) are the settings of the paper.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from p2pfl.checks import check_int, check_seed
from p2pfl.errors import ConfigError
from p2pfl.learn.data.core import ArrayDataset

MAX_FLOATS = 1 << 30
"""Largest number of generated feature values (4 GiB of float32) before refusing to allocate."""


def synthetic_leaf(
    num_clients: int = 30,
    alpha: float = 1.0,
    beta: float = 1.0,
    *,
    seed: int,
    num_features: int = 60,
    num_classes: int = 10,
    size_mean: float = 4.0,
    size_sigma: float = 2.0,
    min_size: int = 50,
    max_size: int | None = None,
) -> ArrayDataset:
    """Synthetic(alpha, beta): examples ``[num_features]`` with their client as owner.

    Args:
        num_clients: number of clients; in a run it defaults to the number of data-holding
            nodes, so the ``natural`` partition gives each node one client.
        alpha: spread of the clients' labelling models (>= 0).
        beta: spread of the clients' input distributions (>= 0).
        seed: seed of every draw (non-negative).
        num_features: input dimension (the paper: 60).
        num_classes: number of classes (the paper: 10).
        size_mean: mean of the log of a client's size above ``min_size``.
        size_sigma: standard deviation of that log (>= 0).
        min_size: smallest client size (>= 2, so a client keeps training data after the
            test split).
        max_size: largest client size, or ``None`` for no cap.

    Raises:
        ConfigError: an argument is out of range, or the data would exceed
            :data:`MAX_FLOATS` values (lower ``num_clients`` or set ``max_size``).
    """
    check_int("num_clients", num_clients, 1)
    check_int("num_features", num_features, 1)
    check_int("num_classes", num_classes, 2)
    check_int("min_size", min_size, 2)
    if max_size is not None:
        check_int("max_size", max_size, min_size)
    check_seed(seed)
    for key, value in (("alpha", alpha), ("beta", beta), ("size_sigma", size_sigma)):
        _check_finite(key, value, minimum=0.0)
    _check_finite("size_mean", size_mean, minimum=None)
    rng = np.random.default_rng(seed)
    extra = np.floor(rng.lognormal(size_mean, size_sigma, num_clients))
    sizes = np.minimum(min_size + extra, np.inf if max_size is None else max_size)
    total = float(sizes.sum())
    if total * num_features > MAX_FLOATS:
        raise ConfigError(
            "num_clients",
            num_clients,
            f"clients of {total:.3g} examples in all, above {MAX_FLOATS // num_features}; "
            "use fewer clients, a smaller size_mean or a max_size",
        )
    counts = sizes.astype(np.int64)
    std = np.arange(1, num_features + 1, dtype=np.float64) ** -0.6  # sqrt of j ** -1.2
    u = rng.normal(0.0, alpha, num_clients)
    shift = rng.normal(0.0, beta, num_clients)
    xs, ys = [], []
    for k in range(num_clients):
        weights = rng.normal(u[k], 1.0, (num_features, num_classes))
        bias = rng.normal(u[k], 1.0, num_classes)
        mean = rng.normal(shift[k], 1.0, num_features)
        x = mean + rng.standard_normal((int(counts[k]), num_features)) * std
        xs.append(x.astype(np.float32))
        ys.append(np.argmax(x @ weights + bias, axis=1))
    owners = np.repeat(np.arange(num_clients, dtype=np.int64), counts)
    return ArrayDataset(
        torch.from_numpy(np.concatenate(xs)),
        torch.from_numpy(np.concatenate(ys).astype(np.int64)),
        num_classes,
        torch.from_numpy(owners),
    )


def _check_finite(key: str, value: object, *, minimum: float | None) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (minimum is not None and value < minimum):  # type: ignore[operator]
        allowed = "a finite number" if minimum is None else f"a finite number >= {minimum}"
        raise ConfigError(key, value, allowed)
