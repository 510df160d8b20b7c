"""Flat parameter vectors <-> torch modules.

Every model travels between peers as one 1-D float32 vector. A :class:`ParamLayout` says where
each named tensor lives inside that vector, in a fixed order: the order in which the module's
``state_dict()`` lists its *parameters*. Buffers (BatchNorm's ``running_mean``, ``running_var``,
``num_batches_tracked``) are local state and never part of the vector. A parameter shared by
two submodules appears once, under its first name, as in ``named_parameters()``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from p2pfl.errors import ConfigError, DecodeError


@dataclass(frozen=True, slots=True)
class TensorSlot:
    """Where one named tensor lives inside a flat parameter vector."""

    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int

    @property
    def end(self) -> int:
        """One past the last element of the slot."""
        return self.offset + self.numel

    @property
    def ndim(self) -> int:
        """Number of dimensions of the tensor."""
        return len(self.shape)

    @property
    def span(self) -> slice:
        """The slot's range as a ``slice`` into the flat vector."""
        return slice(self.offset, self.end)


@dataclass(frozen=True, slots=True)
class ParamLayout:
    """The ordered slots of a flat parameter vector; slots are contiguous and start at 0.

    Two peers can exchange vectors exactly when their layouts compare equal.
    """

    slots: tuple[TensorSlot, ...]

    def __post_init__(self) -> None:
        offset = 0
        names: set[str] = set()
        for slot in self.slots:
            if slot.offset != offset:
                raise ValueError(f"slot {slot.name!r} starts at {slot.offset}, expected {offset}")
            if slot.numel != math.prod(slot.shape) or any(d < 0 for d in slot.shape):
                raise ValueError(f"slot {slot.name!r}: numel {slot.numel} != prod{slot.shape}")
            if slot.name in names:
                raise ValueError(f"slot name {slot.name!r} appears twice")
            names.add(slot.name)
            offset += slot.numel

    @classmethod
    def from_shapes(cls, shapes: Sequence[tuple[str, Sequence[int]]]) -> ParamLayout:
        """Build a layout from ``(name, shape)`` pairs in vector order.

        Raises:
            ValueError: a name repeats or a dimension is negative.
        """
        slots = []
        offset = 0
        for name, shape in shapes:
            dims = tuple(int(d) for d in shape)
            numel = math.prod(dims)
            slots.append(TensorSlot(name, dims, offset, numel))
            offset += numel
        return cls(tuple(slots))

    @property
    def size(self) -> int:
        """Total number of elements in the flat vector."""
        return self.slots[-1].end if self.slots else 0

    @property
    def names(self) -> tuple[str, ...]:
        """Slot names in vector order."""
        return tuple(slot.name for slot in self.slots)

    def slices(self) -> tuple[slice, ...]:
        """One ``slice`` per slot, in vector order."""
        return tuple(slot.span for slot in self.slots)

    def is_weight(self, slot: TensorSlot) -> bool:
        """Whether ``slot`` is a weight matrix or kernel (``ndim >= 2``), not a bias or scale."""
        return slot.ndim >= 2

    def to_wire(self) -> list[list[object]]:
        """A msgpack-friendly form: ``[[name, [dims...]], ...]``; offsets follow from the order."""
        return [[slot.name, list(slot.shape)] for slot in self.slots]

    @classmethod
    def from_wire(cls, data: object) -> ParamLayout:
        """Inverse of :meth:`to_wire`, checking every field since the data came from a peer.

        Raises:
            DecodeError: ``data`` is not a list of ``[str, [non-negative int, ...]]`` pairs
                with distinct names.
        """
        if not isinstance(data, list | tuple):
            raise DecodeError(f"layout must be a list, got {type(data).__name__}")
        shapes: list[tuple[str, tuple[int, ...]]] = []
        for i, entry in enumerate(data):
            if not (isinstance(entry, list | tuple) and len(entry) == 2):
                raise DecodeError(f"layout entry {i} must be [name, shape]")
            name, shape = entry
            if not isinstance(name, str):
                raise DecodeError(f"layout entry {i}: name must be a string")
            if not isinstance(shape, list | tuple) or not all(
                type(d) is int and d >= 0 for d in shape
            ):
                raise DecodeError(f"layout entry {i} ({name!r}): shape must be non-negative ints")
            shapes.append((name, tuple(shape)))
        try:
            return cls.from_shapes(shapes)
        except ValueError as exc:
            raise DecodeError(f"layout: {exc}") from exc


def _parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    # named_parameters() walks modules in the same order as state_dict() and drops buffers
    # and duplicate (tied) parameters, which is exactly the layout we promise.
    return list(module.named_parameters())


def layout_of(module: nn.Module) -> ParamLayout:
    """The layout of ``module``'s parameters in ``state_dict()`` order, buffers excluded."""
    return ParamLayout.from_shapes([(name, tuple(p.shape)) for name, p in _parameters(module)])


def flatten(module: nn.Module) -> Tensor:
    """Copy ``module``'s parameters into a new 1-D float32 CPU tensor, in layout order."""
    params = [
        p.detach().reshape(-1).to(device="cpu", dtype=torch.float32) for _, p in _parameters(module)
    ]
    if not params:
        return torch.empty(0, dtype=torch.float32)
    return torch.cat(params)


def load_vector(module: nn.Module, vector: Tensor) -> None:
    """Copy a flat vector into ``module``'s parameters in place (buffers are left alone).

    Args:
        module: the module to overwrite.
        vector: a 1-D tensor with exactly ``layout_of(module).size`` elements; it is not
            modified and no parameter keeps a reference to it.

    Raises:
        ConfigError: ``vector`` is not a 1-D floating-point tensor of the module's size.
    """
    params = _parameters(module)
    size = sum(p.numel() for _, p in params)
    if not isinstance(vector, Tensor):
        raise ConfigError("vector", type(vector).__name__, "a torch.Tensor")
    if vector.ndim != 1 or vector.numel() != size:
        raise ConfigError(
            "vector", f"tensor of shape {tuple(vector.shape)}", f"a 1-D tensor of {size} elements"
        )
    if not vector.is_floating_point():
        raise ConfigError("vector", f"tensor of dtype {vector.dtype}", "a floating-point tensor")
    offset = 0
    with torch.no_grad():
        for _, p in params:
            n = p.numel()
            p.copy_(vector[offset : offset + n].view(p.shape))
            offset += n
