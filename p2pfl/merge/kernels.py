"""Fast coordinate-wise order statistics of a few rows: cache-blocked sorting networks.

Theory of operation. ``torch.sort``/``torch.median`` along ``dim=0`` of a short, wide stack
(``k`` rows of ``P`` columns, ``k`` small) is slow on CPU: each column is a tiny independent
sort. A *comparator network* turns the sort into a fixed sequence of compare-exchanges
``(i, j)``: row ``i`` becomes ``minimum(row_i, row_j)`` and row ``j`` ``maximum(row_i, row_j)``,
each a vectorised elementwise op over all columns at once. The columns are processed in
blocks small enough that the working rows stay in the L2 cache, so every input row is read
from memory once and all the compare-exchanges run in cache.

Networks. Batcher's odd-even merge sort for the next power of two, with every comparator that
touches a row ``>= n`` dropped: since a comparator always sends the minimum to the lower
index, padding rows of ``+inf`` would never move, so those comparators are no-ops and the
pruned network sorts any ``n`` rows. For trimmed sums a second candidate is a tournament that
moves the ``b`` smallest and ``b`` largest values to the ends (the middle stays unsorted,
which is all a sum needs); the cheaper of the two is used. Either network is then pruned
backwards to the outputs actually needed, and a comparator whose minimum (or maximum) is
never read computes only the other half.

Every result is exact: a comparator network only permutes values per column, so the order
statistics equal ``torch.sort``'s bit for bit (``-0.0`` and ``+0.0`` compare equal, as in
``torch.sort``). Sums and means of order statistics are accumulated in float64. Inputs must be
NaN-free (the merge rules drop non-finite rows first); infinities are sorted correctly.
Beyond :data:`MAX_NETWORK_ROWS` rows, for dtypes numpy lacks, or for narrow inputs, the
functions fall back to ``torch.sort`` with the same results.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch

MAX_NETWORK_ROWS = 32
"""Above this many rows the functions fall back to ``torch.sort``."""

MIN_NETWORK_COLUMNS = 2048
"""Below this many columns ``torch.sort`` is cheaper than the per-op Python overhead."""

CACHE_BYTES = 1 << 20
"""Bytes of scratch rows a column block may occupy (half a core's L2 on the reference machine)."""

Method = Literal["auto", "network", "sort"]
Op = tuple[int, int, bool, bool]
"""A compare-exchange ``(i, j, keep_min, keep_max)``: which halves are read later."""

_NUMPY_DTYPES = (torch.float32, torch.float64)


@functools.cache
def batcher_network(n: int) -> tuple[tuple[int, int], ...]:
    """Batcher's odd-even merge sort comparators for ``n`` rows, in execution order.

    Raises:
        ValueError: ``n`` is negative.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    size = 1
    while size < n:
        size *= 2
    comparators: list[tuple[int, int]] = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        comparators.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return tuple((lo, hi) for lo, hi in comparators if hi < n)


@functools.cache
def selection_network(n: int, b: int) -> tuple[tuple[int, int], ...]:
    """Comparators moving the ``b`` smallest values (sorted) to rows ``0..b-1`` and the ``b``
    largest (sorted) to rows ``n-b..n-1``; rows ``b..n-b-1`` then hold the rest, unsorted.

    Raises:
        ValueError: ``n < 2b`` or ``b < 0``.
    """
    if b < 0 or n < 2 * b:
        raise ValueError(f"selection network needs 0 <= 2b <= n, got n={n}, b={b}")
    comparators: list[tuple[int, int]] = []
    for t in range(b):
        top = n - 1 - t
        comparators.extend((t, j) for j in range(t + 1, top + 1))
        comparators.extend((j, top) for j in range(t + 1, top))
    return tuple(comparators)


def _prune(network: Sequence[tuple[int, int]], outputs: frozenset[int]) -> tuple[Op, ...]:
    """Drop comparators whose results are never read; mark the halves that are."""
    needed = set(outputs)
    kept: list[Op] = []
    for lo, hi in reversed(network):
        keep_min, keep_max = lo in needed, hi in needed
        if keep_min or keep_max:
            kept.append((lo, hi, keep_min, keep_max))
            needed.update((lo, hi))
    kept.reverse()
    return tuple(kept)


def _cost(program: Sequence[Op]) -> int:
    return sum(int(keep_min) + int(keep_max) for _, _, keep_min, keep_max in program)


@functools.cache
def sorted_program(n: int, ranks: frozenset[int]) -> tuple[Op, ...]:
    """The pruned sorting network leaving the values of rank ``ranks`` at those rows."""
    return _prune(batcher_network(n), ranks)


@functools.cache
def middle_program(n: int, b: int) -> tuple[Op, ...]:
    """The cheapest network leaving the multiset of ranks ``b..n-b-1`` in rows ``b..n-b-1``."""
    middle = frozenset(range(b, n - b))
    candidates = (_prune(batcher_network(n), middle), _prune(selection_network(n, b), middle))
    return min(candidates, key=_cost)


def _rows_of(rows: Sequence[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
    """Check and list the rows: 1-D, equal length, one floating dtype."""
    listed = list(rows.unbind(0)) if isinstance(rows, torch.Tensor) else list(rows)
    if not listed:
        raise ValueError("order statistics need at least one row")
    first = listed[0]
    if isinstance(rows, torch.Tensor) and rows.ndim != 2:
        raise ValueError(f"expected a [n, P] tensor, got shape {tuple(rows.shape)}")
    for row in listed:
        if row.ndim != 1 or row.shape != first.shape or row.dtype != first.dtype:
            raise ValueError("rows must be 1-D tensors of one length and dtype")
    if not first.is_floating_point():
        raise ValueError(f"rows must be floating point, got {first.dtype}")
    return listed


def _use_network(rows: list[torch.Tensor], method: Method) -> bool:
    if method == "sort":
        return False
    supported = (
        len(rows) <= MAX_NETWORK_ROWS
        and rows[0].dtype in _NUMPY_DTYPES
        and rows[0].device.type == "cpu"
    )
    if method == "network":
        if not supported:
            raise ValueError(
                f"the network path takes <= {MAX_NETWORK_ROWS} float32/float64 CPU rows, "
                f"got {len(rows)} rows of {rows[0].dtype}"
            )
        return True
    return supported and rows[0].numel() >= MIN_NETWORK_COLUMNS


def _block_columns(n: int, itemsize: int, block: int | None) -> int:
    if block is not None:
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        return block
    columns = CACHE_BYTES // ((n + 2) * itemsize)
    return int(min(max(columns, 4096), 65536))


Finish = Callable[[list[np.ndarray], int, int], None]


def _run(
    program: Sequence[Op], rows: list[torch.Tensor], block: int | None, finish: Finish
) -> None:
    """Run ``program`` block by block; ``finish(registers, start, stop)`` consumes each block.

    The input rows are only read: every comparator writes into scratch buffers.
    """
    arrays = [row.detach().contiguous().numpy() for row in rows]
    n, size = len(arrays), arrays[0].shape[0]
    columns = _block_columns(n, arrays[0].itemsize, block)
    pool = np.empty((n + 2, min(columns, max(size, 1))), dtype=arrays[0].dtype)
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf is NaN, as in torch
        _blocks(program, arrays, columns, pool, finish)


def _blocks(
    program: Sequence[Op], arrays: list[np.ndarray], columns: int, pool: np.ndarray, finish: Finish
) -> None:
    n, size = len(arrays), arrays[0].shape[0]
    for start in range(0, size, columns):
        stop = min(size, start + columns)
        width = stop - start
        registers: list[np.ndarray] = [array[start:stop] for array in arrays]
        scratch = [False] * n
        free = [pool[i, :width] for i in range(n + 2)]
        for lo, hi, keep_min, keep_max in program:
            a, b = registers[lo], registers[hi]
            if keep_min:
                low = free.pop()
                np.minimum(a, b, out=low)
            if keep_max:
                high = free.pop()
                np.maximum(a, b, out=high)
            if scratch[lo]:
                free.append(a)
            if scratch[hi]:
                free.append(b)
            scratch[lo] = scratch[hi] = False
            if keep_min:
                registers[lo], scratch[lo] = low, True
            if keep_max:
                registers[hi], scratch[hi] = high, True
        finish(registers, start, stop)


def _check_ranks(n: int, ranks: Sequence[int]) -> tuple[int, ...]:
    checked = tuple(int(r) for r in ranks)
    for rank in checked:
        if not 0 <= rank < n:
            raise ValueError(f"rank {rank} is outside 0..{n - 1}")
    return checked


def sort_rows(
    rows: Sequence[torch.Tensor] | torch.Tensor,
    *,
    method: Method = "auto",
    block: int | None = None,
) -> torch.Tensor:
    """The rows sorted per column, as a new ``[n, P]`` tensor (what ``torch.sort(dim=0)`` gives).

    Args:
        rows: ``n`` 1-D tensors of one length and dtype, or an ``[n, P]`` tensor; NaN-free.
        method: ``"network"`` forces the sorting network, ``"sort"`` forces ``torch.sort``,
            ``"auto"`` picks the network for ``n <= 32`` float32/float64 rows of at least
            :data:`MIN_NETWORK_COLUMNS` columns.
        block: columns per cache block (default: sized to :data:`CACHE_BYTES`).

    Raises:
        ValueError: no rows, rows of different shapes or dtypes, or ``method="network"``
            for inputs it cannot take.
    """
    return order_statistics(rows, range(len(_rows_of(rows))), method=method, block=block)


def order_statistics(
    rows: Sequence[torch.Tensor] | torch.Tensor,
    ranks: Sequence[int],
    *,
    method: Method = "auto",
    block: int | None = None,
) -> torch.Tensor:
    """The values of the given ranks (0 = smallest) per column, as a new ``[len(ranks), P]``.

    Raises:
        ValueError: bad rows or method (see :func:`sort_rows`), or a rank outside ``0..n-1``.
    """
    listed = _rows_of(rows)
    n = len(listed)
    wanted = _check_ranks(n, ranks)
    if not _use_network(listed, method):
        ordered = torch.sort(torch.stack(listed), dim=0).values
        return ordered[list(wanted)].clone()
    out = torch.empty((len(wanted), listed[0].numel()), dtype=listed[0].dtype)
    target = out.numpy()
    program = sorted_program(n, frozenset(wanted))

    def finish(registers: list[np.ndarray], start: int, stop: int) -> None:
        for i, rank in enumerate(wanted):
            target[i, start:stop] = registers[rank]

    _run(program, listed, block, finish)
    return out


def coordinate_median(
    rows: Sequence[torch.Tensor] | torch.Tensor,
    *,
    method: Method = "auto",
    block: int | None = None,
) -> torch.Tensor:
    """The per-column median as a new 1-D tensor; for an even count, the mean of the two
    middle values (computed in float64, so it never overflows and lies between them).

    Raises:
        ValueError: bad rows or method (see :func:`sort_rows`).
    """
    listed = _rows_of(rows)
    n = len(listed)
    lower, upper = (n - 1) // 2, n // 2
    if not _use_network(listed, method):
        ordered = torch.sort(torch.stack(listed), dim=0).values
        if lower == upper:
            return ordered[lower].clone()
        return _midpoint(ordered[lower], ordered[upper])
    dtype = listed[0].dtype
    out = torch.empty(listed[0].numel(), dtype=dtype)
    target = out.numpy()
    program = sorted_program(n, frozenset((lower, upper)))
    columns = _block_columns(n, listed[0].element_size(), block)
    acc = np.empty(min(columns, max(target.shape[0], 1)), dtype=np.float64)

    def finish(registers: list[np.ndarray], start: int, stop: int) -> None:
        if lower == upper:
            target[start:stop] = registers[lower]
            return
        buffer = acc[: stop - start]
        if dtype == torch.float64:
            np.multiply(registers[lower], 0.5, out=buffer)
            buffer += registers[upper] * 0.5
        else:
            np.add(registers[lower], registers[upper], out=buffer, dtype=np.float64)
            buffer *= 0.5
        target[start:stop] = buffer

    _run(program, listed, block, finish)
    return out


def _midpoint(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    if low.dtype == torch.float64:
        return low * 0.5 + high * 0.5
    return ((low.double() + high.double()) * 0.5).to(low.dtype)


def trimmed_mean(
    rows: Sequence[torch.Tensor] | torch.Tensor,
    b: int,
    *,
    method: Method = "auto",
    block: int | None = None,
) -> torch.Tensor:
    """Per column, the mean of the values left after dropping the ``b`` smallest and the
    ``b`` largest, as a new 1-D tensor (summed in float64).

    Raises:
        ValueError: ``n <= 2b`` or ``b < 0`` (the message names both), or bad rows or method
            (see :func:`sort_rows`).
    """
    listed = _rows_of(rows)
    n = len(listed)
    if b < 0 or n <= 2 * b:
        raise ValueError(f"trimmed mean needs n > 2b rows and b >= 0, got n={n}, b={b}")
    count = n - 2 * b
    dtype = listed[0].dtype
    if not _use_network(listed, method):
        ordered = torch.sort(torch.stack(listed), dim=0).values
        kept = ordered[b : n - b].to(torch.float64)
        return (kept.sum(dim=0) / count).to(dtype)
    out = torch.empty(listed[0].numel(), dtype=dtype)
    target = out.numpy()
    program = middle_program(n, b)
    columns = _block_columns(n, listed[0].element_size(), block)
    acc = np.empty(min(columns, max(target.shape[0], 1)), dtype=np.float64)

    def finish(registers: list[np.ndarray], start: int, stop: int) -> None:
        buffer = acc[: stop - start]
        buffer[...] = registers[b]
        for rank in range(b + 1, n - b):
            np.add(buffer, registers[rank], out=buffer)
        if count > 1:
            buffer /= count
        target[start:stop] = buffer

    _run(program, listed, block, finish)
    return out
