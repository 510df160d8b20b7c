"""A module run on flat parameter rows: the forward, loss and gradient every learner shares.

Rows are flat parameter vectors (:mod:`p2pfl.params`), ``[R, P]``. :func:`row_params` turns
them into the ``{name: [R, *shape]}`` tensors ``torch.func.functional_call`` takes (views, no
copy) and :func:`flat_grads` turns the gradients back into ``[R, P]``, the form the optimiser
(:mod:`p2pfl.learn.optim`) updates.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from p2pfl.params import ParamLayout


def row_params(layout: ParamLayout, rows: Tensor, *, leaves: bool = False) -> dict[str, Tensor]:
    """``rows [R, P]`` as ``{name: [R, *shape]}`` views; with ``leaves``, detached views
    that require grad (gradients are then taken with respect to each of them)."""
    count = rows.shape[0]
    params = {}
    for slot in layout.slots:
        view = rows[:, slot.span].view(count, *slot.shape)
        params[slot.name] = view.detach().requires_grad_() if leaves else view
    return params


def flat_grads(layout: ParamLayout, grads: Mapping[str, Tensor], count: int) -> Tensor:
    """Gradients ``{name: [R, *shape]}`` as one ``[R, P]`` tensor in layout order."""
    return torch.cat([grads[slot.name].reshape(count, slot.numel) for slot in layout.slots], dim=1)


def mean_loss(
    model: nn.Module,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
) -> Tensor:
    """Mean cross-entropy of ``model`` with ``params`` and ``buffers`` on ``(x, y)``."""
    # Imported here: torch.func costs a third of a second to import, which a node start or
    # a Linear/ReLU simulation (which never calls this in batched form) need not pay twice.
    from torch.func import functional_call

    logits = functional_call(model, (dict(params), dict(buffers)), (x,))
    return F.cross_entropy(logits, y)


def row_gradient(
    model: nn.Module,
    layout: ParamLayout,
    row: Tensor,
    buffers: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
) -> tuple[Tensor, Tensor]:
    """Loss and ``[1, P]`` gradient of one row ``[1, P]`` on a minibatch, by plain autograd.

    ``buffers`` are updated in place as the module updates them (BatchNorm running stats):
    this is the one-by-one path every module supports.
    """
    leaves = row_params(layout, row, leaves=True)
    single = {name: leaf[0] for name, leaf in leaves.items()}
    with torch.enable_grad():
        loss = mean_loss(model, single, buffers, x, y)
        grads = torch.autograd.grad(
            loss, list(leaves.values()), allow_unused=True, materialize_grads=True
        )
    return loss.detach(), flat_grads(layout, dict(zip(leaves, grads, strict=True)), 1)
