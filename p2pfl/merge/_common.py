"""Helpers shared by the robust, gossip and variance-correcting rules.

Input handling follows :mod:`p2pfl.merge.averaging`: the own vector is one more input next to
the received rows, rows holding a NaN or an infinity are left out (the own vector too), and
the inputs are never written to. :func:`gather` returns the finite inputs as *views* (no
copy of the ``[k, P]`` stack), own first.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from p2pfl.merge.base import as_rows
from p2pfl.merge.kernels import coordinate_median
from p2pfl.numerics import all_finite, finite_rows


@dataclass(frozen=True, slots=True)
class Inputs:
    """The usable inputs of one merge.

    Attributes:
        own: the own vector, flattened (a view of the caller's tensor).
        own_ok: whether the own vector is finite (and so ``rows[0]``).
        rows: the finite inputs as 1-D views in the own dtype: own first when ``own_ok``,
            then the finite received rows in their original order.
        received: the indices (into ``received``) of the finite received rows.
    """

    own: torch.Tensor
    own_ok: bool
    rows: tuple[torch.Tensor, ...]
    received: tuple[int, ...]

    @property
    def n(self) -> int:
        """Number of finite inputs, own included."""
        return len(self.rows)

    @property
    def others(self) -> tuple[torch.Tensor, ...]:
        """The finite received rows (the inputs without the own vector)."""
        return self.rows[1:] if self.own_ok else self.rows

    def stack(self) -> torch.Tensor:
        """The finite inputs as a new ``[n, P]`` tensor (own first when finite)."""
        if not self.rows:
            return self.own.new_empty((0, self.own.numel()))
        return torch.stack(self.rows)


def gather(own: torch.Tensor, received: torch.Tensor, weights: torch.Tensor) -> Inputs:
    """Check shapes and pick the finite inputs (see :class:`Inputs`).

    Raises:
        ValueError: ``received`` is not ``[k, *own.shape]`` or ``weights`` is not ``[k]``.
    """
    own_flat, matrix = as_rows(own, received, weights)
    k = matrix.shape[0]
    keep = finite_rows(matrix).tolist() if k else []
    indices = tuple(i for i, ok in enumerate(keep) if ok)
    own_ok = all_finite(own_flat)
    rows = ((own_flat,) if own_ok else ()) + tuple(matrix[i] for i in indices)
    return Inputs(own_flat, own_ok, rows, indices)


def reference(inputs: Inputs) -> torch.Tensor:
    """The own vector, or the coordinate-wise median of the finite inputs if own is not
    finite: the centre for own-centred rules (call only with at least one finite input)."""
    if inputs.own_ok:
        return inputs.own
    return coordinate_median(inputs.rows)


def mean64(rows: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The mean of ``rows`` as float64, summed in float64 (no overflow near float32's max)."""
    total = rows[0].to(torch.float64)
    for row in rows[1:]:
        total = total + row
    return total / len(rows)


def result(merged: torch.Tensor, own: torch.Tensor, *, copy: bool = False) -> torch.Tensor:
    """``merged`` in own's shape and dtype; ``copy`` when ``merged`` may alias an input."""
    out = merged.reshape(own.shape).to(dtype=own.dtype)
    if (copy and out.dtype == merged.dtype) or out.data_ptr() == own.data_ptr():
        out = out.clone()
    return out


def squared_distances(rows: tuple[torch.Tensor, ...], centre: torch.Tensor) -> torch.Tensor:
    """``[n]`` float64 squared distances ``‖row − centre‖²``, one pass per row."""
    centre64 = centre.to(torch.float64)
    out = torch.empty(len(rows), dtype=torch.float64)
    for i, row in enumerate(rows):
        diff = row.to(torch.float64) - centre64
        out[i] = torch.dot(diff, diff)
    return out


_GRAM_COLUMNS = 1 << 16


def gram_matrix(stack: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """``[n, n]`` float64 Gram matrix of the rows of ``stack`` re-centred on ``centre``.

    Centring on a fixed reference such as the own vector keeps the cancellation in distances
    derived from it small; the products are accumulated over column blocks in float64, so
    huge values neither overflow nor swamp the small ones.
    """
    n, size = stack.shape
    gram = torch.zeros((n, n), dtype=torch.float64)
    for start in range(0, size, _GRAM_COLUMNS):
        block = stack[:, start : start + _GRAM_COLUMNS].to(torch.float64)
        block -= centre[start : start + _GRAM_COLUMNS].to(torch.float64)
        gram += block @ block.T
    return gram


_PAIR_COLUMNS = 1 << 14


def pairwise_squared_distances(stack: torch.Tensor) -> torch.Tensor:
    """``[n, n]`` float64 squared Euclidean distances between the rows of ``stack``, each
    summed from its own coordinate differences.

    Exact up to rounding whatever the scale of any row: a Gram matrix (``‖a‖² + ‖b‖² −
    2⟨a, b⟩``) loses everything to cancellation when two rows are close to each other but
    far from the centre, and a Byzantine sender chooses the scale of its row. Differences of
    float32 values are exact in float64; the column blocks keep the work in cache. It takes
    1.4-2.1x the time of the Gram matrix for 5-17 rows (``bench/krum_distances.py``).
    """
    n, size = stack.shape
    upper = torch.zeros((n, n), dtype=torch.float64)
    for start in range(0, size, _PAIR_COLUMNS):
        block = stack[:, start : start + _PAIR_COLUMNS].to(torch.float64)
        for i in range(n - 1):
            diffs = block[i + 1 :] - block[i]
            upper[i, i + 1 :] += (diffs * diffs).sum(dim=1)
    return upper + upper.T


def _compare_rows(a: torch.Tensor, b: torch.Tensor) -> int:
    """Lexicographic comparison of two 1-D tensors: -1, 0 or 1."""
    differ = torch.nonzero(a != b)
    if differ.numel() == 0:
        return 0
    first = int(differ[0, 0])
    return -1 if float(a[first]) < float(b[first]) else 1


def canonical_order(
    scores: torch.Tensor, rows: tuple[torch.Tensor, ...], *, own_first: bool
) -> list[int]:
    """Indices sorted by ascending score; exact ties go to the own vector (index 0 when
    ``own_first``), then to the lexicographically smaller row, so the choice never depends on
    the order in which rows arrived."""
    values = scores.tolist()

    def compare(i: int, j: int) -> int:
        if values[i] != values[j]:
            return -1 if values[i] < values[j] else 1
        if own_first and (i == 0 or j == 0):
            return -1 if i == 0 else 1
        return _compare_rows(rows[i], rows[j])

    return sorted(range(len(values)), key=functools.cmp_to_key(compare))


def row_norms(matrix: torch.Tensor) -> torch.Tensor:
    """``[n]`` Euclidean norms of the rows of ``matrix`` as float64.

    Taken in the matrix's dtype first (a float64 reduction over float32 data is ~15x slower
    here); redone in float64 when a float32 square overflows to infinity or a non-zero row
    underflows to 0.
    """
    norms: torch.Tensor = torch.linalg.vector_norm(matrix, dim=1)
    if matrix.dtype != torch.float64 and not (
        bool(torch.isfinite(norms).all()) and bool((norms > 0).all())
    ):
        norms = torch.linalg.vector_norm(matrix, dim=1, dtype=torch.float64)
    return norms.to(torch.float64)
