import math
import threading

import pytest
import torch
import torch.nn.functional as F

from p2pfl.errors import ConfigError
from p2pfl.learn import (
    ArrayDataset,
    Learner,
    TorchLearner,
    build_node_learner,
    gaussian_mixture,
    mlp,
    train_test_split,
)
from p2pfl.params import flatten


def make_learner(seed: int = 0, **options: float) -> TorchLearner:
    data = gaussian_mixture(300, 6, 3, seed=1)
    train, test = train_test_split(data, 0.3, seed=2)
    params = {"lr": 0.1, "batch_size": 16, **options}
    return TorchLearner(mlp([6, 8, 3], seed=3), train, test, seed=seed, **params)  # type: ignore[arg-type]


def test_is_a_learner() -> None:
    learner = make_learner()
    assert isinstance(learner, Learner)
    assert learner.layout.size == learner.initial_vector().numel() == 6 * 8 + 8 + 8 * 3 + 3
    assert learner.num_samples == 210


def test_same_seed_same_inputs_identical_vectors() -> None:
    a, b = make_learner(seed=7, momentum=0.9), make_learner(seed=7, momentum=0.9)
    va, vb = a.initial_vector(), b.initial_vector()
    for _ in range(3):
        ra, rb = a.train(va, 10), b.train(vb, 10)
        assert torch.equal(ra.vector, rb.vector)
        assert ra.loss == rb.loss
        va, vb = ra.vector, rb.vector


def test_different_seed_different_vectors() -> None:
    a, b = make_learner(seed=1), make_learner(seed=2)
    assert not torch.equal(
        a.train(a.initial_vector(), 5).vector, b.train(b.initial_vector(), 5).vector
    )


def test_train_does_not_mutate_input() -> None:
    learner = make_learner()
    vector = learner.initial_vector()
    copy = vector.clone()
    result = learner.train(vector, 20)
    assert torch.equal(vector, copy)
    assert not torch.equal(result.vector, copy)
    assert result.vector.data_ptr() != vector.data_ptr()
    assert torch.equal(learner.initial_vector(), copy)


def test_result_counts() -> None:
    result = make_learner().train(make_learner().initial_vector(), 7)
    assert (result.steps, result.samples) == (7, 7 * 16)
    assert math.isfinite(result.loss) and result.loss > 0


def test_zero_steps_returns_a_copy() -> None:
    learner = make_learner()
    vector = learner.initial_vector()
    result = learner.train(vector, 0)
    assert torch.equal(result.vector, vector) and result.vector is not vector
    assert math.isnan(result.loss) and result.samples == 0


def test_evaluate_does_not_disturb_training() -> None:
    a, b = make_learner(seed=4), make_learner(seed=4)
    first = a.train(a.initial_vector(), 5).vector
    b_first = b.train(b.initial_vector(), 5).vector
    b.evaluate(b_first)
    b.evaluate(b.initial_vector())
    assert torch.equal(a.train(first, 5).vector, b.train(b_first, 5).vector)


def full_batch_learner(momentum: float) -> TorchLearner:
    data = gaussian_mixture(40, 4, 2, seed=0)
    return TorchLearner(
        mlp([4, 2], seed=0), data, data, lr=0.1, batch_size=40, momentum=momentum, seed=0
    )


def test_plain_sgd_keeps_no_state_between_calls() -> None:
    learner = full_batch_learner(0.0)
    vector = learner.initial_vector()
    # Each epoch reshuffles, so the same full batch is summed in another order: equal up to
    # rounding, not bit for bit.
    first, second = learner.train(vector, 1).vector, learner.train(vector, 1).vector
    assert torch.allclose(first, second, rtol=0, atol=1e-6)


def test_momentum_buffer_is_kept_across_calls() -> None:
    learner = full_batch_learner(0.9)
    vector = learner.initial_vector()
    first, second = learner.train(vector, 1).vector, learner.train(vector, 1).vector
    assert torch.equal(first, full_batch_learner(0.0).train(vector, 1).vector)
    assert not torch.allclose(first, second, rtol=0, atol=1e-3)


def test_digits_iid_single_node_learns() -> None:
    learner = build_node_learner("digits", {}, "iid", {}, 1, 0, [32], lr=0.1, batch_size=32, seed=0)
    before = learner.evaluate(learner.initial_vector())
    after = learner.evaluate(learner.train(learner.initial_vector(), 300).vector)
    assert before.accuracy < 0.3
    assert after.accuracy >= 0.85
    assert after.samples == round(0.2 * 1797)


def test_evaluate_in_batches_matches_direct_computation() -> None:
    data = gaussian_mixture(5000, 3, 4, seed=0)
    model = mlp([3, 4], seed=0)
    learner = TorchLearner(model, data, data, lr=0.1, batch_size=8, seed=0)
    result = learner.evaluate(learner.initial_vector())
    with torch.no_grad():
        logits = model(data.x)
    assert result.samples == 5000
    assert result.loss == pytest.approx(float(F.cross_entropy(logits, data.y)), rel=1e-5)
    assert result.accuracy == int((logits.argmax(1) == data.y).sum()) / 5000


