import pytest
import torch

from p2pfl.errors import ConfigError
from p2pfl.learn import TorchLearner, build_node_learner, derive_seed

MIXTURE = {"n_samples": 600, "dim": 8, "num_classes": 4}


def node(index: int, num_nodes: int = 3, **options: object) -> TorchLearner:
    arguments: dict[str, object] = {
        "dataset": "gaussian_mixture",
        "dataset_params": MIXTURE,
        "partition": "dirichlet",
        "partition_params": {"alpha": 0.5},
        "num_nodes": num_nodes,
        "node_index": index,
        "model": [16],
        "lr": 0.1,
        "batch_size": 8,
        "seed": 42,
        **options,
    }
    return build_node_learner(**arguments)  # type: ignore[arg-type]


def test_nodes_share_test_set_and_init_and_split_the_train_set() -> None:
    learners = [node(i) for i in range(3)]
    assert sum(learner.num_samples for learner in learners) == 480
    initial = learners[0].initial_vector()
    assert initial.numel() == 8 * 16 + 16 + 16 * 4 + 4
    for learner in learners[1:]:
        assert torch.equal(learner.initial_vector(), initial)
        assert learner.evaluate(initial) == learners[0].evaluate(initial)


def test_a_lone_node_keeps_its_own_share_not_the_whole_pool() -> None:
    # The federation's shares are views of one pool (the simulator gathers from it); a live
    # node's learner holds a copy of its rows only, so the other nodes' examples are freed.
    learner = node(1)
    share = learner._train_x
    assert share.untyped_storage().nbytes() == share.numel() * share.element_size()
    assert learner.num_samples < 480


def test_same_config_same_learner() -> None:
    a, b = node(1), node(1)
    va = a.train(a.initial_vector(), 5).vector
    vb = b.train(b.initial_vector(), 5).vector
    assert torch.equal(va, vb)


def test_init_seed_overrides_shared_init() -> None:
    default = node(0).initial_vector()
    assert not torch.equal(node(0, init_seed=7).initial_vector(), default)
    assert torch.equal(node(0, init_seed=7).initial_vector(), node(2, init_seed=7).initial_vector())


def test_linear_model_from_empty_hidden_list() -> None:
    assert node(0, model=[]).layout.size == 8 * 4 + 4


def test_derive_seed_streams_are_distinct_and_stable() -> None:
    assert derive_seed(1, 2) == derive_seed(1, 2)
    assert len({derive_seed(1, 2), derive_seed(1, 3), derive_seed(2, 2), derive_seed(1, 2, 0)}) == 4
    assert 0 <= derive_seed(1, 2) < 2**63


@pytest.mark.parametrize(
    ("key", "options"),
    [
        ("node_index", {"node_index": 3}),
        ("node_index", {"node_index": -1}),
        ("num_nodes", {"num_nodes": 0}),
        ("model", {"model": [0]}),
        ("seed", {"seed": -5}),
        ("dataset", {"dataset": "cifar"}),
        ("partition", {"partition": "zipf"}),
        ("partition_params.alpha", {"partition_params": {}}),
        ("test_fraction", {"test_fraction": 1.0}),
        ("lr", {"lr": -0.1}),
    ],
)
def test_bad_config_names_the_key(key: str, options: dict[str, object]) -> None:
    with pytest.raises(ConfigError) as info:
        node(0, **options)
    assert info.value.key == key
