"""A torchvision ImageNet classifier as the teacher of an ImageNet-subset dataset, with weights read
from a local file (no download), METHODS.md §7.

The file is a ``state_dict`` of a torchvision ``resnet18`` / ``resnet50`` / ``mobilenet_v2`` (bare,
or under ``"state_dict"`` / ``"model"``), loaded with ``weights_only=True``:

- with one output per class of the dataset (a network fine-tuned on the subset) it is used as is;
- with the 1000 ImageNet-1k outputs, the teacher's logits are the columns of the subset's classes
  (``imagenet_indices``, e.g. :data:`~nrrdd_core.data.imagefolder.IMAGENET_SUBSETS`), in the
  dataset's label order.

Inputs are normalised with the ImageNet mean/std at the dataset's image size (128 or 224 px for the
ImageNet subsets; ResNet-18 runs at any size >= 32 px).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..data.base import DataConfig
from ..errors import CheckpointError, ConfigError
from ..io import safe_torch_load
from .teacher import Teacher

_ARCHS = {"resnet18": "layer4", "resnet50": "layer4", "mobilenet_v2": "features"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SubsetLogits(nn.Module):
    """``net``'s logits at ``indices`` only: ``(N, len(indices))`` of ``(N, 1000)``."""

    def __init__(self, net: nn.Module, indices: Sequence[int]):
        super().__init__()
        self.net = net
        self.register_buffer("indices", torch.as_tensor(list(indices), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).index_select(1, self.indices)


def _state_dict(path: Path) -> dict:
    obj = safe_torch_load(path)
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} is not a state_dict of tensors (nor one under 'state_dict' "
                              "or 'model')")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def local_imagenet_teacher(path: str | Path, data_config: DataConfig,
                           imagenet_indices: Sequence[int] | None = None, arch: str = "resnet18",
                           device: torch.device | str = "cpu") -> Teacher:
    """The teacher described in the module docstring.

    Args:
        path: the weights file.
        data_config: the dataset's config (class names and image size are kept; mean/std become
            ImageNet's).
        imagenet_indices: ImageNet-1k index of each dataset label (needed for 1000-output weights).
        arch: torchvision architecture of the weights.
        device: where the teacher runs.

    Raises:
        ConfigError: unknown ``arch``; 1000-output weights without ``imagenet_indices`` of one
            index per class.
        CheckpointError: missing / unsafe / unreadable file, or weights that do not fit ``arch``.
    """
    import torchvision.models as tvm

    if arch not in _ARCHS:
        raise ConfigError(f"unknown architecture {arch!r}; choose from {sorted(_ARCHS)}")
    path = Path(path)
    sd = _state_dict(path)
    head = [k for k in sd if k.endswith(("fc.weight", "classifier.1.weight"))]
    outputs = int(sd[head[0]].shape[0]) if head else -1
    k = data_config.num_classes
    if outputs not in (k, 1000):
        raise CheckpointError(f"{path}: {outputs} outputs; need {k} (one per class) or 1000 "
                              "(ImageNet-1k)")
    net = getattr(tvm, arch)(num_classes=outputs)
    try:
        net.load_state_dict(sd)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit torchvision {arch}: "
                              f"{str(exc).splitlines()[0]}") from exc
    cam_layer = _ARCHS[arch]
    if outputs != k or k == 1000 and imagenet_indices is not None:
        if imagenet_indices is None or len(imagenet_indices) != k:
            raise ConfigError(f"{path} has the 1000 ImageNet outputs: give imagenet_indices, one "
                              f"ImageNet-1k index per class ({k})")
        net, cam_layer = SubsetLogits(net, imagenet_indices), "net." + cam_layer
    dc = replace(data_config, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return Teacher(net, arch, dc, cam_layer, source=f"torchvision {arch} weights {path}").to(device)
