"""torchvision's image classification datasets, read from the files torchvision keeps on disk.

The files are read here, not through ``torchvision.datasets``: PyPI's torchvision does not
import beside every torch build (it needs its matching release), and torchvision reads
CIFAR from pickles, which p2pfl never unpickles. Layouts under ``root`` (what
``torchvision.datasets.NAME(root, download=True)`` leaves there):

- ``MNIST``, ``FashionMNIST``, ``KMNIST``: ``root/NAME/raw/{train,t10k}-{images-idx3,
  labels-idx1}-ubyte`` (each may also be gzip'd, with ``.gz`` appended);
- ``EMNIST``: ``root/EMNIST/raw/emnist-SPLIT-{train,test}-{images-idx3,labels-idx1}-ubyte``
  (images kept as stored, transposed, like torchvision);
- ``CIFAR10``: the binary version, ``root/cifar-10-batches-bin/{data_batch_1..5,test_batch}.bin``;
- ``CIFAR100``: the binary version, ``root/cifar-100-binary/{train,test}.bin``.

Only ``download = true`` uses torchvision: it fetches the MNIST-family files into ``root``,
after which they are read as above.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from p2pfl.checks import check_int
from p2pfl.errors import ConfigError
from p2pfl.learn.data.core import ArrayDataset, SplitDataset

DEFAULT_MAX_BYTES = 8 << 30
_IDX_UINT8 = 0x08
# EMNIST letters are labelled 1..26 (torchvision keeps class 0 as "N/A"), hence 27.
_EMNIST_CLASSES = {
    "byclass": 62,
    "bymerge": 47,
    "balanced": 47,
    "letters": 27,
    "digits": 10,
    "mnist": 10,
}
_CIFAR_PAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"


@dataclass(frozen=True, slots=True)
class _Layout:
    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    classes: int


def torchvision_dataset(
    name: str,
    root: str,
    *,
    split: str | None = None,
    label: str = "fine",
    download: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> SplitDataset:
    """A torchvision classification dataset with its own train/test split, images ``[C, H, W]``.

    Pixel values are scaled to ``[0, 1]``; MNIST-family images are ``[1, 28, 28]``, CIFAR
    ones ``[3, 32, 32]``.

    Args:
        name: ``MNIST``, ``FashionMNIST``, ``KMNIST``, ``EMNIST``, ``CIFAR10`` or ``CIFAR100``.
        root: the folder torchvision was (or would be) given as ``root``.
        split: EMNIST's split: byclass, bymerge, balanced, letters, digits or mnist.
        label: CIFAR100's labels: ``fine`` (100 classes) or ``coarse`` (20).
        download: fetch missing MNIST-family files with torchvision (needs network access
            and a torchvision that imports beside the installed torch).
        max_bytes: largest file size accepted, checked before anything is allocated.

    Raises:
        ConfigError: an argument is out of range, or files are missing or malformed (the
            message says which file and how to get it).
        ImportError: ``download`` is true and torchvision cannot be imported.
    """
    check_int("max_bytes", max_bytes, 1)
    layout = _layout(name, split, label)
    base = Path(root) / layout.folder
    missing = [f for f in (*layout.train, *layout.test) if _find(base / f) is None]
    if missing and download:
        _download(name, root, split)
        missing = [f for f in (*layout.train, *layout.test) if _find(base / f) is None]
    if missing:
        raise ConfigError("root", str(root), _missing_message(name, base, missing[0]))
    if name.startswith("CIFAR"):
        record = 3073 if name == "CIFAR10" else 3074
        train = _cifar([base / f for f in layout.train], record, label, layout.classes, max_bytes)
        test = _cifar([base / f for f in layout.test], record, label, layout.classes, max_bytes)
    else:
        train = _idx_pair(base, layout.train, layout.classes, max_bytes)
        test = _idx_pair(base, layout.test, layout.classes, max_bytes)
    return SplitDataset(train, test)


def _layout(name: str, split: str | None, label: str) -> _Layout:
    train: tuple[str, ...]
    test: tuple[str, ...]
    if name in ("MNIST", "FashionMNIST", "KMNIST"):
        if split is not None:
            raise ConfigError("split", split, f"no split for {name} (only EMNIST has splits)")
        train = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
        test = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
        return _Layout(f"{name}/raw", train, test, 10)
    if name == "EMNIST":
        if split not in _EMNIST_CLASSES:
            raise ConfigError("split", split, f"one of {', '.join(_EMNIST_CLASSES)} for EMNIST")
        train = tuple(f"emnist-{split}-train-{k}-ubyte" for k in ("images-idx3", "labels-idx1"))
        test = tuple(f"emnist-{split}-test-{k}-ubyte" for k in ("images-idx3", "labels-idx1"))
        return _Layout("EMNIST/raw", train, test, _EMNIST_CLASSES[split])
    if name == "CIFAR10":
        batches = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
        return _Layout("cifar-10-batches-bin", batches, ("test_batch.bin",), 10)
    if name == "CIFAR100":
        if label not in ("fine", "coarse"):
            raise ConfigError("label", label, "'fine' (100 classes) or 'coarse' (20)")
        classes = 100 if label == "fine" else 20
        return _Layout("cifar-100-binary", ("train.bin",), ("test.bin",), classes)
    allowed = "one of MNIST, FashionMNIST, KMNIST, EMNIST, CIFAR10, CIFAR100"
    raise ConfigError("name", name, allowed)


def _find(path: Path) -> Path | None:
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _missing_message(name: str, base: Path, first: str) -> str:
    if name.startswith("CIFAR"):
        python = "cifar-10-batches-py" if name == "CIFAR10" else "cifar-100-python"
        found = (base.parent / python).is_dir()
        pickled = f"{python} is the pickle version, which p2pfl never unpickles; " if found else ""
        archive = "cifar-10-binary.tar.gz" if name == "CIFAR10" else "cifar-100-binary.tar.gz"
        return (
            f"no {base / first}: {pickled}extract the binary version ({archive}, {_CIFAR_PAGE}) "
            f"into {base.parent}"
        )
    return (
        f"no {base / first}: put the {name} idx files in {base} (as torchvision.datasets."
        f"{name}(root, download=True) leaves them) or set data.params.download = true"
    )


def _download(name: str, root: str, split: str | None) -> None:
    if name.startswith("CIFAR"):
        raise ConfigError(
            "download",
            True,
            f"not for {name}: torchvision fetches its pickle version; "
            f"extract the binary version ({_CIFAR_PAGE}) under root instead",
        )
    try:
        import torchvision.datasets
    except (ImportError, RuntimeError) as exc:  # RuntimeError: built for another torch
        raise ImportError(
            f"download = true needs torchvision matching torch {torch.__version__} "
            f"(pip install torchvision): {str(exc).splitlines()[0] if str(exc) else exc!r}"
        ) from exc
    kind = getattr(torchvision.datasets, name)
    extra = {} if split is None else {"split": split}
    for train in (True, False):
        kind(root, train=train, download=True, **extra)


def _read_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of ``path``, gunzipped if it ends in ``.gz``, refused past ``max_bytes``."""
    size = path.stat().st_size
    if size > max_bytes:
        raise ConfigError("max_bytes", max_bytes, f"at least the {size} bytes of {path}")
    if path.suffix != ".gz":
        return path.read_bytes()
    chunks, total = [], 0
    with gzip.open(path, "rb") as handle:
        # in chunks: the unpacked size is known only at the end, and is bounded as we go
        while chunk := handle.read(1 << 24):
            total += len(chunk)
            if total > max_bytes:
                raise ConfigError("max_bytes", max_bytes, f"above the unpacked size of {path}")
            chunks.append(chunk)
    return b"".join(chunks)


