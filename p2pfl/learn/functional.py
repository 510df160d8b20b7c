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
    """Mean cross-entropy of ``model`` with ``params`` and ``buffers`` on ``(x, y)``: the loss
    an SPSA probe measures (:func:`p2pfl.learn.spsa.module_loss`), without a gradient."""
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
    """Mean loss ``[1]`` (float64) and ``[1, P]`` gradient of one row ``[1, P]`` on a
    minibatch, by plain autograd through the module from :func:`loss_and_logit_gradient`'s
    logit gradient (the loss every learner trains on).

    ``buffers`` are updated in place as the module updates them (BatchNorm running stats):
    this is the one-by-one path every module supports.
    """
    from torch.func import functional_call

    leaves = row_params(layout, row, leaves=True)
    single = {name: leaf[0] for name, leaf in leaves.items()}
    with torch.enable_grad():
        logits = functional_call(model, (single, dict(buffers)), (x,))
        loss, incoming = loss_and_logit_gradient(logits.detach().unsqueeze(0), y.unsqueeze(0))
        grads = torch.autograd.grad(
            logits,
            list(leaves.values()),
            grad_outputs=incoming[0],
            allow_unused=True,
            materialize_grads=True,
        )
    return loss, flat_grads(layout, dict(zip(leaves, grads, strict=True)), 1)


CLASS_FIRST_PAD = 64
"""The class-first layout's columns are padded to a multiple of this (a multiple of every
CPU's float vector width: 8 on AVX2, 16 on AVX-512, up to 64 on SVE), so that PyTorch's
softmax kernel computes every real column in its vector loop, never in its scalar tail."""
_class_first_exact: dict[tuple[int, torch.dtype], bool] = {}
"""Per (classes, dtype): whether the class-first layout reproduces ``F.cross_entropy`` and
its gradient (:func:`_class_first_agrees`)."""


