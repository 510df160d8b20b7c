"""Shared-randomness SPSA ("Just One Byte", Zelikman et al.): the learner's side.

Theory of operation
-------------------
Every node of a ``spsa`` run holds the same model ``θ_t`` at step ``t``. For each of its
``S`` samples ``k`` a node draws a perturbation ``z`` from a generator seeded by
:func:`perturbation_seed` ``(salt, t, node, k)``, takes the next minibatch of its own data
and measures the two-point projected gradient

    g = (L(θ + ε z) − L(θ − ε z)) / (2 ε)

(:func:`projected_gradients`). It sends ``g`` as one byte (:func:`quantise`); every node
regenerates every sender's ``z`` from the seed and applies the same update

    θ_{t+1} = θ_t − lr · (1/N) · Σ_k ĝ_k z_k

over the ``N`` dequantised projections ``ĝ_k`` of the step, in the order of the senders' keys
(:func:`apply_update`). The reference code multiplies by an extra ε; here ``g`` is already
the directional derivative, so ``lr`` is an ordinary step size.

Why Rademacher perturbations (``z_i = ±1``) and not N(0, I) as the reference code: the bits
come from numpy's PCG64 stream, whose output numpy keeps stable across versions and machines,
and ``ĝ·z`` is then exact, so the update is a sequence of IEEE additions whose result does not
depend on the CPU's vector units or a library's transcendental functions. Honest nodes on
different machines therefore hold bit-identical models, not merely close ones. (Rademacher is
also Spall's original SPSA distribution.)

The quantiser: ``q = round(clip(g, −c, c) · 127 / c)``, an int8 in ``[−127, 127]``,
``ĝ = q · c / 127``; ``c`` is ``protocol.spsa_clip``. A non-finite ``g`` (a diverged loss) is
sent as 0. The clip bounds any one node's influence on the step, honest or not.

One code path: :class:`~p2pfl.learn.TorchLearner` (a node) and
:class:`~p2pfl.learn.batched.BatchedLearner` (the simulator) both call
:func:`projected_gradients` with the module's own loss, so a node in the simulator sends the
byte it would send on a device.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from p2pfl.identity import NodeId
from p2pfl.learn.functional import mean_loss, row_params
from p2pfl.params import ParamLayout

QUANT_LEVELS = 127
"""A projection is sent as an int8 in ``[-QUANT_LEVELS, QUANT_LEVELS]``."""

_SEED_CONTEXT = b"p2pfl/spsa/v1\x00"

LossFn = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``(rows [R, P], x [R, B, ...], y [R, B]) -> losses [R]``: each row's mean loss on its own
minibatch."""


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """The projections one node measured at one step.

    Attributes:
        projections: ``g`` per sample, in sample order (floats; quantised by the core).
        loss: the mean of ``(L(θ+εz) + L(θ−εz)) / 2`` over the samples (NaN with none).
    """

    projections: tuple[float, ...]
    loss: float


@runtime_checkable
class ProbingLearner(Protocol):
    """A learner that can measure SPSA projections (``TorchLearner`` can)."""

    def probe(self, vector: Tensor, seeds: Sequence[int], eps: float) -> ProbeResult:
        """The projections at ``vector`` along each seed's perturbation."""
        ...


