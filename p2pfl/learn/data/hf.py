"""A Hugging Face dataset already on disk: a ``save_to_disk`` folder or local parquet files.

Needs the ``datasets`` package (extra ``[hf]``); nothing is downloaded and nothing is
cached: saved folders are memory-mapped and parquet files are read into memory, not
through the library's cache. ``datasets`` reads only JSON and Arrow files, no pickles.

Image columns (the ``Image`` feature) become ``[C, H, W]`` float32 in ``[0, 1]``; other
columns (a list of floats, an ``Array2D``...) are taken as they are, uint8 scaled to
``[0, 1]``. Labels come from the ``label_column``; with a ``ClassLabel`` feature its number
of classes is used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from p2pfl.errors import ConfigError
from p2pfl.learn.data.core import (
    HF_EXTRA_HINT,
    ArrayDataset,
    SplitDataset,
    class_count,
    features_from_array,
    labels_from_array,
    owners_from_array,
    require,
)


def load_hf(
    path: str,
    *,
    image_column: str = "image",
    label_column: str = "label",
    owner_column: str | None = None,
    train_split: str = "train",
    test_split: str = "test",
    num_classes: int | None = None,
) -> ArrayDataset | SplitDataset:
    """Load a Hugging Face dataset from ``path``.

    Args:
        path: a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``,
            a ``.parquet`` file, or a folder of ``.parquet`` files (files whose name starts
            with ``train_split``/``test_split`` form those splits; otherwise all are one set).
        image_column: the column of examples (images or feature vectors).
        label_column: the column of integer class labels.
        owner_column: optional column of each example's owner (writer, client) for the
            ``natural`` partition.
        train_split: the split shared out over the nodes.
        test_split: the split used as the common test set, when the data has it.
        num_classes: by default the ``ClassLabel``'s, else one more than the largest label.

    Returns:
        A :class:`SplitDataset` when the data has ``test_split``, else an
        :class:`ArrayDataset` the federation splits.

    Raises:
        ConfigError: the path holds no dataset, a split or column is missing, or a column
            has the wrong type or shape.
        ImportError: the ``datasets`` package is not installed (extra ``[hf]``).
    """
    require("datasets", "hf", HF_EXTRA_HINT)
    train, test = _open(Path(path), train_split, test_split)
    columns = (image_column, label_column, owner_column)
    train_set = _to_arrays(train, *columns, num_classes)
    if test is None:
        return train_set
    test_set = _to_arrays(test, image_column, label_column, None, num_classes)
    classes = max(train_set.num_classes, test_set.num_classes)
    if num_classes is None and classes != train_set.num_classes:
        train_set = ArrayDataset(train_set.x, train_set.y, classes, train_set.owners)
    if num_classes is None and classes != test_set.num_classes:
        test_set = ArrayDataset(test_set.x, test_set.y, classes)
    return SplitDataset(train_set, test_set)


def _open(root: Path, train_split: str, test_split: str) -> tuple[Any, Any]:
    import datasets

    if (root / "dataset_dict.json").is_file():
        splits = datasets.load_from_disk(str(root))
        if train_split not in splits:
            raise ConfigError("train_split", train_split, f"one of {', '.join(sorted(splits))}")
        return splits[train_split], splits.get(test_split)
    if (root / "state.json").is_file():
        return datasets.load_from_disk(str(root)), None
    if root.is_file() and root.suffix == ".parquet":
        return _parquet([root]), None
    files = sorted(root.rglob("*.parquet")) if root.is_dir() else []
    if not files:
        raise ConfigError(
            "path",
            str(root),
            "a folder written by save_to_disk, a .parquet file or a folder of .parquet files",
        )
    train = [f for f in files if f.name.startswith(train_split)]
    test = [f for f in files if f.name.startswith(test_split)]
    if not train:
        return _parquet(files), None
    return _parquet(train), _parquet(test) if test else None


def _parquet(files: list[Path]) -> Any:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Read in memory and wrap, rather than Dataset.from_parquet, which writes a cache copy.
    table = pa.concat_tables([pq.read_table(f) for f in files])
    return datasets.Dataset(datasets.table.InMemoryTable(table))


def _to_arrays(
    split: Any, x_column: str, y_column: str, owner_column: str | None, num_classes: int | None
) -> ArrayDataset:
    import datasets

    wanted = [x_column, y_column] + ([owner_column] if owner_column is not None else [])
    for key, column in zip(("image_column", "label_column", "owner_column"), wanted, strict=False):
        if column not in split.column_names:
            raise ConfigError(key, column, f"one of the columns {', '.join(split.column_names)}")
    rows = split.select_columns(wanted).with_format("numpy")[0 : len(split)]
    x_raw = rows[x_column]
    if x_raw.dtype == object:  # images or lists of different sizes cannot be stacked
        raise ConfigError("image_column", x_column, "examples of one shape (resize them first)")
    if isinstance(split.features[x_column], datasets.Image):
        # decoded images are [N, H, W] (grey) or [N, H, W, C]: channels first for conv layers
        x_raw = x_raw[:, None] if x_raw.ndim == 3 else np.moveaxis(x_raw, -1, 1)
    x = features_from_array("image_column", x_raw)
    y = labels_from_array("label_column", rows[y_column], len(x))
    label_feature = split.features[y_column]
    if num_classes is None and isinstance(label_feature, datasets.ClassLabel):
        num_classes = int(label_feature.num_classes)
    classes = class_count("label_column", y, num_classes)
    owners = None
    if owner_column is not None:
        owners = owners_from_array("owner_column", rows[owner_column], len(x))
    return ArrayDataset(x, y, classes, owners)
