"""torchvision-based teachers (METHODS.md §1.1): ResNet-18 for small inputs, and ImageNet ResNet-18,
ResNet-50 and MobileNet-V2 with optional pretrained weights.

Pretrained weights come through torchvision's weights API (``IMAGENET1K_V1`` of each model),
cached as ``torch.hub.get_dir()/checkpoints/<url basename>`` (under ``$TORCH_HOME``) and loaded
with ``weights_only=True``. torchvision is imported on first use to keep ``import nrrdd_core`` fast.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from ..data.base import DataConfig
from ..errors import CheckpointError, ConfigError
from ..io import safe_torch_load
from .registry import build_model, default_cam_layer, get_classifier, register_model
from .teacher import Teacher

log = logging.getLogger(__name__)

# registry name -> (torchvision builder name, weights enum name); IMAGENET1K_V1 weights of each
_IMAGENET = {"resnet18": ("resnet18", "ResNet18_Weights"),
             "resnet50": ("resnet50", "ResNet50_Weights"),
             "mobilenet_v2": ("mobilenet_v2", "MobileNet_V2_Weights")}


def _weights(arch: str):
    import torchvision.models as tvm

    return getattr(tvm, _IMAGENET[arch][1]).IMAGENET1K_V1


def imagenet_mean_std(arch: str = "resnet18") -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet per-channel mean and std for [0,1] RGB, as the torchvision weight preset of
    ``arch`` gives them."""
    preset = _weights(arch).transforms()
    return tuple(float(v) for v in preset.mean), tuple(float(v) for v in preset.std)


def weights_path(arch: str) -> Path:
    """Where torchvision caches the ImageNet weights of ``arch``:
    ``torch.hub.get_dir()/checkpoints/<url basename>``."""
    url = _weights(arch).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _pretrained_state_dict(arch: str) -> dict:
    """ImageNet state dict of ``arch`` from the torch hub cache, fetched once when missing.

    Raises:
        CheckpointError: the file is not cached and cannot be downloaded (offline), naming the
            path where to place it.
    """
    url, path = _weights(arch).url, weights_path(arch)
    if not path.is_file():
        log.info("downloading %s to %s", url, path)
        match = torch.hub.HASH_REGEX.search(path.name)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(path), progress=False,
                                           hash_prefix=match.group(1) if match else None)
        except Exception as exc:  # noqa: BLE001 - urllib/ssl/hash errors all mean "not available"
            raise CheckpointError(
                f"ImageNet weights for {arch} are not cached and could not be downloaded "
                f"({type(exc).__name__}); place {url} at {path}") from exc
    return safe_torch_load(path)


def _imagenet_model(arch: str, num_classes: int, pretrained: bool) -> nn.Module:
    import torchvision.models as tvm

    fn = getattr(tvm, _IMAGENET[arch][0])
    if not pretrained:
        return fn(num_classes=num_classes)
    model = fn(num_classes=1000)
    model.load_state_dict(_pretrained_state_dict(arch))
    if num_classes != 1000:  # keep the ImageNet features, new head for the target classes
        old = get_classifier(model)
        new = nn.Linear(old.in_features, num_classes)
        if arch == "mobilenet_v2":
            model.classifier[-1] = new
        else:
            model.fc = new
    return model


@register_model("resnet18_small", cam_layer="layer4")
def resnet18_small(num_classes: int, image_size: int) -> nn.Module:
    """torchvision ResNet-18 with ``conv1`` = 3x3 stride 1 pad 1 (no bias) and ``maxpool`` =
    identity (METHODS.md §1.1): ``layer4`` is ``(N,512,S/8,S/8)``, 4x4 at 32 px."""
    import torchvision.models as tvm

    if image_size < 8:
        raise ConfigError(f"resnet18_small needs images of at least 8 px, got {image_size}")
    model = tvm.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def _register_imagenet(arch: str, cam_layer: str) -> None:
    def builder(num_classes: int, image_size: int, pretrained: bool = False) -> nn.Module:
        if image_size < 32:
            raise ConfigError(f"{arch} needs images of at least 32 px, got {image_size}")
        return _imagenet_model(arch, num_classes, bool(pretrained))

    builder.__doc__ = (f"torchvision {arch}; ``pretrained=True`` loads its IMAGENET1K_V1 weights "
                       "(a fresh final linear layer when num_classes != 1000).")
    register_model(arch, cam_layer=cam_layer)(builder)


_register_imagenet("resnet18", "layer4")
_register_imagenet("resnet50", "layer4")
_register_imagenet("mobilenet_v2", "features")


def pretrained_teacher(arch: str, device: torch.device | str = "cpu") -> Teacher:
    """A torchvision ImageNet classifier with its IMAGENET1K_V1 weights as a :class:`Teacher`:
    DataConfig ``"imagenet"``, 224 px, ImageNet mean/std, the 1000 category names of the
    weights' metadata (logit order).

    Raises:
        ConfigError: ``arch`` is not one of resnet18, resnet50, mobilenet_v2.
        CheckpointError: the weights are not cached and cannot be downloaded.
    """
    if arch not in _IMAGENET:
        raise ConfigError(f"no ImageNet weights for {arch!r}; choose from {sorted(_IMAGENET)}")
    weights = _weights(arch)
    mean, std = imagenet_mean_std(arch)
    dc = DataConfig(name="imagenet", image_size=int(weights.transforms().crop_size[0]), mean=mean,
                    std=std, class_names=tuple(weights.meta["categories"]))
    model = build_model(arch, num_classes=1000, image_size=dc.image_size, pretrained=True)
    return Teacher(model=model, arch=arch, data_config=dc, cam_layer=default_cam_layer(arch),
                   source=f"torchvision {arch} {weights}").to(device)
