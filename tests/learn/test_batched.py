"""Batched training of many nodes equals training each node one by one, for any model."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from p2pfl.errors import ConfigError
from p2pfl.learn import MinibatchSampler, TorchLearner
from p2pfl.learn.batched import BatchedLearner, LinearStack, Shares
from p2pfl.learn.functional import loss_and_logit_gradient
from p2pfl.learn.models import build_model
from p2pfl.learn.optim import OptimizerSettings
from p2pfl.params import flatten, layout_of

NODES = 3
STEPS = 5
BATCH = 8

# A node (TorchLearner) trains its one row through BatchedLearner.train_rows. A Linear/ReLU
# stack's rows and the one-by-one fallback's give the same bits in any group; a vmapped
# convolution over three rows sums in another order than over one, so there the agreement
# is to rounding. Adam divides each gradient coordinate by its own running scale, so a
# coordinate whose gradient is at float-rounding level can move by up to lr per step in
# either direction; at lr 1e-3 LeNet-5 differs by 1.7e-5 after 5 steps. The agreement is
# checked at lr 1e-4, where it is 2e-6.
OPTIMIZERS = {
    "sgd": OptimizerSettings(name="sgd", lr=0.05),
    "sgd-nesterov": OptimizerSettings(
        name="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3
    ),
    "adam": OptimizerSettings(name="adam", lr=1e-4, weight_decay=1e-4),
    "adamw": OptimizerSettings(name="adamw", lr=1e-4, weight_decay=0.01),
    "sam": OptimizerSettings(name="sam", lr=0.05, rho=0.05, momentum=0.9, weight_decay=1e-3),
}


class _Normed(nn.Module):
    """GroupNorm after a convolution and LayerNorm before the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 4, 3, padding=1)
        self.group = nn.GroupNorm(2, 4)
        self.layer = nn.LayerNorm(4 * 12)
        self.head = nn.Linear(4 * 12, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.group(self.conv(x.unsqueeze(1))))
        return self.head(self.layer(h.flatten(1)))  # type: ignore[no-any-return]


