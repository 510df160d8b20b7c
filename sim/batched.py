"""Many nodes' MLPs trained and evaluated as one vectorised computation.

A training started at virtual time t depends only on its inputs at t, so the engine defers
trainings and runs all pending ones of same-shaped models together. The parameters of B
nodes are one ``[B, P]`` tensor; each layer's weights are a ``[B, out, in]`` view of it and the
forward pass is a batched matrix product (``baddbmm``). The loss is the *sum* over nodes of
each node's mean cross-entropy, so its gradient with respect to node b's slice is exactly
node b's own gradient, and one SGD step updates every node as its own optimiser would.

Each node draws its minibatches from its own :class:`~p2pfl.learn.MinibatchSampler`, the
same sampler a :class:`~p2pfl.learn.TorchLearner` uses, so batched and one-by-one training
see the same examples in the same order and agree to float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from p2pfl.learn import MinibatchSampler
from p2pfl.params import ParamLayout


@dataclass(frozen=True, slots=True)
class _Layer:
    weight: slice
    bias: slice
    fan_out: int
    fan_in: int


def mlp_layers(layout: ParamLayout) -> tuple[_Layer, ...]:
    """Read (weight, bias) pairs of an MLP built by :func:`p2pfl.learn.mlp` from its layout.

    Raises:
        ValueError: the layout is not alternating 2-D weights and matching 1-D biases.
    """
    slots = layout.slots
    if len(slots) % 2:
        raise ValueError("an MLP layout alternates weight and bias tensors")
    layers = []
    for weight, bias in zip(slots[::2], slots[1::2], strict=True):
        if len(weight.shape) != 2 or bias.shape != (weight.shape[0],):
            raise ValueError(f"{weight.name}/{bias.name} are not a Linear layer's weight and bias")
        layers.append(_Layer(weight.span, bias.span, weight.shape[0], weight.shape[1]))
    return tuple(layers)


class BatchedMLP:
    """Batched SGD and evaluation for MLPs that share one layout."""

    def __init__(self, layout: ParamLayout, *, lr: float) -> None:
        self.layout = layout
        self.layers = mlp_layers(layout)
        self.lr = lr

    def logits(self, params: Tensor, x: Tensor) -> Tensor:
        """``params [B, P]``, ``x [B, N, D]`` (or ``[N, D]`` shared by all) → ``[B, N, C]``."""
        batch = params.shape[0]
        hidden = x if x.ndim == 3 else x.unsqueeze(0).expand(batch, -1, -1)
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            weight = params[:, layer.weight].view(batch, layer.fan_out, layer.fan_in)
            bias = params[:, layer.bias].unsqueeze(1)
            hidden = torch.baddbmm(bias, hidden, weight.transpose(1, 2))
            if index != last:
                hidden = torch.relu(hidden)
        return hidden

    def train(
        self,
        vectors: Tensor,
        datasets: Sequence[tuple[Tensor, Tensor]],
        samplers: Sequence[MinibatchSampler],
        steps: int,
    ) -> tuple[Tensor, Tensor]:
        """Take ``steps`` SGD steps for every node at once.

        Args:
            vectors: ``[B, P]`` starting parameters (not modified).
            datasets: each node's ``(x [N_b, D], y [N_b])`` training data.
            samplers: each node's minibatch sampler; all must have the same batch size.
            steps: local steps, the same for all B nodes.

        Returns:
            The new ``[B, P]`` parameters and each node's mean loss over the steps ``[B]``.

        Raises:
            ValueError: samplers disagree on the batch size.
        """
        batch_sizes = {sampler.batch_size for sampler in samplers}
        if len(batch_sizes) != 1:
            raise ValueError(f"one batched call needs one batch size, got {sorted(batch_sizes)}")
        nodes = vectors.shape[0]
        params = vectors.detach().clone()
        total_loss = torch.zeros(nodes, dtype=torch.float64)
        for _ in range(steps):
            picks = [sampler.next_batch() for sampler in samplers]
            x = torch.stack([data[0][pick] for data, pick in zip(datasets, picks, strict=True)])
            y = torch.stack([data[1][pick] for data, pick in zip(datasets, picks, strict=True)])
            params.requires_grad_(True)
            logits = self.logits(params, x)
            per_node = (
                F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none"
                )
                .view(nodes, -1)
                .mean(dim=1)
            )
            (grad,) = torch.autograd.grad(per_node.sum(), params)
            params = params.detach()
            params.add_(grad, alpha=-self.lr)
            total_loss += per_node.detach()
        return params, (total_loss / max(steps, 1)).to(torch.float32)

    @torch.no_grad()
    def evaluate(
        self, vectors: Tensor, x: Tensor, y: Tensor, *, chunk: int = 256
    ) -> tuple[Tensor, Tensor]:
        """Mean cross-entropy and accuracy of every node on one shared test set.

        Returns:
            ``(loss [B], accuracy [B])`` as float64 tensors.
        """
        losses = []
        accuracies = []
        for start in range(0, vectors.shape[0], chunk):
            params = vectors[start : start + chunk]
            logits = self.logits(params, x)
            flat = logits.reshape(-1, logits.shape[-1])
            target = y.repeat(params.shape[0])
            loss = F.cross_entropy(flat, target, reduction="none").view(params.shape[0], -1)
            losses.append(loss.mean(dim=1).to(torch.float64))
            correct = (logits.argmax(dim=-1) == y.unsqueeze(0)).to(torch.float64)
            accuracies.append(correct.mean(dim=1))
        return torch.cat(losses), torch.cat(accuracies)
