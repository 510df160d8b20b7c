"""ArrayDataset beyond flat vectors, owners through subset and split, SplitDataset, array checks."""

import numpy as np
import pytest
import torch

from p2pfl.errors import ConfigError
from p2pfl.learn.data.core import (
    ArrayDataset,
    SplitDataset,
    features_from_array,
    labels_from_array,
    owners_from_array,
    train_test_split,
)
from p2pfl.learn.datasets import load_split


def images(n: int, owners: bool = False) -> ArrayDataset:
    x = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1).expand(n, 3, 4, 5).clone()
    y = torch.arange(n) % 3
    who = torch.arange(n) % 7 if owners else None
    return ArrayDataset(x, y, 3, who)


def test_images_keep_their_shape() -> None:
    ds = images(10)
    assert ds.sample_shape == (3, 4, 5) and ds.dim == 60 and len(ds) == 10
    sub = ds.subset([4, 2])
    assert sub.x.shape == (2, 3, 4, 5) and sub.x[:, 0, 0, 0].tolist() == [4.0, 2.0]


def test_vectors_keep_dim() -> None:
    ds = ArrayDataset(torch.zeros(5, 64), torch.zeros(5, dtype=torch.long), 10)
    assert ds.sample_shape == (64,) and ds.dim == 64 and ds.owner_array() is None


@pytest.mark.parametrize(
    ("key", "x", "y", "owners"),
    [
        ("x", torch.zeros(5), torch.zeros(5, dtype=torch.long), None),
        ("x", torch.zeros(5, 2, dtype=torch.float64), torch.zeros(5, dtype=torch.long), None),
        ("y", torch.zeros(5, 2), torch.zeros(4, dtype=torch.long), None),
        ("y", torch.zeros(5, 2), torch.full((5,), 3), None),
        ("owners", torch.zeros(5, 2), torch.zeros(5, dtype=torch.long), torch.zeros(4).long()),
        ("owners", torch.zeros(5, 2), torch.zeros(5, dtype=torch.long), torch.zeros(5)),
    ],
)
def test_bad_fields_name_the_field(
    key: str, x: torch.Tensor, y: torch.Tensor, owners: torch.Tensor | None
) -> None:
    with pytest.raises(ConfigError) as info:
        ArrayDataset(x, y, 3, owners)
    assert info.value.key == key


def test_owners_survive_subset_and_split() -> None:
    ds = images(140, owners=True)
    sub = ds.subset([3, 10, 17])
    assert sub.owners is not None and sub.owners.tolist() == [3, 3, 3]
    train, test = train_test_split(ds, 0.25, seed=0)
    assert train.owners is not None and test.owners is not None
    # each example keeps its own owner (row i holds value i, owner i % 7)
    for part in (train, test):
        rows = part.x[:, 0, 0, 0].long()
        assert torch.equal(part.owners, rows % 7)
    assert len(test) == 35  # 20 per owner: 5 each
    assert np.bincount(test.owner_array(), minlength=7).tolist() == [5] * 7


def test_split_by_owner_leaves_every_owner_training_data() -> None:
    # owners of 1, 2 and 50 examples: a label-stratified split could take a small owner whole
    owners = torch.tensor([0] + [1, 1] + [2] * 50)
    n = len(owners)
    ds = ArrayDataset(torch.zeros(n, 2), torch.zeros(n, dtype=torch.long), 1, owners)
    for seed in range(20):
        train, test = train_test_split(ds, 0.5, seed=seed)
        assert set(train.owner_array().tolist()) == {0, 1, 2}
        assert len(train) + len(test) == n


def test_split_dataset_checks_both_halves_agree() -> None:
    a = ArrayDataset(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), 2)
    with pytest.raises(ConfigError, match="shape of the training examples"):
        SplitDataset(a, ArrayDataset(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), 2))
    with pytest.raises(ConfigError, match="same number of classes"):
        SplitDataset(a, ArrayDataset(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), 3))


def test_features_scale_pixels_and_refuse_other_dtypes() -> None:
    pixels = np.array([[0, 255], [51, 102]], dtype=np.uint8)
    assert features_from_array("x", pixels).flatten().tolist() == pytest.approx([0, 1, 0.2, 0.4])
    assert features_from_array("x", np.ones((2, 2))).dtype == torch.float32
    for bad, message in (
        (np.ones((2, 2), dtype=np.int32), "int32 array"),
        (np.ones(3, dtype=np.float32), "shape"),
        (np.array([[np.nan, 1.0]]), "NaN"),
    ):
        with pytest.raises(ConfigError, match=message) as info:
            features_from_array("x_train", bad)
        assert info.value.key == "x_train"


def test_labels_and_owners_from_arrays() -> None:
    assert labels_from_array("y", np.array([2, 0], dtype=np.uint8), 2).dtype == torch.int64
    with pytest.raises(ConfigError, match="integer labels"):
        labels_from_array("y", np.array([0.0, 1.0]), 2)
    with pytest.raises(ConfigError, match="labels >= 0"):
        labels_from_array("y", np.array([0, -1]), 2)
    codes = owners_from_array("client", np.array(["w9", "w1", "w9"]), 3)
    assert codes.tolist() == [1, 0, 1]
    with pytest.raises(ConfigError, match="integer or string ids"):
        owners_from_array("client", np.array([0.5, 1.0, 2.0]), 3)


def test_load_split_names_config_keys() -> None:
    with pytest.raises(ConfigError) as info:
        load_split(
            "gaussian_mixture",
            {"n_samples": 10, "dim": 0, "num_classes": 2},
            test_fraction=0.2,
            data_seed=0,
            split_seed=0,
            num_clients=2,
        )
    assert info.value.key == "data.params.dim"
