"""Sizes known before anything is allocated: a model's parameter count, a dataset's shape, a
model frame's bytes.

One place for both drivers' early refusals: the simulator's memory estimate
(:mod:`sim.footprint`) and a node's check of its model against ``max_frame_bytes``
(:meth:`p2pfl.config.NodeConfig.check_frame_size`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

WIRE_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
FRAME_OVERHEAD_BYTES = 1024
"""Length prefix and signed header (keys, signature, tensor spec, counters) of a model frame,
rounded up; measured headers are about 300 bytes."""
VIEW_RECORD_BYTES = 200
"""A membership record piggybacked on a model (id, counter, status, signature), rounded up."""


def parameter_count(
    model: str, model_params: Mapping[str, Any], input_shape: Sequence[int], num_classes: int
) -> int:
    """Parameters of the model the learner keys name, for inputs of ``input_shape``: built-in
    models are counted on the meta device (no storage is allocated, however large).

    Raises:
        ConfigError: the model or one of its parameters is unknown or invalid, or the model
            is larger than any learner would build (:data:`p2pfl.learn.models.MAX_PARAMETERS`).
    """
    from p2pfl.learn.models import check_model_size, count_parameters

    count = count_parameters(model, model_params, input_shape, num_classes)
    check_model_size(model, count)
    return count


def _param(params: Mapping[str, Any], builder: Any, key: str) -> Any:
    """``params[key]``, or the builder's default for it."""
    return params.get(key, inspect.signature(builder).parameters[key].default)


def _synthetic_leaf_shape(params: Mapping[str, Any], builder: Any) -> tuple[int, int, int]:
    # Client sizes are min_size + lognormal(size_mean, size_sigma): count their mean.
    mean = math.exp(
        _param(params, builder, "size_mean") + _param(params, builder, "size_sigma") ** 2 / 2
    )
    examples = _param(params, builder, "num_clients") * (_param(params, builder, "min_size") + mean)
    return (
        int(examples),
        _param(params, builder, "num_features"),
        _param(params, builder, "num_classes"),
    )


_SHAPES: dict[str, Callable[[Mapping[str, Any], Any], tuple[int, int, int]]] = {
    "digits": lambda _params, _builder: (1797, 64, 10),
    "gaussian_mixture": lambda params, builder: (
        _param(params, builder, "n_samples"),
        _param(params, builder, "dim"),
        _param(params, builder, "num_classes"),
    ),
    "mnist1d": lambda params, builder: (_param(params, builder, "n_samples"), 40, 10),
    "synthetic_leaf": _synthetic_leaf_shape,
}
"""Datasets whose shape follows from their parameters: (examples, features, classes)."""


def dataset_shape(name: str, params: Mapping[str, Any]) -> tuple[int, tuple[int, ...], int]:
    """(examples, shape of one example, classes) of a dataset: computed from its parameters for the
    generated datasets (nothing is generated, however large), else read by loading it (a
    file-backed dataset is as large as its file).

    Raises:
        ConfigError: the dataset is unknown or its parameters are invalid.
        ImportError: loading the dataset needs an optional dependency that is missing.
    """
    from p2pfl.learn.datasets import DATASETS, load_split

    builder = DATASETS.get(name)
    shape = _SHAPES.get(name)
    if builder is not None and shape is not None:
        computed: tuple[int, int, int] | None
        try:
            computed = shape(params, builder)
        except (TypeError, ValueError):
            computed = None  # a malformed value: loading the dataset reports it by key
        if computed is not None and all(
            isinstance(value, int) and not isinstance(value, bool) for value in computed
        ):
            examples, features, classes = computed
            return examples, (features,), classes
    # The run's own loading: builder defaults, the source's test split, keys named as the
    # run names them. Only file-backed datasets come here; they are as large as their files.
    train, test = load_split(
        name, params, test_fraction=0.2, data_seed=0, split_seed=0, num_clients=1
    )
    return len(train) + len(test), tuple(train.sample_shape), train.num_classes


def model_frame_bytes(params: int, *, wire_dtype: str = "float32", view_entries: int = 0) -> int:
    """Bytes of a frame carrying a model of ``params`` parameters (with ``view_entries``
    membership records piggybacked)."""
    payload = params * WIRE_DTYPE_BYTES[wire_dtype]
    return payload + FRAME_OVERHEAD_BYTES + view_entries * VIEW_RECORD_BYTES
