"""Read-only sequences whose items are computed on access (implicit neighbour lists)."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import TypeVar, overload

T = TypeVar("T")


class IndexedView(Sequence[T]):
    """A sequence defined by its length and its i-th item; slices are materialised lists."""

    __slots__ = ()

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def _item(self, index: int) -> T:
        """The item at ``0 <= index < len(self)``."""

    @overload
    def __getitem__(self, index: int) -> T: ...
    @overload
    def __getitem__(self, index: slice) -> list[T]: ...
    def __getitem__(self, index: int | slice) -> T | list[T]:
        """Raises:
        IndexError: ``index`` is out of range.
        """
        size = len(self)
        if isinstance(index, slice):
            return [self._item(at) for at in range(size)[index]]
        at = index + size if index < 0 else index
        if not 0 <= at < size:
            raise IndexError(index)
        return self._item(at)