def perturbation_seed(salt: int, step: int, node: NodeId, sample: int) -> int:
    """The seed of ``node``'s ``sample``-th perturbation at ``step``: a 64-bit BLAKE2b of the
    run's shared ``salt``, the step, the node's public key and the sample index, so any node
    can regenerate any other's perturbation and no two (step, node, sample) share one."""
    data = b"".join(
        (
            _SEED_CONTEXT,
            (salt & (2**64 - 1)).to_bytes(8, "big"),
            step.to_bytes(8, "big"),
            node.raw,
            sample.to_bytes(4, "big"),
        )
    )
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def perturbation(seed: int, size: int) -> Tensor:
    """The Rademacher vector (float32 ``±1``) of ``seed``: bit ``i`` of numpy's PCG64 stream
    from ``seed`` gives ``z_i`` (bits of each 64-bit word from the most significant)."""
    words = np.random.PCG64(seed).random_raw((size + 63) // 64)
    bits = np.unpackbits(words.astype(">u8").view(np.uint8))[:size]
    signs = bits.astype(np.float32) * 2.0 - 1.0
    return torch.from_numpy(signs)


def quantise(value: float, clip: float) -> int:
    """``value`` as one signed byte: ``round(clip(value, -clip, clip) * 127 / clip)``; a
    non-finite value gives 0."""
    if not math.isfinite(value):
        return 0
    bounded = min(max(value, -clip), clip)
    return int(round(bounded * QUANT_LEVELS / clip))


def dequantise(level: int, clip: float) -> float:
    """The projection a byte stands for: ``level * clip / 127``."""
    return level * clip / QUANT_LEVELS


def projected_gradients(
    loss: LossFn,
    vector: Tensor,
    seeds: Sequence[int],
    eps: float,
    batches: Callable[[], tuple[Tensor, Tensor]],
) -> ProbeResult:
    """Two-point projected gradients of ``loss`` at ``vector``, one per seed.

    Args:
        loss: the loss of parameter rows, each on its own minibatch (see :data:`LossFn`).
        vector: ``θ`` ``[P]`` (not modified).
        seeds: one perturbation seed per sample.
        eps: the perturbation size ``ε`` > 0.
        batches: returns the next minibatch ``(x, y)``; called once per seed, and both
            points of a sample are measured on the same minibatch.
    """
    if not seeds:
        return ProbeResult((), math.nan)
    theta = vector.detach().to(torch.float32)
    rows = []
    xs = []
    ys = []
    for seed in seeds:
        z = perturbation(seed, theta.numel())
        rows += [theta + eps * z, theta - eps * z]
        x, y = batches()
        xs += [x, x]
        ys += [y, y]
    with torch.no_grad():
        losses = loss(torch.stack(rows), torch.stack(xs), torch.stack(ys)).tolist()
    plus, minus = losses[0::2], losses[1::2]
    projections = tuple((a - b) / (2.0 * eps) for a, b in zip(plus, minus, strict=True))
    mean = sum((a + b) / 2.0 for a, b in zip(plus, minus, strict=True)) / len(seeds)
    return ProbeResult(projections, mean)


_DELTAS: OrderedDict[tuple[object, ...], Tensor] = OrderedDict()
"""The last few updates computed in this process, by their inputs (see :func:`apply_update`)."""
_DELTA_CACHE = 8


def apply_update(vector: Tensor, contributions: Sequence[tuple[int, float]], lr: float) -> Tensor:
    """``θ − lr · (1/N) · Σ ĝ_k z_k`` over ``contributions`` ``[(seed, ĝ), ...]``, a new tensor.

    The sum runs in the order given (callers sort by sender key, then sample), one float32
    addition per element per contribution: the same inputs give the same bits anywhere.
    The step ``lr · (1/N) · Σ ĝ_k z_k`` is a pure function of ``(contributions, lr, P)``, so a
    process running many nodes (the simulator) computes it once per step and shares it; the
    last few are kept.
    """
    theta = vector.detach().to(torch.float32)
    if not contributions:
        return theta.clone()
    key = (theta.numel(), lr, *contributions)
    delta = _DELTAS.get(key)
    if delta is None:
        total = torch.zeros_like(theta)
        for seed, value in contributions:
            # z is ±1, so value * z is exact and the sum is the same with or without FMA.
            total.add_(perturbation(seed, theta.numel()), alpha=value)
        delta = _DELTAS[key] = total * (lr / len(contributions))
        while len(_DELTAS) > _DELTA_CACHE:
            _DELTAS.popitem(last=False)
    return theta - delta


def module_loss(model: torch.nn.Module, layout: ParamLayout, buffers: dict[str, Tensor]) -> LossFn:
    """The :data:`LossFn` of ``model`` in training mode with ``buffers``: each row's mean
    cross-entropy on its own minibatch, as a node and the simulator both compute it (a
    Linear/ReLU stack in one batched product, :class:`~p2pfl.learn.batched.LinearStack`;
    any other module one plain forward per row)."""
    from p2pfl.learn.batched import LinearStack

    stack = LinearStack.of(model, layout)

    def loss(rows: Tensor, x: Tensor, y: Tensor) -> Tensor:
        if stack is not None:
            logits = stack.logits(rows, x)
            flat = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none"
            )
            return flat.view(rows.shape[0], -1).mean(dim=1)
        model.train()
        params = row_params(layout, rows)
        return torch.stack(
            [
                mean_loss(
                    model, {name: t[row] for name, t in params.items()}, buffers, x[row], y[row]
                )
                for row in range(rows.shape[0])
            ]
        )

    return loss
