"""Models by name, initialised from a seed alone, and the user's own models.

Every architecture is a *factory* ``factory(input_shape, num_classes, *, seed, **params) ->
nn.Module``: ``input_shape`` is one example's shape as the dataset gives it (``(64,)`` for
digits, ``(40,)`` for MNIST-1D, ``(C, H, W)`` for images) and the module maps ``[N,
*input_shape]`` to ``[N, num_classes]`` logits. :data:`MODELS` holds the built-in ones:

* ``mlp`` (``hidden``: list of widths, default ``[32]``): Linear layers with ReLU between;
  a multi-dimensional input is flattened first.
* ``cnn1d`` (``channels``, default ``[32, 32, 32]``): 1-D convolutions (kernel 5 then 3,
  stride 2, ReLU) and a linear classifier, for MNIST-1D-like signals ``[L]`` (one channel)
  or ``[C, L]``.
* ``lenet5``: LeNet-5 (LeCun et al. 1998) with ReLU and max pooling, for ``[C, H, W]`` images
  or a flat square image ``[H*W]`` (viewed as ``1xHxW``); the first convolution is padded to
  keep the size, as usual for 28x28 inputs, and the second too when the input is smaller
  than 16x16 (8x8 digits).
* ``cifar_cnn`` (``channels`` default ``[32, 64]``, ``hidden`` default 512): the CNN of
  McMahan et al. 2017: two 5x5 convolutions ("same" padding), each followed by 2x2 max
  pooling, a ReLU layer of 512 units and the output layer.

Initialisation: the module is built on the meta device (nothing allocated, the global RNG
untouched), its parameters are counted and refused above :data:`MAX_PARAMETERS`, then every
parameter is drawn from a private generator seeded with ``seed`` with torch's default
formulas (Linear/Conv: weight and bias uniform in ``±1/sqrt(fan_in)``; norms: ones and
zeros). The same name, parameters, shapes and seed give bit-identical parameters.

``model = "python:package.module:factory"`` imports and calls a user's factory. This runs
the user's code, like any Python plug-in; only use factories you trust. A factory that takes
no ``seed`` keyword is called inside ``torch.random.fork_rng`` after ``torch.manual_seed(seed)``,
so its default initialisation is deterministic too and the caller's global RNG is unchanged.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from p2pfl.errors import ConfigError
from p2pfl.learn._config import check_params

SEED_MASK = 2**64 - 1
MAX_PARAMETERS = 100_000_000
"""Largest model accepted (400 MB as float32); a model travels whole in every update."""
PYTHON_PREFIX = "python:"

ModelFactory = Callable[..., nn.Module]


def mlp(layer_sizes: Sequence[int], *, seed: int) -> nn.Module:
    """A multilayer perceptron: ``Linear`` layers with ``ReLU`` between them.

    ``mlp([64, 32, 10], seed=0)`` maps 64 features through one hidden layer of 32 units to
    10 logits, initialised as described in the module docstring.

    Args:
        layer_sizes: input size, hidden sizes..., output size; at least two entries.
        seed: seed of the initialisation; any int (reduced modulo 2**64).

    Raises:
        ConfigError: fewer than two sizes, a size below 1, or too many parameters.
    """
    sizes = list(layer_sizes)
    if len(sizes) < 2:
        raise ConfigError("layer_sizes", sizes, "at least two sizes: input, hidden..., output")
    if any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in sizes):
        raise ConfigError("layer_sizes", sizes, "every size must be an int >= 1")
    return _materialise(_mlp_layers(sizes), seed, "mlp")


def _mlp_layers(sizes: list[int], flatten: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()] if flatten else []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        if i > 0:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(fan_in, fan_out, device="meta"))
    return nn.Sequential(*layers)


def _meta_mlp(
    input_shape: tuple[int, ...], num_classes: int, *, hidden: Sequence[int] = (32,)
) -> nn.Module:
    widths = _int_list("hidden", hidden, minimum=1)
    flat = math.prod(input_shape)
    return _mlp_layers([flat, *widths, num_classes], flatten=len(input_shape) > 1)


class _Cnn1d(nn.Module):
    def __init__(self, in_channels: int, length: int, channels: list[int], num_classes: int):
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_channels
        for index, width in enumerate(channels):
            kernel, padding = (5, 2) if index == 0 else (3, 1)
            layers += [nn.Conv1d(previous, width, kernel, stride=2, padding=padding), nn.ReLU()]
            length = (length + 2 * padding - kernel) // 2 + 1
            previous = width
        if length < 1:
            raise ConfigError(
                "model_params.channels", channels, f"fewer layers for signals of length {length}"
            )
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(previous * length, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 2:  # [N, L]: one channel
            x = x.unsqueeze(1)
        return self.classifier(self.features(x).flatten(1))  # type: ignore[no-any-return]


def _meta_cnn1d(
    input_shape: tuple[int, ...], num_classes: int, *, channels: Sequence[int] = (32, 32, 32)
) -> nn.Module:
    widths = _int_list("channels", channels, minimum=1, at_least=1)
    if len(input_shape) == 1:
        in_channels, length = 1, input_shape[0]
    elif len(input_shape) == 2:
        in_channels, length = input_shape
    else:
        raise ConfigError("model", "cnn1d", f"1-D signals [L] or [C, L], not {list(input_shape)}")
    return _Cnn1d(in_channels, length, widths, num_classes)


class _ImageCnn(nn.Module):
    """Convolution blocks (conv, ReLU, 2x2 max pool) then a ReLU MLP head."""

    def __init__(
        self,
        image: tuple[int, int, int],
        convs: list[tuple[int, int, int]],
        hidden: list[int],
        num_classes: int,
    ) -> None:
        super().__init__()
        self.image = image
        channels, height, width = image
        layers: list[nn.Module] = []
        for out_channels, kernel, padding in convs:
            layers += [
                nn.Conv2d(channels, out_channels, kernel, padding=padding),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            height = (height + 2 * padding - kernel + 1) // 2
            width = (width + 2 * padding - kernel + 1) // 2
            channels = out_channels
        if height < 1 or width < 1:
            raise ConfigError("model", list(image), "a larger image for these convolutions")
        self.features = nn.Sequential(*layers)
        head: list[nn.Module] = []
        previous = channels * height * width
        for size in hidden:
            head += [nn.Linear(previous, size), nn.ReLU()]
            previous = size
        head.append(nn.Linear(previous, num_classes))
        self.classifier = nn.Sequential(*head)

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], *self.image)
        return self.classifier(self.features(x).flatten(1))  # type: ignore[no-any-return]


def _image_shape(name: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) == 3:
        c, h, w = input_shape
        return c, h, w
    if len(input_shape) == 1 and math.isqrt(input_shape[0]) ** 2 == input_shape[0]:
        side = math.isqrt(input_shape[0])
        return 1, side, side
    raise ConfigError(
        "model", name, f"images [C, H, W] or a flat square image, not {list(input_shape)}"
    )


def _meta_lenet5(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    image = _image_shape("lenet5", input_shape)
    second_padding = 2 if min(image[1:]) < 16 else 0
    return _ImageCnn(image, [(6, 5, 2), (16, 5, second_padding)], [120, 84], num_classes)


def _meta_cifar_cnn(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    channels: Sequence[int] = (32, 64),
    hidden: int = 512,
) -> nn.Module:
    image = _image_shape("cifar_cnn", input_shape)
    widths = _int_list("channels", channels, minimum=1, at_least=1)
    (size,) = _int_list("hidden", [hidden], minimum=1)
    return _ImageCnn(image, [(w, 5, 2) for w in widths], [size], num_classes)


class BuiltinModel:
    """A built-in factory: the architecture is built on the meta device, counted, then
    allocated and initialised from the seed (see the module docstring)."""

    def __init__(self, architecture: Callable[..., nn.Module]) -> None:
        self.architecture = architecture
        parameters = list(inspect.signature(architecture).parameters.values())
        seed = inspect.Parameter("seed", inspect.Parameter.KEYWORD_ONLY, annotation=int)
        self.__signature__ = inspect.Signature([*parameters[:2], seed, *parameters[2:]])

    def meta(self, input_shape: tuple[int, ...], num_classes: int, **params: Any) -> nn.Module:
        """The architecture on the meta device: shapes only, nothing allocated."""
        with torch.device("meta"):
            return self.architecture(input_shape, num_classes, **params)

    def __call__(
        self, input_shape: tuple[int, ...], num_classes: int, *, seed: int, **params: Any
    ) -> nn.Module:
        return _materialise(self.meta(input_shape, num_classes, **params), seed, "model")


MODELS: dict[str, ModelFactory] = {
    "mlp": BuiltinModel(_meta_mlp),
    "cnn1d": BuiltinModel(_meta_cnn1d),
    "lenet5": BuiltinModel(_meta_lenet5),
    "cifar_cnn": BuiltinModel(_meta_cifar_cnn),
}
"""Built-in architectures by name; ``python:package.module:factory`` names a user's."""