def _normed(seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _Normed()


MODELS: dict[str, tuple[Callable[[int], nn.Module], tuple[int, ...]]] = {
    "mlp": (lambda seed: build_model("mlp", {"hidden": [16]}, (12,), 3, seed=seed), (12,)),
    "cnn1d": (lambda seed: build_model("cnn1d", {"channels": [4, 4]}, (12,), 3, seed=seed), (12,)),
    "lenet5": (lambda seed: build_model("lenet5", {}, (1, 12, 12), 3, seed=seed), (1, 12, 12)),
    "group-layer-norm": (_normed, (12,)),
}


def _data(shape: tuple[int, ...], node: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(100 + node)
    size = 20 + 3 * node
    return torch.randn(size, *shape, generator=generator), torch.randint(
        0, 3, (size,), generator=generator
    )


def _compare(
    build: Callable[[int], nn.Module],
    shape: tuple[int, ...],
    settings: OptimizerSettings,
    *,
    calls: int = 1,
    rounds: tuple[int, ...] = (0, 0, 0),
    exact: bool = False,
) -> BatchedLearner:
    """Train NODES nodes together and each alone as a node does; ``exact``: bit for bit."""
    data = [_data(shape, node) for node in range(NODES)]
    starts = torch.stack([flatten(build(node)) for node in range(NODES)])
    singles = [
        TorchLearner(build(0), data[n], data[n], batch_size=BATCH, optimizer=settings, seed=n)
        for n in range(NODES)
    ]
    learner = BatchedLearner(build(0), settings, shape)
    samplers = [MinibatchSampler(len(data[n][1]), BATCH, seed=n) for n in range(NODES)]
    vectors = starts
    expected = list(starts)
    for call in range(calls):
        vectors, losses = learner.train(
            list(range(NODES)),
            vectors,
            data,
            samplers,
            STEPS,
            [r + call for r in rounds],
        )
        for n in range(NODES):
            result = singles[n].train(expected[n], STEPS, round=rounds[n] + call)
            expected[n] = result.vector
            assert abs(float(losses[n]) - result.loss) < 1e-5
            if exact:  # the simulator records the node's mean loss as a float32
                assert float(losses[n]) == float(torch.tensor(result.loss, dtype=torch.float32))
    for n in range(NODES):
        if exact:
            assert torch.equal(vectors[n], expected[n]), f"node {n}"
        assert torch.allclose(vectors[n], expected[n], atol=1e-5, rtol=0), (
            f"node {n}: {(vectors[n] - expected[n]).abs().max()}"
        )
        assert not torch.allclose(vectors[n], starts[n], atol=1e-4)
    return learner


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("model", MODELS)
def test_batched_equals_one_by_one_after_5_steps(model: str, optimizer: str) -> None:
    build, shape = MODELS[model]
    learner = _compare(build, shape, OPTIMIZERS[optimizer], exact=model == "mlp")
    assert learner.batched and learner.notice is None


@pytest.mark.parametrize("model", MODELS)
def test_a_node_trains_as_a_simulated_group_of_one_bit_for_bit(model: str) -> None:
    build, shape = MODELS[model]
    settings = OptimizerSettings(name="adam", lr=1e-2, lr_schedule="step", lr_gamma=0.5)
    x, y = _data(shape, 0)
    node = TorchLearner(build(0), (x, y), (x, y), batch_size=BATCH, optimizer=settings, seed=4)
    simulated = BatchedLearner(build(0), settings, shape)
    sampler = MinibatchSampler(len(y), BATCH, seed=4)
    vector = node.initial_vector()
    for call in range(3):  # Adam's moments and step count carried across calls alike
        result = node.train(vector, STEPS, round=call)
        rows, losses = simulated.train([0], vector[None], [(x, y)], [sampler], STEPS, [call])
        assert torch.equal(result.vector, rows[0]) and not torch.equal(result.vector, vector)
        assert float(losses[0]) == float(torch.tensor(result.loss, dtype=torch.float32))
        vector = rows[0] * 0.5  # as if a merge changed the model between trainings


def test_state_carries_across_calls_and_schedule_follows_each_nodes_round() -> None:
    build, shape = MODELS["cnn1d"]
    settings = OptimizerSettings(
        name="sgd", lr=0.05, momentum=0.9, lr_schedule="step", lr_step_size=1, lr_gamma=0.5
    )
    _compare(build, shape, settings, calls=3, rounds=(0, 2, 5))
    adam = OptimizerSettings(name="adam", lr=1e-2, lr_schedule="cosine", total_rounds=6)
    _compare(build, shape, adam, calls=2, rounds=(0, 3, 1))


def test_reset_policy_agrees_between_paths() -> None:
    build, shape = MODELS["mlp"]
    settings = OptimizerSettings(name="adam", lr=1e-2, state_policy="reset")
    _compare(build, shape, settings, calls=2, exact=True)


@pytest.mark.parametrize("optimizer", ["sgd", "sam"])
def test_linear_stack_fast_path_is_bit_identical_to_vmap(optimizer: str) -> None:
    model = build_model("mlp", {"hidden": [16, 8]}, (12,), 3, seed=0)
    settings = OptimizerSettings(name=optimizer, lr=0.1, momentum=0.5)
    fast = BatchedLearner(model, settings, (12,))
    slow = BatchedLearner(model, settings, (12,))
    slow._stack = None
    assert isinstance(fast._stack, LinearStack)
    data = [_data((12,), node) for node in range(NODES)]
    starts = torch.stack(
        [flatten(build_model("mlp", {"hidden": [16, 8]}, (12,), 3, seed=n)) for n in range(NODES)]
    )
    results = []
    for learner in (fast, slow):
        samplers = [MinibatchSampler(len(data[n][1]), BATCH, seed=n) for n in range(NODES)]
        results.append(learner.train(list(range(NODES)), starts, data, samplers, STEPS, [0] * 3))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    x, y = _data((12,), 9)
    assert torch.equal(fast.evaluate(results[0][0], x, y)[0], slow.evaluate(results[0][0], x, y)[0])


def test_evaluation_equals_learner_evaluation() -> None:
    build, shape = MODELS["lenet5"]
    x, y = _data(shape, 7)
    vectors = torch.stack([flatten(build(n)) for n in range(NODES)])
    losses, accuracies = BatchedLearner(build(0), OPTIMIZERS["sgd"], shape).evaluate(vectors, x, y)
    for n in range(NODES):
        single = TorchLearner(build(0), (x, y), (x, y), lr=0.1, batch_size=4, seed=0)
        expected = single.evaluate(vectors[n])
        assert abs(float(losses[n]) - expected.loss) < 1e-5
        assert float(accuracies[n]) == expected.accuracy


class _BatchNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(12, 6)
        self.norm = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.norm(self.linear(x))))  # type: ignore[no-any-return]


