"""Small numeric checks that sit in hot paths (every received model, every merge).

``torch.isfinite`` is not vectorised on CPU for float32: on this project's reference machine it
reads ~5 ns per element against numpy's ~0.3 ns (100k elements: 538 µs vs 34 µs), so the
checks go through a zero-copy numpy view when the dtype allows it.
"""

from __future__ import annotations

import numpy as np
import torch

_NUMPY_DTYPES = (torch.float32, torch.float64, torch.float16)


_ALL = np.logical_and.reduce
"""``all`` over every axis as one ufunc call (``ndarray.all`` goes through a Python wrapper)."""


def _numpy_view(tensor: torch.Tensor) -> np.ndarray | None:
    # ``is_cpu`` and a plain ``numpy()`` (strided, no copy: numpy reads any strides) cost a
    # third of ``device.type`` and ``detach().contiguous().numpy()``, on every received model.
    if tensor.dtype not in _NUMPY_DTYPES or not tensor.is_cpu:
        return None
    return (tensor.detach() if tensor.requires_grad else tensor).numpy()


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every element is neither NaN nor infinite."""
    view = _numpy_view(tensor)
    if view is None:
        return bool(torch.isfinite(tensor).all())
    return bool(_ALL(np.isfinite(view), axis=None))


def finite_rows(matrix: torch.Tensor) -> torch.Tensor:
    """A boolean ``[k]`` mask of the rows of a ``[k, ...]`` tensor that are entirely finite."""
    if matrix.shape[0] == 0 or matrix.numel() == 0:
        return torch.ones(matrix.shape[0], dtype=torch.bool)
    rows = matrix.reshape(matrix.shape[0], -1)
    view = _numpy_view(rows)
    if view is None:
        return torch.isfinite(rows).all(dim=1)
    return torch.from_numpy(np.isfinite(view).all(axis=1))
