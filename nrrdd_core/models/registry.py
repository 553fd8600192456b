"""Model registry: architecture name -> builder and default CAM layer (METHODS.md §1.1).

Builders register themselves with :func:`register_model`; the built-in ones live in
``convnet.py``, ``resnet_cifar.py`` and ``torchvision_models.py`` and are imported on first use.
Every builder is called as ``builder(num_classes, image_size, **kw)`` and returns an ``nn.Module``
that maps normalised images ``(N,3,image_size,image_size)`` to logits ``(N,num_classes)``.
Weights are initialised from the global torch RNG; callers that need reproducible weights build
inside ``torch.random.fork_rng()`` with a seed (as :func:`~nrrdd_core.models.train.train_teacher`
does).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Callable

from torch import nn

from ..errors import ConfigError

_BUILTIN_MODULES = ("convnet", "resnet_cifar", "torchvision_models")


@dataclass(frozen=True)
class _Entry:
    builder: Callable[..., nn.Module]
    cam_layer: str


_MODELS: dict[str, _Entry] = {}


def register_model(name: str, cam_layer: str):
    """Decorator registering ``builder(num_classes, image_size, **kw) -> nn.Module`` as ``name``
    with ``cam_layer`` (dotted module name) as its default CAM layer.

    Raises:
        ValueError: ``name`` is already registered by another builder.
    """

    def deco(fn):
        if name in _MODELS and _MODELS[name].builder is not fn:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = _Entry(fn, cam_layer)
        return fn

    return deco


def _load_builtin() -> None:
    for mod in _BUILTIN_MODULES:
        importlib.import_module(f"{__package__}.{mod}")


def _entry(name: str) -> _Entry:
    _load_builtin()
    if name not in _MODELS:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(sorted(_MODELS))}")
    return _MODELS[name]


def list_models() -> list[str]:
    """Names of the registered architectures, sorted."""
    _load_builtin()
    return sorted(_MODELS)


def default_cam_layer(name: str) -> str:
    """Dotted module name of the default CAM layer of architecture ``name`` (e.g. ``"layer4"``).

    Raises:
        ConfigError: unknown architecture.
    """
    return _entry(name).cam_layer


def model_kwargs(name: str) -> list[str]:
    """Keyword arguments that the builder of ``name`` accepts besides num_classes/image_size."""
    params = inspect.signature(_entry(name).builder).parameters
    return [p for p in params if p not in ("num_classes", "image_size")]


def build_model(name: str, num_classes: int, image_size: int, **kw) -> nn.Module:
    """Build architecture ``name`` for ``num_classes`` classes and square ``image_size`` px input.

    Args:
        name: a name of :func:`list_models`.
        num_classes: number of logits (>= 1).
        image_size: input side in pixels.
        **kw: builder options (``depth``, ``width`` for ConvNets; ``pretrained`` for torchvision
            ImageNet models).

    Returns:
        An ``nn.Module`` in training mode: normalised ``(N,3,S,S)`` -> logits ``(N,num_classes)``.

    Raises:
        ConfigError: unknown name, unknown keyword, or values the builder rejects.
        CheckpointError: ``pretrained=True`` and the weights file is missing and cannot be fetched.
    """
    entry = _entry(name)
    unknown = sorted(set(kw) - set(model_kwargs(name)))
    if unknown:
        raise ConfigError(f"model {name!r} takes no option(s) {unknown}; "
                          f"valid: {model_kwargs(name)}")
    if int(num_classes) < 1 or int(image_size) < 1:
        raise ConfigError(f"num_classes and image_size must be >= 1, "
                          f"got {num_classes}, {image_size}")
    return entry.builder(int(num_classes), int(image_size), **kw)


def get_classifier(model: nn.Module) -> nn.Linear:
    """The final linear layer of ``model`` (the last ``nn.Linear`` in module order): weights
    ``(num_classes, features)`` used by classic CAM (METHODS.md §4.1).

    Raises:
        ConfigError: the model has no ``nn.Linear``.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"{type(model).__name__} has no nn.Linear classifier")
    return linears[-1]
