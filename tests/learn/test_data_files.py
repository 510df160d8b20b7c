"""Loaders of files on disk, each on small files written here in the real format."""

import gzip
import io
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from p2pfl.errors import ConfigError
from p2pfl.learn.data.core import ArrayDataset, SplitDataset
from p2pfl.learn.data.npz import load_npz
from p2pfl.learn.data.vision import torchvision_dataset
from p2pfl.learn.datasets import make_dataset

# ---------------------------------------------------------------- npz


def write_npz(path: Path, **arrays: np.ndarray) -> str:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return str(path)


def test_npz_with_its_own_test_set_and_owners(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    file = write_npz(
        tmp_path / "mine.npz",
        x_train=rng.integers(0, 256, (30, 1, 4, 4), dtype=np.uint8),
        y_train=np.arange(30, dtype=np.int32) % 5,
        x_test=rng.integers(0, 256, (6, 1, 4, 4), dtype=np.uint8),
        y_test=np.arange(6, dtype=np.int32) % 5,
        client=np.repeat(["alice", "bob", "carol"], 10),
    )
    data = make_dataset("npz", path=file)
    assert isinstance(data, SplitDataset)
    assert data.train.x.shape == (30, 1, 4, 4) and data.test.x.shape == (6, 1, 4, 4)
    assert float(data.train.x.max()) <= 1.0 and data.train.x.dtype == torch.float32
    assert data.train.num_classes == 5 and data.test.y.dtype == torch.int64
    assert data.train.owner_array().tolist() == [0] * 10 + [1] * 10 + [2] * 10


def test_npz_without_test_set_is_one_dataset(tmp_path: Path) -> None:
    file = write_npz(
        tmp_path / "a.npz",
        x_train=np.ones((8, 3)),
        y_train=np.array([0, 1] * 4),
        client_train=np.arange(8),
    )
    data = load_npz(file, num_classes=4)
    assert isinstance(data, ArrayDataset) and data.num_classes == 4 and data.sample_shape == (3,)
    assert data.owner_array() is not None


@pytest.mark.parametrize(
    ("arrays", "key", "message"),
    [
        ({"y_train": np.zeros(4, dtype=np.int64)}, "path", "no array 'x_train'"),
        ({"x_train": np.zeros((4, 2))}, "path", "no array 'y_train'"),
        (
            {
                "x_train": np.zeros((4, 2)),
                "y_train": np.zeros(4, dtype=int),
                "x_test": np.zeros((2, 2)),
            },
            "path",
            "no array 'y_test'",
        ),
        (
            {"x_train": np.zeros((4, 2), dtype=np.int32), "y_train": np.zeros(4, dtype=int)},
            "x_train",
            "int32",
        ),
        ({"x_train": np.zeros((4, 2)), "y_train": np.zeros(4)}, "y_train", "integer labels"),
        ({"x_train": np.zeros((4, 2)), "y_train": np.zeros(3, dtype=int)}, "y_train", "shape"),
        ({"x_train": np.zeros((4, 2)), "y_train": np.array([0, 1, 2, -1])}, "y_train", ">= 0"),
        (
            {"x_train": np.zeros((4, 2)), "y_train": np.zeros(4, dtype=int), "client": np.zeros(4)},
            "client",
            "integer or string ids",
        ),
        (
            {
                "x_train": np.zeros((4, 2)),
                "y_train": np.zeros(4, dtype=int),
                "x_test": np.zeros((2, 3)),
                "y_test": np.zeros(2, dtype=int),
            },
            "x_test",
            "shape of the training examples",
        ),
    ],
)
def test_npz_bad_input_is_one_line(
    tmp_path: Path, arrays: dict[str, np.ndarray], key: str, message: str
) -> None:
    file = write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ConfigError, match=message) as info:
        load_npz(file)
    assert info.value.key == key and "\n" not in str(info.value)


def test_npz_labels_out_of_range_for_num_classes(tmp_path: Path) -> None:
    file = write_npz(tmp_path / "a.npz", x_train=np.zeros((3, 2)), y_train=np.array([0, 1, 7]))
    with pytest.raises(ConfigError, match=r"labels in \[0, 5\)") as info:
        load_npz(file, num_classes=5)
    assert info.value.key == "y_train"