def _batchnorm(seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _BatchNormNet()


def test_batchnorm_falls_back_to_one_by_one_with_a_notice() -> None:
    notices: list[str] = []
    learner = BatchedLearner(_batchnorm(0), OPTIMIZERS["sgd"], (12,), log=notices.append)
    assert not learner.batched
    assert len(notices) == 1 and "\n" not in notices[0]
    assert "one node at a time" in notices[0] and "_BatchNormNet" in notices[0]
    # the fallback trains each node as TorchLearner does, running statistics included
    fallback = _compare(_batchnorm, (12,), OPTIMIZERS["sgd-nesterov"], exact=True)
    assert not fallback.batched
    for node in range(NODES):
        assert fallback._node_buffers[node]["norm.num_batches_tracked"] == STEPS
    # SAM's two forward passes a step update the running statistics twice, in both paths
    sam = _compare(_batchnorm, (12,), OPTIMIZERS["sam"], exact=True)
    for node in range(NODES):
        assert sam._node_buffers[node]["norm.num_batches_tracked"] == 2 * STEPS


def test_data_dependent_control_flow_falls_back() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(12, 3)

        def forward(self, x: Tensor) -> Tensor:
            out = self.linear(x)
            return out if bool(out.detach().sum() > 0) else -out

    learner = BatchedLearner(Branchy(), OPTIMIZERS["sgd"], (12,))
    assert not learner.batched and learner.notice is not None


def test_a_model_that_cannot_take_the_data_is_a_config_error() -> None:
    wrong = nn.Sequential(nn.Flatten(), nn.Linear(7, 3))  # the data has 12 features
    with pytest.raises(ConfigError, match=r"^model = 'Sequential': a module mapping \[N, 12\]"):
        BatchedLearner(wrong, OPTIMIZERS["sgd"], (12,))


def test_next_batches_is_the_stream_of_next_batch_calls() -> None:
    # 13 examples in batches of 5: batches straddle reshuffles at different places
    drawn, stepped = MinibatchSampler(13, 5, seed=7), MinibatchSampler(13, 5, seed=7)
    for count in (1, 3, 2, 4):
        batches = drawn.next_batches(count)
        assert batches.shape == (count, 5)
        for row in batches:
            assert torch.equal(row, stepped.next_batch())
    assert drawn.next_batches(0).shape == (0, 5)
    assert torch.equal(drawn.next_batch(), stepped.next_batch())


@pytest.mark.parametrize("model", ["mlp", "cnn1d"])
def test_pooled_shares_train_exactly_as_separate_datasets(model: str) -> None:
    build, shape = MODELS[model]
    data = [_data(shape, node) for node in range(NODES)]
    # the shares in another order inside the pool, behind an unrelated first example
    order = [2, 0, 1]
    pool_x = torch.cat([torch.zeros(1, *shape)] + [data[n][0] for n in order])
    pool_y = torch.cat([torch.zeros(1, dtype=torch.int64)] + [data[n][1] for n in order])
    begins = {n: 1 + sum(len(data[m][1]) for m in order[: order.index(n)]) for n in order}
    shares = Shares(pool_x, pool_y, torch.tensor([begins[n] for n in range(NODES)]))
    starts = torch.stack([flatten(build(node)) for node in range(NODES)])
    settings = OPTIMIZERS["sgd-nesterov"]
    results = []
    for source in (data, shares):
        learner = BatchedLearner(build(0), settings, shape)
        samplers = [MinibatchSampler(len(data[n][1]), BATCH, seed=n) for n in range(NODES)]
        vectors = starts
        for call in range(2):  # the momentum carried between the calls must agree too
            vectors, losses = learner.train(
                list(range(NODES)), vectors, source, samplers, STEPS, [call] * NODES
            )
        results.append((vectors, losses))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    assert not torch.equal(results[0][0], starts)
    two = shares.select([2, 0])
    assert torch.equal(
        two.gather(torch.tensor([[0], [1]]))[1], torch.stack([data[2][1][:1], data[0][1][1:2]])
    )


def test_linear_stack_gradient_is_autograds_bit_for_bit() -> None:
    # Zero features and a dead hidden unit give zero gradients (where a sign could differ).
    model = build_model("mlp", {"hidden": [16, 8]}, (12,), 3, seed=0)
    layout = layout_of(model)
    stack = LinearStack.of(model, layout)
    assert stack is not None
    generator = torch.Generator().manual_seed(3)
    params = flatten(model).repeat(4, 1) + 0.3 * torch.randn(4, layout.size, generator=generator)
    x = torch.randn(4, 6, 12, generator=generator)
    x[..., :4] = 0
    y = torch.randint(0, 3, (4, 6), generator=generator)
    leaf = params.clone().requires_grad_()
    logits = stack.logits(leaf, x)
    loss = F.cross_entropy(logits.reshape(-1, 3), y.reshape(-1), reduction="none").view(4, -1)
    (expected,) = torch.autograd.grad(loss.mean(dim=1).sum(), leaf)
    per_row, grad = stack.gradient(params, x, y)
    assert torch.equal(grad.view(torch.int32), expected.view(torch.int32))
    assert torch.equal(per_row, loss.mean(dim=1).detach().to(torch.float64))
    assert int((grad == 0).sum()) > 0


@pytest.mark.parametrize("classes", [2, 10, 16, 40])
def test_loss_and_logit_gradient_are_cross_entropys_bits(classes: int) -> None:
    # Whichever layout this CPU gets (class first where it agrees), the bits are autograd's.
    generator = torch.Generator().manual_seed(classes)
    scale = torch.rand(37, 5, 1, generator=generator) * 40
    logits = torch.randn(37, 5, classes, generator=generator) * scale
    y = torch.randint(0, classes, (37, 5), generator=generator)
    leaf = logits.clone().requires_grad_()
    flat = F.cross_entropy(leaf.reshape(-1, classes), y.reshape(-1), reduction="none")
    expected = flat.view(37, 5).mean(dim=1)
    (expected_grad,) = torch.autograd.grad(expected.sum(), leaf)
    loss, grad = loss_and_logit_gradient(logits, y)
    assert loss.dtype == torch.float64 and grad.shape == logits.shape and grad.is_contiguous()
    assert torch.equal(loss, expected.detach().to(torch.float64))
    assert torch.equal(grad.view(torch.int32), expected_grad.view(torch.int32))
    # a diverged model's logits: the same values, NaN where autograd has NaN
    logits[0, 0, 0], logits[1, 1] = float("inf"), float("-inf")
    logits[2, 2, 1], logits[3, 3, 0] = float("nan"), 1e38
    leaf = logits.clone().requires_grad_()
    flat = F.cross_entropy(leaf.reshape(-1, classes), y.reshape(-1), reduction="none")
    expected = flat.view(37, 5).mean(dim=1)
    (expected_grad,) = torch.autograd.grad(expected.sum(), leaf)
    loss, grad = loss_and_logit_gradient(logits, y)
    exact = {"rtol": 0, "atol": 0, "equal_nan": True}
    torch.testing.assert_close(loss, expected.detach().to(torch.float64), **exact)
    torch.testing.assert_close(grad, expected_grad, **exact)
    assert bool(loss.isnan().any()) and not bool(loss.isnan().all())


@pytest.mark.parametrize("model", ["cnn1d", "lenet5", "group-layer-norm"])
def test_vmapped_gradient_is_autograd_of_the_vmapped_loss_bit_for_bit(model: str) -> None:
    # The loss and its logit gradient come from loss_and_logit_gradient, outside vmap; the
    # bits are those of autograd through vmap of F.cross_entropy itself.
    from torch.func import functional_call, vmap

    build, shape = MODELS[model]
    learner = BatchedLearner(build(0), OPTIMIZERS["sgd"], shape)
    generator = torch.Generator().manual_seed(5)
    params = torch.stack([flatten(build(n)) for n in range(NODES)])
    x = torch.randn(NODES, 16, *shape, generator=generator)
    y = torch.randint(0, 3, (NODES, 16), generator=generator)

    def loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(learner.model, params, (x,)), y)

    leaves = {
        slot.name: params[:, slot.span].view(NODES, *slot.shape).clone().requires_grad_()
        for slot in learner.layout.slots
    }
    per_row = vmap(loss)(leaves, x, y)
    grads = torch.autograd.grad(per_row.sum(), list(leaves.values()))
    expected = torch.cat([g.reshape(NODES, -1) for g in grads], dim=1)
    got_loss, got = learner._vmap_gradient(params, x, y)
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))
    assert torch.equal(got_loss, per_row.detach().to(torch.float64))
