"""Test loss and accuracy: one function for every learner, equal to the plain PyTorch
expression bit for bit, whatever the chunking."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from p2pfl.learn import TorchLearner
from p2pfl.learn import batched as batched_module
from p2pfl.learn.batched import BatchedLearner
from p2pfl.learn.functional import score_logits
from p2pfl.learn.models import build_model
from p2pfl.learn.optim import OptimizerSettings
from p2pfl.params import flatten


def _reference(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """The expression the simulator evaluated with before (and the definition)."""
    count, _, classes = logits.shape
    loss = F.cross_entropy(logits.reshape(-1, classes), y.repeat(count), reduction="none")
    correct = (logits.argmax(dim=-1) == y.unsqueeze(0)).to(torch.float64)
    return loss.view(count, -1).mean(dim=1).to(torch.float64), correct.mean(dim=1)


def _logits(seed: int, count: int, examples: int, classes: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    scale = torch.rand(count, examples, 1, generator=generator) * 40
    logits = torch.randn(count, examples, classes, generator=generator) * scale
    return logits, torch.randint(0, classes, (examples,), generator=generator)


@pytest.mark.parametrize("classes", [2, 3, 10, 15, 16, 26, 62])
def test_score_logits_equal_cross_entropy_and_argmax_bit_for_bit(classes: int) -> None:
    # Shapes whose B * N is and is not a multiple of the vector width and the padding.
    for seed, (count, examples) in enumerate([(1, 1), (3, 7), (32, 1000), (5, 333), (64, 64)]):
        logits, y = _logits(seed, count, examples, classes)
        loss, accuracy = score_logits(logits, y)
        expected_loss, expected_accuracy = _reference(logits, y)
        assert torch.equal(loss, expected_loss), (count, examples, classes)
        assert torch.equal(accuracy, expected_accuracy)
        assert loss.dtype == accuracy.dtype == torch.float64


def test_accuracy_follows_argmax_on_ties_and_nan() -> None:
    logits, y = _logits(5, 4, 50, 10)
    logits[0] = 1.0  # all tied: argmax is class 0
    logits[1] = logits[1].round()  # many ties between classes
    logits[2, 3] = float("nan")  # a NaN row: argmax is its first NaN
    logits[2, 4, 7] = float("nan")
    y[4] = 7
    logits[3, :, 2] = float("inf")
    _, accuracy = score_logits(logits, y)
    assert torch.equal(accuracy, _reference(logits, y)[1])
    assert float(accuracy[0]) == float((y == 0).double().mean())
    logits[0] = 0.0
    logits[0, :, 4] = -0.0  # -0.0 == 0.0: still a tie that argmax resolves to class 0
    assert torch.equal(score_logits(logits, y)[1], _reference(logits, y)[1])


def _mlp(seed: int) -> torch.nn.Module:
    return build_model("mlp", {"hidden": [16]}, (12,), 10, seed=seed)


def test_batched_evaluation_equals_each_node_scored_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(300, 12, generator=generator)
    y = torch.randint(0, 10, (300,), generator=generator)
    # Random models, a few far from the initialisation (large logits, saturated softmax).
    vectors = torch.stack([flatten(_mlp(n)) for n in range(40)])
    vectors[::7] *= 25
    learner = BatchedLearner(_mlp(0), OptimizerSettings(name="sgd", lr=0.1), (12,))
    loss, accuracy = learner.evaluate(vectors, x, y)
    for node in range(len(vectors)):
        alone = _reference(learner.logits(vectors[node : node + 1], x), y)
        assert float(loss[node]) == float(alone[0][0]), node
        assert float(accuracy[node]) == float(alone[1][0])
    # The chunking (how many models share one forward pass) changes no bit.
    monkeypatch.setattr(batched_module, "EVAL_BUDGET", 300 * 3)
    again = learner.evaluate(vectors, x, y)
    assert torch.equal(again[0], loss)
    assert torch.equal(again[1], accuracy)


def test_a_node_reports_the_loss_the_simulator_records() -> None:
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(5000, 12, generator=generator)  # more than one forward batch of 4096
    y = torch.randint(0, 10, (5000,), generator=generator)
    model = _mlp(1)
    vector = flatten(model) * 3
    node = TorchLearner(_mlp(1), (x, y), (x, y), lr=0.1, batch_size=8, seed=0)
    result = node.evaluate(vector)
    model.eval()
    with torch.no_grad():
        params = _params(model, vector)
        logits = torch.cat([functional_call(model, params, part) for part in x.split(4096)])
    expected = _reference(logits[None], y)
    assert result.loss == float(expected[0][0])
    assert result.accuracy == float(expected[1][0])
    assert result.samples == 5000


def _params(model: torch.nn.Module, vector: Tensor) -> dict[str, Tensor]:
    params = {}
    start = 0
    for name, value in model.named_parameters():
        params[name] = vector[start : start + value.numel()].view_as(value)
        start += value.numel()
    return params