def loss_and_logit_gradient(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's mean cross-entropy ``[B]`` (float64) over its examples and the gradient of
    their sum with respect to ``logits [B, N, C]`` (labels ``y [B, N]``): the training loss of
    every learner and every gradient path (:class:`~p2pfl.learn.batched.LinearStack`'s
    written-out backward, autograd through a vmapped forward, :func:`row_gradient`), whose
    backward takes it from there.

    The same bits as ``F.cross_entropy(logits.reshape(-1, C), y.reshape(-1),
    reduction="none").view(B, -1).mean(dim=1)`` and autograd's gradient of its sum. PyTorch's
    log-softmax and its backward over a short last dimension (10 classes) pay a per-row
    overhead that costs more than the rest of a training step's arithmetic; laid out class
    first (``[C, B * N]``), the same kernels run vectorised across the rows, about ten times
    faster. Where the class-first layout does not give the plain expression's bits for the
    class count (:func:`_class_first_agrees`), the plain expression is used. Non-finite
    logits (a diverged model) give the same values, NaN where the plain expression has NaN,
    though a NaN's sign bit may differ.
    """
    if _class_first_agrees(logits.shape[-1], logits.dtype):
        return _class_first_training(logits, y)
    return _plain_training(logits, y)


def _plain_training(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    count, _, classes = logits.shape
    leaf = logits.detach().requires_grad_()
    with torch.enable_grad():
        flat = F.cross_entropy(leaf.reshape(-1, classes), y.reshape(-1), reduction="none")
        per_row = flat.view(count, -1).mean(dim=1)
        (grad,) = torch.autograd.grad(per_row.sum(), leaf)
    return per_row.detach().to(torch.float64), grad


def _class_first_training(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    count, examples, classes = logits.shape
    columns = count * examples
    _, log_p = class_first_log_softmax(logits)
    target = y.reshape(1, columns)
    # nll_loss with reduction "none" is -log_p at the label
    per_row = log_p[:, :columns].gather(0, target).neg_().view(count, examples).mean(dim=1)
    # Backward as autograd takes it: d(sum of row means)/d(loss) is 1 / N (mean's backward
    # divides the expanded ones by N), nll's backward puts its negation at the label.
    share = logits.new_ones(count, 1).expand(count, examples).div(examples)
    grad = torch.zeros_like(log_p)
    grad[:, :columns].scatter_(0, target, share.reshape(1, columns).neg())
    by_class = torch._log_softmax_backward_data(grad, log_p, 0, logits.dtype)
    # back to [B, N, C] in the layout autograd's gradient had (the matrix products after it
    # must see the same layout to round the same)
    incoming = by_class[:, :columns].view(classes, count, examples).permute(1, 2, 0)
    return per_row.to(torch.float64), incoming.contiguous()


@torch.no_grad()
def score_logits(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy and accuracy of each of B models on one shared test set.

    The same numbers, bit for bit, as ``F.cross_entropy(logits.reshape(-1, C), y.repeat(B),
    reduction="none").view(B, -1).mean(dim=1)`` and the mean of ``logits.argmax(-1) == y``:
    every learner (a node's :class:`~p2pfl.learn.TorchLearner` with B = 1, the simulator's
    :class:`~p2pfl.learn.batched.BatchedLearner`) reports its test loss through this function.

    Why not that expression: PyTorch's log-softmax over a short last dimension (10 classes)
    costs about 150 ns per row in per-row overhead, most of an evaluation. Laid out class
    first, ``[C, B * N]``, the same kernel runs vectorised across the rows instead, 15 to 20
    times faster. Each row's sum of exponentials is then taken class by class, in order, which
    is the order the last-dimension kernel takes when the class count is below the CPU's
    vector width (fewer than 16 classes on AVX-512, 8 on AVX2) and both use the same
    vectorised ``exp`` and ``log``. Whether the two agree for a class count is checked once
    per process on a fixed probe (:func:`_class_first_agrees`, which training's
    :func:`loss_and_logit_gradient` asks too); where they do not (more classes, another CPU),
    the plain expression is used, so the result never depends on the layout.

    Args:
        logits: ``[B, N, C]`` logits of B models on the N test examples.
        y: ``[N]`` labels (int64).

    Returns:
        ``(loss [B], accuracy [B])`` as float64 tensors.
    """
    if not _class_first_agrees(logits.shape[-1], logits.dtype):
        return _plain_scores(logits, y)
    loss, by_class, target = _class_first_losses(logits, y)
    return loss.mean(dim=1).to(torch.float64), _accuracy(logits, by_class, target, y)


def class_first_log_softmax(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Logits ``[B, N, C]`` laid out class first, and their log-softmax over the classes.

    Returns ``(by_class, log_p)``, both ``[C, M]`` with ``M`` the ``B * N`` columns padded to a
    multiple of :data:`CLASS_FIRST_PAD` (zeros in the padding); column ``b * N + n`` is model
    b's example n. PyTorch's log-softmax over a short last dimension pays a per-row overhead;
    over the first dimension the same kernel runs vectorised across the columns (see
    :func:`score_logits` for when the two give the same bits).
    """
    count, examples, classes = logits.shape
    columns = count * examples
    by_class = logits.new_empty(classes, -(-columns // CLASS_FIRST_PAD) * CLASS_FIRST_PAD)
    by_class[:, columns:].zero_()
    by_class[:, :columns].view(classes, count, examples).copy_(logits.permute(2, 0, 1))
    return by_class, F.log_softmax(by_class, dim=0)


def _class_first_losses(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-example losses ``[B, N]`` through the class-first layout; also that layout's view
    of the logits ``[C, B, N]`` and the label index ``[1, B, N]`` into it."""
    count, examples, classes = logits.shape
    columns = count * examples
    padded, log_p = class_first_log_softmax(logits)
    by_class = padded[:, :columns].view(classes, count, examples)
    log_p = log_p[:, :columns].view(classes, count, examples)
    target = y.view(1, 1, examples).expand(1, count, examples)
    return log_p.gather(0, target).squeeze(0).neg(), by_class, target


def _accuracy(logits: Tensor, by_class: Tensor, target: Tensor, y: Tensor) -> Tensor:
    """Share of examples whose argmax is the label, per model ([B], float64).

    When every column's maximum is attained once, the argmax is the label exactly where the
    label's logit is that maximum (two cheap vectorised passes over the class-first copy).
    A tie or a NaN (argmax takes the first maximum, NaN counting as the largest) sends the
    chunk to ``argmax`` itself, so the result is argmax's in every case.
    """
    best = by_class.amax(dim=0)
    if bool(((by_class == best).sum(dim=0) == 1).all()):
        correct = by_class.gather(0, target).squeeze(0) == best
    else:
        correct = logits.argmax(dim=-1) == y.unsqueeze(0)
    return correct.to(torch.float64).mean(dim=1)


def _plain_scores(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    count, _, classes = logits.shape
    flat = logits.reshape(-1, classes)
    loss = F.cross_entropy(flat, y.repeat(count), reduction="none").view(count, -1)
    correct = (logits.argmax(dim=-1) == y.unsqueeze(0)).to(torch.float64)
    return loss.mean(dim=1).to(torch.float64), correct.mean(dim=1)


def _class_first_agrees(classes: int, dtype: torch.dtype) -> bool:
    """Whether the class-first layout gives the plain expressions' bits for ``classes``
    classes on this CPU, both where it is used: each example's loss as ``F.cross_entropy``
    gives it (:func:`score_logits`) and each row's mean loss and its gradient as autograd
    gives them (:func:`loss_and_logit_gradient`). Checked once per process on 16,384 fixed
    rows of logits spread over scales from 0 to 60 (a different summation order disagrees on
    a few percent of such rows). A private generator keeps the global random stream
    untouched."""
    key = (classes, dtype)
    known = _class_first_exact.get(key)
    if known is not None:
        return known
    generator = torch.Generator().manual_seed(0)
    count, examples = 1 << 10, 16
    scale = torch.rand(count, examples, 1, generator=generator, dtype=dtype) * 60
    logits = torch.randn(count, examples, classes, generator=generator, dtype=dtype) * scale
    y = torch.randint(0, classes, (count, examples), generator=generator)
    flat, labels = logits.view(1, -1, classes), y.view(-1)
    got, _, _ = _class_first_losses(flat, labels)
    agrees = torch.equal(got[0], F.cross_entropy(flat[0], labels, reduction="none")) and all(
        torch.equal(a.view(torch.int8), b.view(torch.int8))
        for a, b in zip(_class_first_training(logits, y), _plain_training(logits, y), strict=True)
    )
    _class_first_exact[key] = agrees
    return agrees
