import pytest
import torch
from torch import nn

from p2pfl.errors import ConfigError
from p2pfl.learn.models import mlp
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