def _idx(path: Path, ndim: int, max_bytes: int) -> npt.NDArray[np.uint8]:
    """An IDX file of unsigned bytes (the MNIST format): 2 zero bytes, type 0x08, ndim, dims."""
    data = _read_file(path, max_bytes)
    header = 4 + 4 * ndim
    if len(data) < header or data[:4] != bytes([0, 0, _IDX_UINT8, ndim]):
        raise ConfigError("root", str(path), f"an IDX file of uint8 with {ndim} dimensions")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    if len(data) - header != int(np.prod(dims, dtype=np.int64)):
        raise ConfigError(
            "root", str(path), f"{header} header bytes + the {dims} values it declares"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _idx_pair(base: Path, files: tuple[str, ...], classes: int, max_bytes: int) -> ArrayDataset:
    images_path, labels_path = (_find(base / f) for f in files)
    assert images_path is not None and labels_path is not None  # checked by the caller
    images = _idx(images_path, 3, max_bytes)
    labels = _idx(labels_path, 1, max_bytes)
    if len(labels) != len(images):
        raise ConfigError("root", str(labels_path), f"{len(images)} labels, one per image")
    return _dataset(images[:, None], labels, classes, labels_path)


def _cifar(
    paths: list[Path], record: int, label: str, classes: int, max_bytes: int
) -> ArrayDataset:
    """CIFAR's binary version: records of label byte(s) then 3072 pixels (R, G, B planes)."""
    rows = []
    for path in paths:
        data = _read_file(path, max_bytes)
        if len(data) % record:
            raise ConfigError("root", str(path), f"CIFAR binary records of {record} bytes")
        rows.append(np.frombuffer(data, dtype=np.uint8).reshape(-1, record))
    table = np.concatenate(rows)
    # CIFAR-100 records start with the coarse label, then the fine one.
    labels = table[:, 0] if record == 3073 or label == "coarse" else table[:, 1]
    images = table[:, record - 3072 :].reshape(-1, 3, 32, 32)
    return _dataset(images, labels, classes, paths[0])


def _dataset(
    images: npt.NDArray[np.uint8], labels: npt.NDArray[np.uint8], classes: int, path: Path
) -> ArrayDataset:
    if len(labels) and int(labels.max()) >= classes:
        raise ConfigError("root", str(path), f"labels in [0, {classes}); found {labels.max()}")
    x = torch.from_numpy(images.astype(np.float32) / np.float32(255.0))
    return ArrayDataset(x, torch.from_numpy(labels.astype(np.int64)), classes)
