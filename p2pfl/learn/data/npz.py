"""A researcher's own data: arrays in a numpy ``.npz`` file.

Layout (names of the arrays in the file)::

    x_train   [N, ...]  float16/32/64, or uint8 pixels (scaled to [0, 1])
    y_train   [N]       integer class labels >= 0
    x_test    [M, ...]  optional, with y_test: the common test set (else one is split off)
    y_test    [M]
    client    [N]       optional (or ``client_train``): each training example's owner,
                        integers or strings, for ``partition = "natural"``

``numpy.savez(path, x_train=..., y_train=..., x_test=..., y_test=..., client=...)`` writes
it. The file is opened with ``allow_pickle=False``: object arrays are refused, nothing in it
is unpickled, and each array's declared size is checked against ``max_bytes`` before it is
read.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np
import numpy.typing as npt

from p2pfl.checks import check_int
from p2pfl.errors import ConfigError
from p2pfl.learn.data.core import (
    ArrayDataset,
    SplitDataset,
    class_count,
    features_from_array,
    labels_from_array,
    owners_from_array,
)

DEFAULT_MAX_BYTES = 8 << 30
_OWNER_NAMES = ("client", "client_train")


def load_npz(
    path: str, *, num_classes: int | None = None, max_bytes: int = DEFAULT_MAX_BYTES
) -> ArrayDataset | SplitDataset:
    """Load the arrays of an ``.npz`` file (layout in the module documentation).

    Args:
        path: the ``.npz`` file.
        num_classes: number of classes; by default one more than the largest label.
        max_bytes: largest uncompressed size accepted for one array.

    Returns:
        A :class:`SplitDataset` when the file has ``x_test`` and ``y_test``, else an
        :class:`ArrayDataset` the federation splits.

    Raises:
        ConfigError: the file is missing or not an ``.npz``, an array is missing, of the
            wrong dtype or shape, larger than ``max_bytes``, or a label is out of range;
            the message names the array.
    """
    check_int("max_bytes", max_bytes, 1)
    file = Path(path)
    if not file.is_file():
        raise ConfigError("path", str(file), "an existing .npz file (numpy.savez)")
    try:
        archive = np.load(file, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ConfigError("path", str(file), f"an .npz file numpy can read ({exc})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ConfigError("path", str(file), "an .npz archive of named arrays, not one .npy array")
    with archive:
        names = set(archive.files)
        owner_names = [name for name in _OWNER_NAMES if name in names]
        if len(owner_names) > 1:
            raise ConfigError("path", str(file), "one owner array: client or client_train")
        has_test = "x_test" in names or "y_test" in names
        wanted = ["x_train", "y_train", *owner_names] + (["x_test", "y_test"] if has_test else [])
        missing = [name for name in wanted if name not in names]
        if missing:
            raise ConfigError(
                "path",
                str(file),
                f"no array {missing[0]!r}; the file needs x_train and y_train, optionally "
                "x_test with y_test, and client",
            )
        arrays = {name: _read(archive, file, name, max_bytes) for name in wanted}
    x = features_from_array("x_train", arrays["x_train"])
    y = labels_from_array("y_train", arrays["y_train"], len(x))
    owners = None
    if owner_names:
        owners = owners_from_array(owner_names[0], arrays[owner_names[0]], len(x))
    if not has_test:
        classes = class_count("y_train", y, num_classes)
        return ArrayDataset(x, y, classes, owners)
    x_test = features_from_array("x_test", arrays["x_test"])
    y_test = labels_from_array("y_test", arrays["y_test"], len(x_test))
    classes = class_count("y_train", y, num_classes, y_test)
    return SplitDataset(ArrayDataset(x, y, classes, owners), ArrayDataset(x_test, y_test, classes))


def _read(
    archive: np.lib.npyio.NpzFile, file: Path, name: str, max_bytes: int
) -> npt.NDArray[np.generic]:
    """Array ``name``, after its header's shape and dtype are checked against ``max_bytes``.

    numpy allocates what the header declares before reading the data, so the header is
    read first, on its own.
    """
    assert archive.zip is not None  # an open NpzFile holds its zip
    with archive.zip.open(f"{name}.npy") as member:
        try:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(member)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(member)
            else:
                raise ValueError(f"npy format version {version}; savez writes 1.0 or 2.0")
        except ValueError as exc:
            raise ConfigError(name, f"unreadable in {file.name}", f"a .npy array ({exc})") from None
    if dtype.hasobject:
        raise ConfigError(name, f"{dtype} array in {file.name}", "plain numbers, not objects")
    size = math.prod(shape) * dtype.itemsize
    if size > max_bytes:
        raise ConfigError(name, f"{size} bytes in {file.name}", f"at most max_bytes={max_bytes}")
    array: npt.NDArray[np.generic] = archive[name]
    return array