def resolve_factory(name: str) -> ModelFactory:
    """The factory called ``name``: a key of :data:`MODELS` or ``python:module:attribute``.

    Importing a ``python:`` factory runs that module's code.

    Raises:
        ConfigError: unknown name, or the module or attribute cannot be imported.
    """
    if not isinstance(name, str):
        raise ConfigError("model", name, "a model name")
    if name in MODELS:
        return MODELS[name]
    allowed = f"one of {', '.join(MODELS)} or 'python:package.module:factory'"
    if not name.startswith(PYTHON_PREFIX):
        raise ConfigError("model", name, allowed)
    module_name, _, attribute = name[len(PYTHON_PREFIX) :].partition(":")
    if not module_name or not attribute:
        raise ConfigError("model", name, allowed)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError("model", name, f"an importable module ({exc})") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ConfigError("model", name, f"a callable {attribute!r} in module {module_name}")
    return factory  # type: ignore[no-any-return]


def build_model(
    name: str,
    params: Mapping[str, Any],
    input_shape: Sequence[int],
    num_classes: int,
    *,
    seed: int,
) -> nn.Module:
    """The model ``name`` with ``params`` for examples of ``input_shape``, seeded by ``seed``.

    Raises:
        ConfigError: unknown model or parameter, a bad value, more than
            :data:`MAX_PARAMETERS` parameters, or a user factory that does not return a module.
    """
    factory = resolve_factory(name)
    shape = tuple(int(s) for s in input_shape)
    _check_params(name, factory, params)
    if isinstance(factory, BuiltinModel):
        return _materialise(factory.meta(shape, num_classes, **params), seed, name)
    if "seed" in inspect.signature(factory).parameters:
        module = factory(shape, num_classes, seed=seed, **params)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed & SEED_MASK)
            module = factory(shape, num_classes, **params)
    if not isinstance(module, nn.Module):
        raise ConfigError("model", name, "a factory returning a torch.nn.Module")
    check_model_size(name, _count(module))
    return module


