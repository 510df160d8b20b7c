"""The optimiser rules equal torch.optim's, step by step, and the schedules and policies."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from p2pfl.errors import ConfigError
from p2pfl.learn.optim import (
    OptimizerSettings,
    OptimizerState,
    optimizer_step,
    stack_states,
    step_gradient,
    unstack_states,
)

CASES = [
    OptimizerSettings(name="sgd", lr=0.1),
    OptimizerSettings(name="sgd", lr=0.05, momentum=0.9, weight_decay=1e-3),
    OptimizerSettings(name="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
    OptimizerSettings(name="adam", lr=1e-2),
    OptimizerSettings(name="adam", lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2),
    OptimizerSettings(name="adamw", lr=1e-2, weight_decay=0.05),
]


def _torch_optimizer(
    settings: OptimizerSettings, params: list[nn.Parameter]
) -> torch.optim.Optimizer:
    if settings.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=settings.lr,
            momentum=settings.momentum,
            nesterov=settings.nesterov,
            weight_decay=settings.weight_decay,
            foreach=False,
        )
    kind = torch.optim.Adam if settings.name == "adam" else torch.optim.AdamW
    return kind(
        params,
        lr=settings.lr,
        betas=settings.betas,
        eps=settings.eps,
        weight_decay=settings.weight_decay,
        foreach=False,
    )


@pytest.mark.parametrize("settings", CASES, ids=lambda s: f"{s.name}-m{s.momentum}-n{s.nesterov}")
def test_matches_torch_optim_bit_for_bit(settings: OptimizerSettings) -> None:
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    reference = _torch_optimizer(settings, list(model.parameters()))
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).unsqueeze(0)
    state = stack_states(settings, [OptimizerState()], flat.shape[1])
    for step in range(1, 8):
        x = torch.randn(6, 5, generator=generator)
        y = torch.randint(0, 3, (6,), generator=generator)
        reference.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).unsqueeze(0)  # type: ignore[union-attr]
        reference.step()
        optimizer_step(settings, flat, grads, state, lrs=[settings.lr], step_counts=[step])
        expected = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        assert torch.equal(flat[0], expected), f"step {step}: {(flat[0] - expected).abs().max()}"
        # keep the model on our trajectory so any difference cannot compound
        with torch.no_grad():
            offset = 0
            for p in model.parameters():
                p.copy_(flat[0, offset : offset + p.numel()].view_as(p))
                offset += p.numel()


def test_rows_update_independently_with_their_own_lr_and_step() -> None:
    settings = OptimizerSettings(name="adam", lr=0.1)
    params = torch.randn(3, 7)
    grads = torch.randn(3, 7)
    both = params.clone()
    state = stack_states(settings, [OptimizerState() for _ in range(3)], 7)
    optimizer_step(settings, both, grads, state, lrs=[0.1, 0.2, 0.3], step_counts=[1, 1, 1])
    for row, lr in enumerate([0.1, 0.2, 0.3]):
        one = params[row : row + 1].clone()
        single = stack_states(settings, [OptimizerState()], 7)
        optimizer_step(settings, one, grads[row : row + 1], single, lrs=[lr], step_counts=[1])
        assert torch.equal(one[0], both[row])


def test_schedules() -> None:
    step = OptimizerSettings(lr=1.0, lr_schedule="step", lr_step_size=3, lr_gamma=0.5)
    assert [step.lr_at(r) for r in range(7)] == [1, 1, 1, 0.5, 0.5, 0.5, 0.25]
    cosine = OptimizerSettings(lr=1.0, lr_schedule="cosine", lr_min=0.1, total_rounds=4)
    assert cosine.lr_at(0) == 1.0
    assert math.isclose(cosine.lr_at(2), 0.55)
    assert math.isclose(cosine.lr_at(4), 0.1) and math.isclose(cosine.lr_at(9), 0.1)
    assert OptimizerSettings(lr=0.3).lr_at(50) == 0.3


def test_reset_policy_drops_state_only_when_the_vector_changed() -> None:
    settings = OptimizerSettings(momentum=0.9, state_policy="reset")
    state = OptimizerState()
    returned = torch.ones(4)
    state.tensors = {"momentum_buffer": torch.ones(4)}
    state.steps = 3
    state.finish(settings, returned)
    state.begin(settings, returned.clone())
    assert state.steps == 3 and "momentum_buffer" in state.tensors
    state.begin(settings, returned + 1)
    assert state.steps == 0 and state.tensors == {}
    keep = OptimizerSettings(momentum=0.9)
    state.tensors = {"momentum_buffer": torch.ones(4)}
    state.begin(keep, torch.zeros(4))
    assert "momentum_buffer" in state.tensors


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"name": "rmsprop"}, "optimizer"),
        ({"lr": 0.0}, "lr"),
        ({"momentum": 1.0}, "momentum"),
        ({"nesterov": True}, "nesterov"),
        ({"name": "adam", "momentum": 0.9}, "momentum"),
        ({"betas": (0.9, 1.0)}, "betas[1]"),
        ({"lr_schedule": "linear"}, "lr_schedule"),
        ({"state_policy": "forget"}, "optimizer_state"),
        ({"name": "sam", "rho": -0.1}, "rho"),
        ({"name": "adam", "nesterov": True}, "nesterov"),
    ],
)
def test_bad_settings_name_the_key(kwargs: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        OptimizerSettings(**kwargs)  # type: ignore[arg-type]
    assert info.value.key == key


def _quadratic(scales: torch.Tensor) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Rows -> (loss, gradient) of F(x) = sum(scales * x**3) / 3, whose gradient is not linear."""

    def gradient(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (scales * rows**3).sum(dim=1) / 3, scales * rows**2

    return gradient


def test_sam_steps_with_the_gradient_at_the_ascent_point() -> None:
    scales = torch.tensor([1.0, 2.0, 0.5])
    gradient = _quadratic(scales)
    params = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.0, -1.0]])
    settings = OptimizerSettings(name="sam", lr=0.1, rho=0.05)
    loss, grads = step_gradient(settings, gradient, params)
    for row in range(2):
        g = scales * params[row] ** 2
        ascent = params[row] + 0.05 * g / g.norm()
        assert torch.allclose(grads[row], scales * ascent**2, atol=1e-6)
        assert torch.allclose(loss[row], (scales * params[row] ** 3).sum() / 3)
    # each row's ascent is scaled by its own norm: a row alone gives the same gradient
    alone = step_gradient(settings, gradient, params[1:])[1]
    assert torch.equal(alone[0], grads[1])
    plain = step_gradient(OptimizerSettings(name="sgd"), gradient, params)[1]
    assert not torch.allclose(plain, grads, atol=1e-3)
    # the update is SGD's rule on that gradient
    updated = params.clone()
    optimizer_step(settings, updated, grads, {}, lrs=[0.1, 0.1], step_counts=[1, 1])
    assert torch.allclose(updated, params - 0.1 * grads)