def test_worker_thread_gives_same_result() -> None:
    results = []
    thread_learner = make_learner(seed=9)
    thread = threading.Thread(
        target=lambda: results.append(thread_learner.train(thread_learner.initial_vector(), 10))
    )
    thread.start()
    thread.join()
    learner = make_learner(seed=9)
    assert torch.equal(results[0].vector, learner.train(learner.initial_vector(), 10).vector)


def test_accepts_tensor_pairs() -> None:
    data = gaussian_mixture(50, 4, 2, seed=0)
    pair_learner = TorchLearner(
        mlp([4, 2], seed=0), (data.x, data.y), (data.x, data.y), lr=0.1, batch_size=8, seed=0
    )
    ds_learner = TorchLearner(mlp([4, 2], seed=0), data, data, lr=0.1, batch_size=8, seed=0)
    vector = pair_learner.initial_vector()
    assert torch.equal(pair_learner.train(vector, 3).vector, ds_learner.train(vector, 3).vector)


@pytest.mark.parametrize(
    ("key", "options"),
    [
        ("lr", {"lr": 0.0}),
        ("lr", {"lr": math.inf}),
        ("batch_size", {"batch_size": 0}),
        ("momentum", {"momentum": 1.0}),
        ("weight_decay", {"weight_decay": -1.0}),
    ],
)
def test_bad_hyperparameters_name_the_key(key: str, options: dict[str, float]) -> None:
    with pytest.raises(ConfigError) as info:
        make_learner(**options)
    assert info.value.key == key


def test_bad_data_and_calls_name_the_key() -> None:
    data = gaussian_mixture(20, 4, 2, seed=0)
    empty = ArrayDataset(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), 2)
    with pytest.raises(ConfigError) as info:
        TorchLearner(mlp([4, 2], seed=0), empty, data, lr=0.1, batch_size=4, seed=0)
    assert info.value.key == "train"
    with pytest.raises(ConfigError) as info:
        TorchLearner(mlp([4, 2], seed=0), data, (data.x, data.x), lr=0.1, batch_size=4, seed=0)
    assert info.value.key == "test"
    learner = make_learner()
    with pytest.raises(ConfigError) as info:
        learner.train(learner.initial_vector(), -1)
    assert info.value.key == "steps"
    with pytest.raises(ConfigError) as info:
        learner.evaluate(torch.zeros(3))
    assert info.value.key == "vector"


def test_update_rule_matches_torch_sgd() -> None:
    data = gaussian_mixture(30, 4, 3, seed=0)
    options = {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01}
    learner = TorchLearner(mlp([4, 5, 3], seed=0), data, data, batch_size=30, seed=11, **options)
    ours = learner.train(learner.initial_vector(), 4).vector

    reference = mlp([4, 5, 3], seed=0)
    optimizer = torch.optim.SGD(reference.parameters(), **options)
    generator = torch.Generator().manual_seed(11)
    for _ in range(4):
        index = torch.randperm(30, generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(reference(data.x[index]), data.y[index]).backward()
        optimizer.step()
    assert torch.allclose(ours, flatten(reference), rtol=0, atol=1e-6)


def test_a_model_that_does_not_fit_the_data_is_refused_at_construction() -> None:
    from torch import nn

    x, y = torch.zeros(4, 12), torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ConfigError, match=r"^model = 'Sequential': a module mapping \[N, 12\]"):
        TorchLearner(nn.Sequential(nn.Linear(7, 3)), (x, y), (x, y), lr=0.1, batch_size=2, seed=0)
    three_d = nn.Sequential(nn.Linear(12, 12), nn.Unflatten(1, (3, 4)))
    with pytest.raises(ConfigError, match=r"logits, not \(2, 3, 4\)"):
        TorchLearner(three_d, (x, y), (x, y), lr=0.1, batch_size=2, seed=0)


def test_batchnorm_running_statistics_are_the_modules_and_evaluation_uses_them() -> None:
    from torch import nn

    data = gaussian_mixture(40, 4, 2, seed=0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    learner = TorchLearner(model, data, data, lr=0.1, batch_size=8, seed=0)
    vector = learner.initial_vector()
    before = learner.evaluate(vector)
    learner.train(vector, 3)
    norm = learner.model[1]
    assert isinstance(norm, nn.BatchNorm1d) and int(norm.num_batches_tracked) == 3
    assert norm.running_mean is not None and bool(norm.running_mean.abs().sum() > 0)
    assert learner.evaluate(vector) != before  # the same parameters, the new statistics


def test_building_a_learner_leaves_the_random_stream_alone() -> None:
    # Dropout does not batch under vmap, so the learner's probe trains a plain step, which
    # draws dropout masks; a node's later training must not depend on that probe.
    data = gaussian_mixture(64, 3, 4, seed=0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 4))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    TorchLearner(model, data, data, lr=0.1, batch_size=8, seed=0)
    assert torch.equal(torch.get_rng_state(), before)
