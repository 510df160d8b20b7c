"""Small model builders whose initialisation depends only on a seed."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from p2pfl.errors import ConfigError

SEED_MASK = 2**64 - 1


def mlp(layer_sizes: Sequence[int], *, seed: int) -> nn.Module:
    """A multilayer perceptron: ``Linear`` layers with ``ReLU`` between them.

    ``mlp([64, 32, 10], seed=0)`` maps 64 features through one hidden layer of 32 units to
    10 logits. Weights and biases follow PyTorch's default ``Linear`` initialisation
    (uniform in ``±1/sqrt(fan_in)``) but are drawn from a private generator seeded with
    ``seed``, so the same sizes and seed give bit-identical parameters and the global RNG is
    neither read nor advanced.

    Args:
        layer_sizes: input size, hidden sizes..., output size; at least two entries.
        seed: seed of the initialisation; any int (reduced modulo 2**64).

    Raises:
        ConfigError: fewer than two sizes, or a size below 1.
    """
    sizes = list(layer_sizes)
    if len(sizes) < 2:
        raise ConfigError("layer_sizes", sizes, "at least two sizes: input, hidden..., output")
    if any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in sizes):
        raise ConfigError("layer_sizes", sizes, "every size must be an int >= 1")
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed & SEED_MASK)
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        if i > 0:
            layers.append(nn.ReLU())
        # Built on the meta device so that reset_parameters, which draws from (and advances)
        # the global RNG, allocates and draws nothing; real parameters are put in below.
        linear = nn.Linear(fan_in, fan_out, device="meta")
        bound = 1.0 / math.sqrt(fan_in)
        weight = torch.empty(fan_out, fan_in).uniform_(-bound, bound, generator=generator)
        bias = torch.empty(fan_out).uniform_(-bound, bound, generator=generator)
        linear.weight = nn.Parameter(weight)
        linear.bias = nn.Parameter(bias)
        layers.append(linear)
    return nn.Sequential(*layers)
