"""Sizes known before anything is allocated: a model's parameter count, a dataset's shape, a
model frame's bytes.

One place for both drivers' early refusals: the simulator's memory estimate
(:mod:`sim.footprint`) and a node's check of its model against ``max_frame_bytes``
(:meth:`p2pfl.config.NodeConfig.check_frame_size`).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

WIRE_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
FRAME_OVERHEAD_BYTES = 1024
"""Length prefix and signed header (keys, signature, tensor spec, counters) of a model frame,
rounded up; measured headers are about 300 bytes."""
VIEW_RECORD_BYTES = 200
"""A membership record piggybacked on a model (id, counter, status, signature), rounded up."""


def parameter_count(layer_sizes: Sequence[int]) -> int:
    """Parameters of the MLP ``[features, *hidden, classes]``, counted on a model built on the
    meta device (no storage is allocated, however large)."""
    sizes = list(layer_sizes)
    with torch.device("meta"):
        layers = [nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
    return sum(parameter.numel() for layer in layers for parameter in layer.parameters())


def dataset_shape(name: str, params: Mapping[str, Any]) -> tuple[int, int, int]:
    """(examples, features, classes) of a dataset, read from its parameters when its builder
    takes ``n_samples``, ``dim`` and ``num_classes`` (nothing is generated), else by building
    it (the fixed-size datasets are small).

    Raises:
        ConfigError: the dataset is unknown or its parameters are invalid.
    """
    from p2pfl.learn.datasets import DATASETS, make_dataset

    builder = DATASETS.get(name)
    wanted = ("n_samples", "dim", "num_classes")
    if builder is not None:
        signature = inspect.signature(builder).parameters
        values = [params.get(key, signature[key].default) for key in wanted if key in signature]
        if len(values) == len(wanted) and all(
            isinstance(value, int) and not isinstance(value, bool) for value in values
        ):
            return values[0], values[1], values[2]
    data = make_dataset(name, **dict(params))
    return len(data), data.dim, data.num_classes


def model_frame_bytes(params: int, *, wire_dtype: str = "float32", view_entries: int = 0) -> int:
    """Bytes of a frame carrying a model of ``params`` parameters (with ``view_entries``
    membership records piggybacked)."""
    payload = params * WIRE_DTYPE_BYTES[wire_dtype]
    return payload + FRAME_OVERHEAD_BYTES + view_entries * VIEW_RECORD_BYTES
