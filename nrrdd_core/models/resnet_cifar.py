"""CIFAR ResNet-20/32/44/56 (He et al. 2016, section 4.2) and loading of public checkpoints.

Layout and parameter names follow the widely used ``akamaster/pytorch_resnet_cifar10`` code (see
``../shared/data/README.md``): 3x3 conv 3->16 (no bias), BN, ReLU; three stages of ``n`` basic
blocks with 16, 32, 64 channels (stages 2 and 3 start with stride 2); basic block =
conv3x3-BN-ReLU-conv3x3-BN + shortcut, ReLU; shortcut "option A" (identity, or every second pixel
``x[:, :, ::2, ::2]`` zero-padded equally on both channel sides); global average pool; ``linear``.
``n = (depth - 2) / 6``: 3, 5, 7, 9 for depth 20, 32, 44, 56.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data.base import DataConfig
from ..errors import CheckpointError, ConfigError
from ..io import safe_torch_load
from .registry import build_model, default_cam_layer, register_model
from .teacher import Teacher

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck")


class ShortcutA(nn.Module):
    """Option-A shortcut: ``(N,C,H,W) -> (N,C+2p,ceil(H/2),ceil(W/2))`` by taking every second
    pixel and zero-padding ``p = (out_channels - C) // 2`` channels on each side. No parameters."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.pad = (out_channels - in_channels) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = (ShortcutA(in_planes, planes) if stride != 1 or in_planes != planes
                         else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """CIFAR ResNet with ``blocks`` basic blocks per stage.

    Input normalised images ``(N,3,S,S)``; ``layer3`` output ``(N,64,S/4,S/4)`` (8x8 at 32 px, the
    CAM layer); logits ``(N,num_classes)`` from ``linear`` after global average pooling, so
    classic CAM is exact.
    """

    def __init__(self, blocks: int, num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        planes_in = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            layers = []
            for i in range(blocks):
                layers.append(BasicBlock(planes_in, planes, stride if i == 0 else 1))
                planes_in = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():  # the reference code's initialisation
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def _register(depth: int) -> None:
    def builder(num_classes: int, image_size: int) -> ResNetCifar:
        if image_size < 4:
            raise ConfigError(f"resnet{depth}_cifar needs images of at least 4 px, "
                              f"got {image_size}")
        return ResNetCifar((depth - 2) // 6, num_classes)

    builder.__doc__ = f"ResNet-{depth} for CIFAR ({(depth - 2) // 6} blocks per stage)."
    register_model(f"resnet{depth}_cifar", cam_layer="layer3")(builder)


for _depth in (20, 32, 44, 56):
    _register(_depth)


def akamaster_data_config(class_names: tuple[str, ...] = CIFAR10_CLASSES) -> DataConfig:
    """Data config of the ``akamaster/pytorch_resnet_cifar10`` CIFAR-10 checkpoints: 32 px,
    [0,1] RGB normalised with the ImageNet mean/std (that training script's values, as torchvision's
    ImageNet presets give them), CIFAR-10 class names in standard order."""
    from .torchvision_models import imagenet_mean_std

    mean, std = imagenet_mean_std()
    return DataConfig(name="cifar10", image_size=32, mean=mean, std=std,
                      class_names=tuple(class_names))


def public_checkpoint_data_config(dataset_class_names: Sequence[str]) -> DataConfig:
    """The data config a public CIFAR ResNet checkpoint is loaded with, for a dataset with these
    class names (the app and the CLI both use it, so both refuse the same datasets). A 10-class
    dataset gets the CIFAR-10 names in standard order (the checkpoints are CIFAR-10 models), so
    :meth:`Teacher.check_compatible` refuses a 10-class dataset with other names or another order
    (``shapes``, a reordered class file); other class counts (a CIFAR-100 checkpoint) take the
    dataset's names, as no public order is known for them."""
    names = tuple(dataset_class_names)
    return akamaster_data_config() if len(names) == len(CIFAR10_CLASSES) else akamaster_data_config(names)


def load_resnet_cifar_checkpoint(path: str | Path, arch: str, data_config: DataConfig,
                                 device: torch.device | str = "cpu") -> Teacher:
    """Load a public CIFAR ResNet checkpoint (``weights_only=True``) as a :class:`Teacher`.

    Args:
        path: a ``.th``/``.pt`` file holding ``{"state_dict": ...}`` or a bare state dict; keys
            may carry a ``module.`` prefix (DataParallel).
        arch: ``"resnet20_cifar"`` ... ``"resnet56_cifar"``.
        data_config: the normalisation and class names the checkpoint was trained with, e.g.
            :func:`akamaster_data_config`.
        device: where the teacher goes.

    Raises:
        ConfigError: ``arch`` is not a CIFAR ResNet.
        CheckpointError: missing/corrupt file, or weights that do not fit ``arch`` with
            ``data_config.num_classes`` classes (the message lists the first bad keys).
    """
    if not (arch.startswith("resnet") and arch.endswith("_cifar")):
        raise ConfigError(f"{arch!r} is not a CIFAR ResNet (resnet20_cifar ... resnet56_cifar)")
    obj = safe_torch_load(path)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no state_dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = build_model(arch, num_classes=data_config.num_classes,
                        image_size=data_config.image_size)
    mine = model.state_dict()
    for k in mine:  # older checkpoints predate BN's num_batches_tracked counter
        if k.endswith("num_batches_tracked"):
            state.setdefault(k, mine[k])
    missing = sorted(set(mine) - set(state))
    unexpected = sorted(set(state) - set(mine))
    wrong = sorted(k for k in set(mine) & set(state) if mine[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{path} does not fit {arch} with {data_config.num_classes} classes: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape "
            f"{[(k, tuple(state[k].shape)) for k in wrong[:3]]}")
    model.load_state_dict(state)
    return Teacher(model=model, arch=arch, data_config=data_config,
                   cam_layer=default_cam_layer(arch), source=str(path)).to(device)