def count_parameters(
    name: str, params: Mapping[str, Any], input_shape: Sequence[int], num_classes: int
) -> int:
    """Number of trainable parameters of a built-in model, counted without allocating them.

    For a ``python:`` factory the model is built for real (its code decides what it
    allocates) and counted.

    Raises:
        ConfigError: as :func:`build_model`, except that the size limit is not applied.
    """
    factory = resolve_factory(name)
    _check_params(name, factory, params)
    shape = tuple(int(s) for s in input_shape)
    if isinstance(factory, BuiltinModel):
        return _count(factory.meta(shape, num_classes, **params))
    return _count(build_model(name, params, shape, num_classes, seed=0))


def _check_params(name: str, factory: ModelFactory, params: Mapping[str, Any]) -> None:
    check_params(
        "model_params",
        f"model {name!r}",
        factory,
        params,
        fixed=("seed",),
        keyword_only=True,
        hint=" (when switching models, drop the other model's parameters: model_params = {})",
    )


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def check_model_size(name: str, count: int) -> None:
    """Refuse a model of more than :data:`MAX_PARAMETERS` parameters.

    Raises:
        ConfigError: ``count`` is above the limit (the message names both).
    """
    if count > MAX_PARAMETERS:
        raise ConfigError(
            "model",
            name,
            f"a model of at most {MAX_PARAMETERS:,} parameters (this one has {count:,})",
        )


def _materialise(module: nn.Module, seed: int, name: str) -> nn.Module:
    """Check the size of a meta-device ``module``, allocate it and draw its parameters."""
    check_model_size(name, _count(module))
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed & SEED_MASK)
    _allocate(module)
    with torch.no_grad():
        for layer in module.modules():
            _init_layer(layer, generator)
    return module


def _allocate(module: nn.Module) -> None:
    """Give every meta parameter and buffer real (uninitialised) CPU memory, ties kept.

    ``Module.to_empty`` does the same but its first call imports torch's decomposition
    tables, about a second, which every simulation run would pay."""
    allocated: dict[int, torch.Tensor] = {}
    for layer in module.modules():
        tables: tuple[dict[str, Any], ...] = (layer._parameters, layer._buffers)
        for table in tables:
            for name, tensor in table.items():
                if tensor is None or not tensor.is_meta:
                    continue
                new = allocated.get(id(tensor))
                if new is None:
                    new = torch.empty(tensor.shape, dtype=tensor.dtype)
                    if isinstance(tensor, nn.Parameter):
                        new = nn.Parameter(new, requires_grad=tensor.requires_grad)
                    allocated[id(tensor)] = new
                table[name] = new


def _init_layer(layer: nn.Module, generator: torch.Generator) -> None:
    if isinstance(layer, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d):
        weight = layer.weight
        fan_in = weight.shape[1] * math.prod(weight.shape[2:])
        bound = 1.0 / math.sqrt(fan_in) if fan_in else 0.0
        weight.uniform_(-bound, bound, generator=generator)
        if layer.bias is not None:
            layer.bias.uniform_(-bound, bound, generator=generator)
    elif isinstance(layer, nn.LayerNorm | nn.GroupNorm | nn.modules.batchnorm._NormBase):
        if getattr(layer, "weight", None) is not None:
            nn.init.ones_(layer.weight)
        if getattr(layer, "bias", None) is not None:
            nn.init.zeros_(layer.bias)
        if isinstance(layer, nn.modules.batchnorm._NormBase):
            layer.reset_running_stats()
    elif any(True for _ in layer.parameters(recurse=False)):
        raise ConfigError("model", type(layer).__name__, "layers p2pfl knows how to initialise")


def _int_list(key: str, values: object, *, minimum: int, at_least: int = 0) -> list[int]:
    items = list(values) if isinstance(values, list | tuple) else None
    if (
        items is None
        or len(items) < at_least
        or any(not isinstance(v, int) or isinstance(v, bool) or v < minimum for v in items)
    ):
        raise ConfigError(
            f"model_params.{key}", values, f"a list of at least {at_least} ints >= {minimum}"
        )
    return items
