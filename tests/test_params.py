import math

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from p2pfl.errors import ConfigError, DecodeError
from p2pfl.learn.models import mlp
from p2pfl.params import ParamLayout, TensorSlot, flatten, layout_of, load_vector


def test_layout_of_mlp_follows_state_dict_order() -> None:
    model = mlp([5, 4, 3], seed=0)
    layout = layout_of(model)
    assert layout.names == ("0.weight", "0.bias", "2.weight", "2.bias")
    assert [s.shape for s in layout.slots] == [(4, 5), (4,), (3, 4), (3,)]
    assert [s.offset for s in layout.slots] == [0, 20, 24, 36]
    assert layout.size == 39
    assert [layout.is_weight(s) for s in layout.slots] == [True, False, True, False]


def test_batchnorm_buffers_are_not_in_layout() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    layout = layout_of(model)
    assert layout.names == tuple(
        k
        for k in model.state_dict()
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    )
    assert "1.weight" in layout.names
    assert layout.size == sum(p.numel() for p in model.parameters())


def test_tied_parameter_appears_once() -> None:
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    b.weight = a.weight
    model = nn.Sequential(a, b)
    assert layout_of(model).names == ("0.weight", "0.bias", "1.bias")
    vector = torch.arange(layout_of(model).size, dtype=torch.float32)
    load_vector(model, vector)
    assert torch.equal(flatten(model), vector)


def test_flatten_load_round_trip() -> None:
    source, target = mlp([6, 5, 3], seed=1), mlp([6, 5, 3], seed=2)
    vector = flatten(source)
    assert vector.dtype == torch.float32 and vector.ndim == 1
    assert not torch.equal(vector, flatten(target))
    load_vector(target, vector)
    assert torch.equal(flatten(target), vector)
    for (name, p), (name2, q) in zip(
        source.named_parameters(), target.named_parameters(), strict=True
    ):
        assert name == name2 and torch.equal(p, q)


def test_flatten_is_a_copy_and_load_does_not_alias() -> None:
    model = mlp([3, 2], seed=0)
    vector = flatten(model)
    vector += 1.0
    assert not torch.equal(flatten(model), vector)
    load_vector(model, vector)
    vector.zero_()
    assert flatten(model).abs().sum() > 0


def test_flatten_converts_to_float32() -> None:
    model = mlp([3, 2], seed=0).double()
    vector = flatten(model)
    assert vector.dtype == torch.float32
    load_vector(model, vector * 2)
    assert model[0].weight.dtype == torch.float64
    assert torch.equal(flatten(model), vector * 2)


def test_load_vector_leaves_buffers_alone() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    model.train()
    model(torch.randn(8, 2, generator=torch.Generator().manual_seed(0)))
    running = model[1].running_mean.clone()
    load_vector(model, torch.zeros(layout_of(model).size))
    assert torch.equal(model[1].running_mean, running)
    assert float(flatten(model).abs().sum()) == 0.0


@pytest.mark.parametrize(
    "vector",
    [torch.zeros(38), torch.zeros(40), torch.zeros(39, 1), torch.zeros(39, dtype=torch.int64)],
    ids=["short", "long", "2-D", "int"],
)
def test_load_vector_rejects_mismatch(vector: torch.Tensor) -> None:
    model = mlp([5, 4, 3], seed=0)
    before = flatten(model)
    with pytest.raises(ConfigError) as info:
        load_vector(model, vector)
    assert info.value.key == "vector"
    assert torch.equal(flatten(model), before)


def test_size_mismatch_message_names_expected_size() -> None:
    with pytest.raises(ConfigError, match="39 elements"):
        load_vector(mlp([5, 4, 3], seed=0), torch.zeros(7))


def test_wire_round_trip_through_msgpack() -> None:
    layout = layout_of(mlp([7, 5, 2], seed=0))
    wire = msgpack.unpackb(msgpack.packb(layout.to_wire()))
    assert ParamLayout.from_wire(wire) == layout


@pytest.mark.parametrize(
    "data",
    [
        {"a": [1]},
        [["a"]],
        [[1, [2]]],
        [["a", [2, -1]]],
        [["a", [2.0]]],
        [["a", [True]]],
        [["a", 3]],
        [["a", [2]], ["a", [3]]],
    ],
)
def test_from_wire_rejects_malformed(data: object) -> None:
    with pytest.raises(DecodeError):
        ParamLayout.from_wire(data)


def test_layout_rejects_gaps() -> None:
    with pytest.raises(ValueError, match="starts at"):
        ParamLayout((TensorSlot("a", (2,), 0, 2), TensorSlot("b", (2,), 3, 2)))


shapes = st.lists(
    st.tuples(
        st.text(min_size=1, max_size=8),
        st.lists(st.integers(0, 5), max_size=3).map(tuple),
    ),
    max_size=6,
    unique_by=lambda item: item[0],
)


@settings(max_examples=100, deadline=None)
@given(shapes)
def test_layout_slices_tile_the_vector(pairs: list[tuple[str, tuple[int, ...]]]) -> None:
    layout = ParamLayout.from_shapes(pairs)
    assert layout.size == sum(math.prod(shape) for _, shape in pairs)
    covered = [i for s in layout.slices() for i in range(layout.size)[s]]
    assert covered == list(range(layout.size))
    assert ParamLayout.from_wire(msgpack.unpackb(msgpack.packb(layout.to_wire()))) == layout