def test_npz_refuses_objects_missing_files_and_big_arrays(tmp_path: Path) -> None:
    objects = write_npz(
        tmp_path / "o.npz",
        x_train=np.array([[1], "a"], dtype=object),
        y_train=np.zeros(2, dtype=int),
    )
    with pytest.raises(ConfigError, match="not objects") as info:
        load_npz(objects)
    assert info.value.key == "x_train"
    with pytest.raises(ConfigError, match="existing .npz") as info:
        load_npz(str(tmp_path / "absent.npz"))
    assert info.value.key == "path"
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="numpy can read"):
        load_npz(str(tmp_path / "junk.npz"))
    big = write_npz(
        tmp_path / "b.npz", x_train=np.zeros((100, 100)), y_train=np.zeros(100, dtype=int)
    )
    with pytest.raises(ConfigError, match="max_bytes") as info:
        load_npz(big, max_bytes=1000)
    assert info.value.key == "x_train"


def test_npz_header_claiming_a_huge_array_is_refused_before_allocating(tmp_path: Path) -> None:
    # A few bytes whose .npy header declares 8 TB: numpy would allocate what it declares.
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f8", "fortran_order": False, "shape": (10**6, 10**6)}
    )
    path = tmp_path / "forged.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x_train.npy", b"\x93NUMPY\x01\x00" + header.getvalue()[8:] + bytes(16))
        archive.writestr("y_train.npy", b"")
    with pytest.raises(ConfigError, match="8000000000000 bytes") as info:
        load_npz(str(path))
    assert info.value.key == "x_train"


