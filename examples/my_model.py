"""Bring your own model: a factory p2pfl can build by name.

Use it from a scenario or a node config (``[learner]``)::

    model = "python:examples.my_model:factory"
    model_params = { width = 64 }

or from the command line, from the repository root (the module must be importable, hence
``PYTHONPATH=.`` for the installed ``p2pfl-sim`` script)::

    PYTHONPATH=. p2pfl-sim run default --set learner.model=python:examples.my_model:factory \
        --set learner.model_params.width=64 --set learner.optimizer=adam --set learner.lr=0.003

p2pfl calls ``factory(input_shape, num_classes, *, seed, **model_params)``: ``input_shape`` is
one example's shape as the dataset gives it (``(64,)`` for digits, ``(1, 28, 28)`` for MNIST
images) and the module must map ``[N, *input_shape]`` to ``[N, num_classes]`` logits. A factory
without a ``seed`` argument (like this one) is called after ``torch.manual_seed(seed)`` inside
``torch.random.fork_rng``, so torch's default initialisation is deterministic too.

This model batches in the simulator (Linear, LayerNorm and GELU all run under ``vmap``); a
BatchNorm or Dropout layer would make the simulator train one node at a time instead.
"""

from __future__ import annotations

import math

from torch import nn


def factory(input_shape: tuple[int, ...], num_classes: int, *, width: int = 64) -> nn.Module:
    """A one-hidden-layer network with LayerNorm and GELU."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), width),
        nn.LayerNorm(width),
        nn.GELU(),
        nn.Linear(width, num_classes),
    )
