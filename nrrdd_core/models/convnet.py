"""ConvNet-BN and ConvNet-IN (METHODS.md §1.1; RDED / MTT / DATM code).

``depth`` x [conv3x3 (pad 1) -> norm -> ReLU -> AvgPool2d(2)]; flatten; linear. The norm is
``BatchNorm2d`` (``convnet_bn``) or ``GroupNorm(width, width, affine=True)``, i.e. instance norm
(``convnet_in``, no running statistics, used for expert trajectories).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .registry import register_model


def default_depth(image_size: int) -> int:
    """Depth giving a final map of 4 to 7 px: 3 at 32 px, 4 at 64 px, 5 at 128 px
    (``floor(log2(image_size / 4))``, at least 1)."""
    return max(1, (image_size // 4).bit_length() - 1)


class ConvNet(nn.Module):
    """ConvNet of METHODS.md §1.1.

    Attributes:
        features: ``nn.Sequential`` of the ``depth`` blocks; output ``(N, width, s, s)`` with
            ``s = image_size // 2**depth`` (the CAM layer).
        classifier: ``nn.Linear(width * s * s, num_classes)``.
    """

    def __init__(self, num_classes: int, image_size: int, depth: int, width: int, norm: str):
        super().__init__()
        if depth < 1 or width < 1:
            raise ConfigError(f"ConvNet depth and width must be >= 1, got {depth}, {width}")
        side = image_size
        layers: list[nn.Module] = []
        for d in range(depth):
            side //= 2
            if side < 1:
                raise ConfigError(f"ConvNet depth {depth} is too deep for {image_size}px images "
                                  f"(at most {d})")
            norm_layer = (nn.BatchNorm2d(width) if norm == "bn"
                          else nn.GroupNorm(width, width, affine=True))
            layers += [nn.Conv2d(3 if d == 0 else width, width, 3, padding=1), norm_layer,
                       nn.ReLU(inplace=True), nn.AvgPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images ``(N,3,S,S)`` -> logits ``(N,num_classes)``."""
        return self.classifier(torch.flatten(self.features(x), 1))


@register_model("convnet_bn", cam_layer="features")
def convnet_bn(num_classes: int, image_size: int, depth: int | None = None,
               width: int = 128) -> ConvNet:
    """ConvNet-BN (RDED code): ``depth`` defaults to :func:`default_depth`, ``width`` 128."""
    return ConvNet(num_classes, image_size, depth or default_depth(image_size), width, "bn")


@register_model("convnet_in", cam_layer="features")
def convnet_in(num_classes: int, image_size: int, depth: int | None = None,
               width: int = 128) -> ConvNet:
    """ConvNet-IN (MTT/DATM/EDF code): instance norm as ``GroupNorm(width, width)``."""
    return ConvNet(num_classes, image_size, depth or default_depth(image_size), width, "in")