def test_sam_with_a_zero_gradient_stays_put() -> None:
    settings = OptimizerSettings(name="sam", rho=0.05)
    params = torch.zeros(1, 3)
    _, grads = step_gradient(settings, _quadratic(torch.ones(3)), params)
    assert torch.equal(grads, torch.zeros(1, 3))


def test_states_of_the_same_nodes_are_taken_back_without_a_copy() -> None:
    settings = OptimizerSettings(name="adam", lr=1e-2)
    states = [OptimizerState() for _ in range(3)]
    first = stack_states(settings, states, 5)
    first["exp_avg"].copy_(torch.arange(15.0).view(3, 5))
    unstack_states(first, states, 2)
    assert [state.steps for state in states] == [2, 2, 2]
    assert torch.equal(states[1].tensors["exp_avg"], torch.arange(5.0, 10.0))
    again = stack_states(settings, states, 5)
    assert again["exp_avg"] is first["exp_avg"]  # the same nodes in the same order
    # another order or a subset is a new stack of the same rows
    swapped = stack_states(settings, [states[2], states[0]], 5)
    assert swapped["exp_avg"] is not first["exp_avg"]
    assert torch.equal(swapped["exp_avg"], first["exp_avg"][[2, 0]])
    unstack_states(swapped, [states[2], states[0]], 1)
    assert stack_states(settings, states, 5)["exp_avg"] is not first["exp_avg"]
    # a reset state (new tensors) is no longer a row of the old stack
    states[0].tensors = {}
    mixed = stack_states(settings, [states[1]], 5)
    assert torch.equal(mixed["exp_avg"][0], torch.arange(5.0, 10.0))
    assert torch.equal(stack_states(settings, states[:1], 5)["exp_avg"], torch.zeros(1, 5))
