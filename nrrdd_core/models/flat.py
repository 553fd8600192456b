"""Models as flat parameter vectors (trajectory matching, METHODS.md §5.1-5.3):
:func:`seeded_model` (a model whose initial weights depend only on a generator) and
:class:`ParamLayout` (one flat ``(P,)`` vector <-> named parameter views)."""

from __future__ import annotations

import torch
from torch import nn


def seeded_model(num_classes: int, image_size: int, arch_kwargs: dict,
                 generator: torch.Generator, arch: str = "convnet_in") -> nn.Module:
    """A freshly initialised ``arch`` (default ConvNet-IN, the experts' architecture) whose
    initial weights depend only on ``generator`` (PyTorch's default initialisation run under a
    forked global RNG seeded from it; the global RNG state is restored)."""
    from .registry import build_model

    seed = int(torch.randint(2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(arch, num_classes, image_size, **arch_kwargs)


class ParamLayout:
    """Names and shapes of a model's parameters in ``parameters()`` order; converts between one
    flat vector ``(P,)`` and a ``{name: view}`` dict for ``torch.func.functional_call``."""

    def __init__(self, model: nn.Module):
        named = list(model.named_parameters())
        self.names = [n for n, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.numel = sum(self.sizes)

    def flatten(self, model: nn.Module) -> torch.Tensor:
        """The model's parameters as one detached float32 vector ``(P,)``."""
        return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of ``flat`` ``(P,)`` shaped like the parameters (differentiable)."""
        return {n: t.view(s) for n, t, s in zip(self.names, flat.split(self.sizes), self.shapes)}

    def load_into(self, model: nn.Module, flat: torch.Tensor) -> nn.Module:
        """Copy ``flat`` ``(P,)`` into the model's parameters (in place) and return the model."""
        with torch.no_grad():
            for p, t in zip(model.parameters(), flat.split(self.sizes)):
                p.copy_(t.view_as(p))
        return model