# ---------------------------------------------------------------- torchvision layouts


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX format of MNIST: 0, 0, type 0x08 (uint8), ndim, big-endian int32 dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def write_mnist(root: Path, name: str = "MNIST", *, gz: bool = False, n: int = 12) -> None:
    raw = root / name / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, count in (("train", n), ("t10k", n // 2)):
        files = {
            f"{prefix}-images-idx3-ubyte": rng.integers(0, 256, (count, 28, 28)),
            f"{prefix}-labels-idx1-ubyte": np.arange(count) % 10,
        }
        for file, array in files.items():
            data = idx_bytes(array)
            if gz:
                (raw / f"{file}.gz").write_bytes(gzip.compress(data))
            else:
                (raw / file).write_bytes(data)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("name", ["MNIST", "FashionMNIST", "KMNIST"])
def test_mnist_layout(tmp_path: Path, name: str, gz: bool) -> None:
    write_mnist(tmp_path, name, gz=gz)
    data = torchvision_dataset(name, str(tmp_path))
    assert data.train.x.shape == (12, 1, 28, 28) and data.test.x.shape == (6, 1, 28, 28)
    assert float(data.train.x.min()) >= 0.0 and float(data.train.x.max()) <= 1.0
    assert data.train.y.tolist() == [i % 10 for i in range(12)] and data.train.num_classes == 10
    raw = (
        tmp_path / name / "raw" / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    ).read_bytes()
    pixels = np.frombuffer(gzip.decompress(raw) if gz else raw, np.uint8, offset=16)
    assert torch.equal(data.train.x.flatten(), torch.from_numpy(pixels / np.float32(255)).float())


def test_emnist_letters_layout(tmp_path: Path) -> None:
    raw = tmp_path / "EMNIST" / "raw"
    raw.mkdir(parents=True)
    for part in ("train", "test"):
        (raw / f"emnist-letters-{part}-images-idx3-ubyte").write_bytes(
            idx_bytes(np.zeros((4, 28, 28)))
        )
        (raw / f"emnist-letters-{part}-labels-idx1-ubyte").write_bytes(
            idx_bytes(np.array([1, 26, 3, 4]))
        )
    data = make_dataset("torchvision", name="EMNIST", root=str(tmp_path), split="letters")
    assert isinstance(data, SplitDataset) and data.train.num_classes == 27
    with pytest.raises(ConfigError) as info:
        torchvision_dataset("EMNIST", str(tmp_path))
    assert info.value.key == "split"


def cifar_records(labels: list[int], label_bytes: int) -> bytes:
    rows = []
    for i, label in enumerate(labels):
        head = bytes([label // 5, label]) if label_bytes == 2 else bytes([label])
        # red plane all i, green all 100, blue all 200
        rows.append(head + bytes([i]) * 1024 + bytes([100]) * 1024 + bytes([200]) * 1024)
    return b"".join(rows)


def test_cifar10_binary_layout(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    for b in range(1, 6):
        (folder / f"data_batch_{b}.bin").write_bytes(cifar_records([b, 9], 1))
    (folder / "test_batch.bin").write_bytes(cifar_records([0], 1))
    data = torchvision_dataset("CIFAR10", str(tmp_path))
    assert data.train.x.shape == (10, 3, 32, 32) and data.test.x.shape == (1, 3, 32, 32)
    assert data.train.y.tolist() == [1, 9, 2, 9, 3, 9, 4, 9, 5, 9]
    first = data.train.x[1]  # second record of batch 1: red plane 1/255
    assert float(first[0, 0, 0]) == pytest.approx(1 / 255)
    assert float(first[1, 5, 5]) == pytest.approx(100 / 255) and float(
        first[2, 31, 31]
    ) == pytest.approx(200 / 255)


def test_cifar100_fine_and_coarse(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    (folder / "train.bin").write_bytes(cifar_records([99, 12], 2))
    (folder / "test.bin").write_bytes(cifar_records([7], 2))
    fine = torchvision_dataset("CIFAR100", str(tmp_path))
    coarse = torchvision_dataset("CIFAR100", str(tmp_path), label="coarse")
    assert fine.train.y.tolist() == [99, 12] and fine.train.num_classes == 100
    assert coarse.train.y.tolist() == [19, 2] and coarse.train.num_classes == 20


def test_missing_root_is_one_line_saying_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        torchvision_dataset("MNIST", str(tmp_path / "nowhere"))
    message = str(info.value)
    assert info.value.key == "root" and "\n" not in message
    assert "train-images-idx3-ubyte" in message and "download = true" in message


def test_cifar_pickle_version_is_refused(tmp_path: Path) -> None:
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"\x80\x04 pickle")
    with pytest.raises(ConfigError, match="never unpickles.*binary version") as info:
        torchvision_dataset("CIFAR10", str(tmp_path))
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="pickle version") as info:
        torchvision_dataset("CIFAR10", str(tmp_path), download=True)
    assert info.value.key == "download"


def test_malformed_files_are_refused(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    labels = tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-1])  # one byte short of what the header says
    with pytest.raises(ConfigError, match="header bytes"):
        torchvision_dataset("MNIST", str(tmp_path))
    labels.write_bytes(idx_bytes(np.array([0, 1, 2])))  # 3 labels for 12 images
    with pytest.raises(ConfigError, match="12 labels"):
        torchvision_dataset("MNIST", str(tmp_path))
    labels.write_bytes(idx_bytes(np.full(12, 10)))
    with pytest.raises(ConfigError, match=r"labels in \[0, 10\)"):
        torchvision_dataset("MNIST", str(tmp_path))
    labels.write_bytes(b"\x00\x00\x0d\x01" + bytes(8))  # float type code, not uint8
    with pytest.raises(ConfigError, match="IDX file of uint8"):
        torchvision_dataset("MNIST", str(tmp_path))
    with pytest.raises(ConfigError, match="at least the"):
        torchvision_dataset("MNIST", str(tmp_path), max_bytes=100)
    with pytest.raises(ConfigError) as info:
        torchvision_dataset("ImageNet", str(tmp_path))
    assert info.value.key == "name"


def test_download_needs_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    with pytest.raises(ImportError, match="pip install torchvision") as info:
        torchvision_dataset("MNIST", str(tmp_path), download=True)
    assert "\n" not in str(info.value)


def test_download_fetches_with_torchvision_then_reads_the_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stand-in for torchvision.datasets: what matters here is that download = true asks
    # it for both splits into root, and that the files it leaves are then read.
    calls: list[tuple[str, bool]] = []

    class FakeMNIST:
        def __init__(self, root: str, *, train: bool, download: bool) -> None:
            calls.append((root, train))
            if not (Path(root) / "MNIST").exists():
                write_mnist(Path(root))

    fake = type(sys)("torchvision.datasets")
    fake.MNIST = FakeMNIST
    package = type(sys)("torchvision")
    package.datasets = fake
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", fake)
    data = torchvision_dataset("MNIST", str(tmp_path), download=True)
    assert calls == [(str(tmp_path), True), (str(tmp_path), False)]
    assert len(data.train) == 12
    torchvision_dataset("MNIST", str(tmp_path), download=True)
    assert len(calls) == 2  # files present: nothing fetched again


# ---------------------------------------------------------------- Hugging Face on disk


@pytest.fixture
def hf_images() -> Any:
    datasets = pytest.importorskip("datasets", reason="the [hf] extra")
    from PIL import Image

    rng = np.random.default_rng(0)
    features = datasets.Features(
        {
            "img": datasets.Image(),
            "digit": datasets.ClassLabel(num_classes=4),
            "writer": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_dict(
        {
            "img": [
                Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)) for _ in range(12)
            ],
            "digit": [i % 3 for i in range(12)],
            "writer": [f"w{i % 4}" for i in range(12)],
        },
        features=features,
    )


def test_hf_save_to_disk_dataset(tmp_path: Path, hf_images: Any) -> None:
    hf_images.save_to_disk(str(tmp_path / "single"))
    data = make_dataset(
        "hf",
        path=str(tmp_path / "single"),
        image_column="img",
        label_column="digit",
        owner_column="writer",
    )
    assert isinstance(data, ArrayDataset)
    assert data.x.shape == (12, 3, 6, 5) and float(data.x.max()) <= 1.0
    assert data.num_classes == 4  # from the ClassLabel, though label 3 never occurs
    assert data.owner_array().tolist() == [i % 4 for i in range(12)]
    first = np.asarray(hf_images[0]["img"])
    assert torch.allclose(data.x[0], torch.from_numpy(first / np.float32(255)).permute(2, 0, 1))


def test_hf_dataset_dict_and_parquet(tmp_path: Path, hf_images: Any) -> None:
    import datasets

    splits = datasets.DatasetDict({"train": hf_images, "test": hf_images.select(range(5))})
    splits.save_to_disk(str(tmp_path / "dict"))
    data = make_dataset("hf", path=str(tmp_path / "dict"), image_column="img", label_column="digit")
    assert isinstance(data, SplitDataset) and len(data.train) == 12 and len(data.test) == 5
    (tmp_path / "pq").mkdir()
    hf_images.to_parquet(str(tmp_path / "pq" / "train-00000.parquet"))
    hf_images.select(range(3)).to_parquet(str(tmp_path / "pq" / "test-00000.parquet"))
    cache = Path(datasets.config.HF_DATASETS_CACHE)
    before = sorted(cache.rglob("*")) if cache.exists() else []
    parquet = make_dataset(
        "hf", path=str(tmp_path / "pq"), image_column="img", label_column="digit"
    )
    after = sorted(cache.rglob("*")) if cache.exists() else []
    assert after == before  # read in memory: nothing written to the library's cache
    assert isinstance(parquet, SplitDataset) and len(parquet.test) == 3
    assert torch.equal(parquet.train.x, data.train.x) and parquet.train.num_classes == 4
    one = make_dataset(
        "hf",
        path=str(tmp_path / "pq" / "test-00000.parquet"),
        image_column="img",
        label_column="digit",
    )
    assert isinstance(one, ArrayDataset) and len(one) == 3


def test_hf_bad_input(tmp_path: Path, hf_images: Any) -> None:
    hf_images.save_to_disk(str(tmp_path / "single"))
    with pytest.raises(ConfigError, match="one of the columns img, digit, writer") as info:
        make_dataset("hf", path=str(tmp_path / "single"))
    assert info.value.key == "image_column"
    with pytest.raises(ConfigError) as info:
        make_dataset("hf", path=str(tmp_path / "single"), image_column="img", label_column="writer")
    assert info.value.key == "label_column"
    with pytest.raises(ConfigError, match="save_to_disk") as info:
        make_dataset("hf", path=str(tmp_path / "empty"))
    assert info.value.key == "path"


def test_hf_without_the_extra_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'p2pfl-gossip\[hf\]'") as info:
        make_dataset("hf", path="anything")
    assert "\n" not in str(info.value)


def test_hf_grey_images_get_one_channel(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets", reason="the [hf] extra")
    from PIL import Image

    grey = [Image.fromarray(np.full((4, 3), 10 * i, dtype=np.uint8), mode="L") for i in range(5)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    split = datasets.Dataset.from_dict({"image": grey, "label": [0, 1, 2, 1, 0]}, features=features)
    split.to_parquet(str(tmp_path / "grey.parquet"))
    data = make_dataset("hf", path=str(tmp_path / "grey.parquet"))
    assert isinstance(data, ArrayDataset)
    assert data.sample_shape == (1, 4, 3) and data.num_classes == 3
    assert float(data.x[4].max()) == pytest.approx(40 / 255)
