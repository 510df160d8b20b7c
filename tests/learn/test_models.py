import pytest
import torch
from torch import nn

from p2pfl.errors import ConfigError
from p2pfl.learn.models import MAX_PARAMETERS, build_model, count_parameters, mlp
from p2pfl.params import flatten


def test_same_seed_same_parameters() -> None:
    assert torch.equal(flatten(mlp([8, 6, 3], seed=5)), flatten(mlp([8, 6, 3], seed=5)))


def test_different_seed_different_parameters() -> None:
    assert not torch.equal(flatten(mlp([8, 6, 3], seed=5)), flatten(mlp([8, 6, 3], seed=6)))


def test_global_rng_neither_read_nor_advanced() -> None:
    state = torch.get_rng_state()
    torch.manual_seed(0)
    first = flatten(mlp([4, 3], seed=1))
    torch.manual_seed(1)
    second = flatten(mlp([4, 3], seed=1))
    torch.set_rng_state(state)
    before = torch.get_rng_state()
    mlp([4, 3], seed=1)
    assert torch.equal(first, second)
    assert torch.equal(torch.get_rng_state(), before)


def test_structure_and_init_bounds() -> None:
    model = mlp([64, 32, 16, 10], seed=0)
    kinds = [type(m) for m in model.children()]
    assert kinds == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    first = model[0]
    assert isinstance(first, nn.Linear)
    assert first.weight.shape == (32, 64)
    assert float(first.weight.detach().abs().max()) <= 1 / 8
    assert float(first.weight.detach().std()) > 0.05
    assert model(torch.zeros(2, 64)).shape == (2, 10)


@pytest.mark.parametrize("sizes", [[], [4], [4, 0, 2], [4, -1], [4, 2.5]])
def test_bad_sizes_name_the_key(sizes: list[int]) -> None:
    with pytest.raises(ConfigError) as info:
        mlp(sizes, seed=0)
    assert info.value.key == "layer_sizes"


SHAPES = {"mlp": (64,), "cnn1d": (40,), "lenet5": (1, 28, 28), "cifar_cnn": (3, 32, 32)}


@pytest.mark.parametrize("name", list(SHAPES))
def test_registry_models_are_seeded_and_leave_the_global_rng_alone(name: str) -> None:
    shape = SHAPES[name]
    before = torch.get_rng_state()
    first = build_model(name, {}, shape, 10, seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(flatten(first), flatten(build_model(name, {}, shape, 10, seed=3)))
    assert not torch.equal(flatten(first), flatten(build_model(name, {}, shape, 10, seed=4)))
    assert first(torch.zeros(2, *shape)).shape == (2, 10)
    assert count_parameters(name, {}, shape, 10) == flatten(first).numel()


def test_known_architectures_have_their_published_sizes() -> None:
    # LeNet-5 on 28x28 MNIST: 61,706; the CNN of McMahan et al. 2017 on MNIST: 1,663,370.
    assert count_parameters("lenet5", {}, (1, 28, 28), 10) == 61_706
    assert count_parameters("cifar_cnn", {}, (1, 28, 28), 10) == 1_663_370


def test_default_mlp_is_the_old_mlp() -> None:
    built = build_model("mlp", {"hidden": [32]}, (64,), 10, seed=9)
    assert torch.equal(flatten(built), flatten(mlp([64, 32, 10], seed=9)))


def test_conv_init_follows_torch_default_bounds() -> None:
    model = build_model("cnn1d", {"channels": [16]}, (40,), 10, seed=0)
    conv = model.features[0]
    assert isinstance(conv, nn.Conv1d)
    bound = 1 / (1 * 5) ** 0.5
    assert float(conv.weight.detach().abs().max()) <= bound
    assert float(conv.weight.detach().abs().max()) > 0.8 * bound


def test_shapes_the_models_accept() -> None:
    assert build_model("cnn1d", {}, (2, 40), 3, seed=0)(torch.zeros(1, 2, 40)).shape == (1, 3)
    assert build_model("lenet5", {}, (64,), 10, seed=0)(torch.zeros(5, 64)).shape == (5, 10)
    assert build_model("mlp", {}, (1, 8, 8), 10, seed=0)(torch.zeros(5, 1, 8, 8)).shape == (5, 10)
    with pytest.raises(ConfigError, match="images"):
        build_model("lenet5", {}, (40,), 10, seed=0)
    with pytest.raises(ConfigError, match="1-D signals"):
        build_model("cnn1d", {}, (1, 8, 8), 10, seed=0)


def test_absurd_sizes_are_refused_before_allocating() -> None:
    assert count_parameters("mlp", {"hidden": [10**9]}, (64,), 10) > MAX_PARAMETERS
    with pytest.raises(ConfigError, match="at most 100,000,000 parameters") as info:
        build_model("mlp", {"hidden": [10**9]}, (64,), 10, seed=0)
    assert info.value.key == "model"


@pytest.mark.parametrize(
    ("name", "params", "key"),
    [
        ("resnet", {}, "model"),
        ("python:nope_module:f", {}, "model"),
        ("python:examples.my_model", {}, "model"),
        ("python:examples.my_model:missing", {}, "model"),
        ("mlp", {"channels": [3]}, "model_params.channels"),
        ("mlp", {"hidden": ["32"]}, "model_params.hidden"),
        ("cnn1d", {"channels": []}, "model_params.channels"),
    ],
)
def test_bad_model_names_and_params(name: str, params: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_model(name, params, (64,), 10, seed=0)
    assert info.value.key == key


def test_user_factory_without_seed_is_seeded_through_fork_rng() -> None:
    name = "python:examples.my_model:factory"
    before = torch.get_rng_state()
    first = build_model(name, {"width": 8}, (64,), 10, seed=1)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(flatten(first), flatten(build_model(name, {"width": 8}, (64,), 10, seed=1)))
    assert not torch.equal(
        flatten(first), flatten(build_model(name, {"width": 8}, (64,), 10, seed=2))
    )
    assert count_parameters(name, {"width": 8}, (64,), 10) == 64 * 8 + 8 + 16 + 8 * 10 + 10


def test_every_builder_words_an_unknown_parameter_alike() -> None:
    """A model, dataset or partition parameter that the builder does not take: one check,
    naming the dotted key, the value and what the builder takes (a node config's [data]
    table runs it too: tests/test_config.py)."""
    from p2pfl.learn import make_dataset, make_partition

    cases = [
        (
            lambda: build_model("mlp", {"width": 3}, (12,), 3, seed=0),
            "model_params.width = 3: model 'mlp' takes hidden (when switching models",
        ),
        (
            lambda: make_dataset("gaussian_mixture", width=3),
            "dataset_params.width = 3: "
            "dataset 'gaussian_mixture' takes n_samples, dim, num_classes, seed, separation",
        ),
        (
            lambda: make_partition("iid", [0, 1, 2], 2, seed=0, width=3),
            "partition_params.width = 3: partition 'iid' takes no parameters",
        ),
    ]
    for build, expected in cases:
        with pytest.raises(ConfigError) as info:
            build()
        assert str(info.value).startswith(expected), str(info.value)
