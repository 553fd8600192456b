"""``cifar10`` and ``cifar100``: the torchvision datasets (python-pickle batches) read from
``root``; nothing is downloaded unless ``download=True``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from ..errors import DataError
from . import register_dataset
from .base import DataConfig, DatasetBundle, ImageSplit
from .npz import PUBLISHED_STATS

#: torchvision class name and the files it needs (torchvision is imported on first use: it
#: costs seconds, and the app's first page does not need it).
_SETS = {
    "cifar10": ("CIFAR10", "data_batch_1..5, test_batch, batches.meta"),
    "cifar100": ("CIFAR100", "train, test, meta"),
}


def _load(name: str, root: str | Path, download: bool) -> DatasetBundle:
    from torchvision import datasets

    cls_name, files = _SETS[name]
    cls = getattr(datasets, cls_name)
    root = Path(root).expanduser()
    folder = root / cls.base_folder
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except (RuntimeError, OSError) as exc:  # "Dataset not found or corrupted"; download errors
        if download:
            raise DataError(f"cannot download {name} to {root} ({type(exc).__name__}: {exc}); "
                            f"fetch {cls.url} elsewhere and extract it so that {folder} "
                            f"holds {files}") from exc
        raise DataError(f"{name} not found or corrupted in {folder}: put the python-version files "
                        f"({files}, from {cls.url}) there, or pass download=True") from exc
    mean, std = PUBLISHED_STATS[name]
    cfg = DataConfig(name, 32, mean, std, tuple(train.classes))

    def split(ds) -> ImageSplit:
        return ImageSplit(torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2))),
                          torch.as_tensor(ds.targets, dtype=torch.long))

    return DatasetBundle(split(train), split(test), cfg,
                         source={"dataset": name, "root": str(root), "folder": str(folder)})


@register_dataset("cifar10")
def load_cifar10(root: str | Path, download: bool = False) -> DatasetBundle:
    """CIFAR-10 (50,000 train / 10,000 test, ``uint8 (N,3,32,32)``) from
    ``root/cifar-10-batches-py`` via ``torchvision.datasets.CIFAR10``; mean/std from
    :data:`~nrrdd_core.data.npz.PUBLISHED_STATS`.

    Raises:
        DataError: files missing or corrupt (the message names the folder torchvision expects),
        or ``download=True`` and the download failed.
    """
    return _load("cifar10", root, download)


@register_dataset("cifar100")
def load_cifar100(root: str | Path, download: bool = False) -> DatasetBundle:
    """CIFAR-100 (fine labels; 50,000 / 10,000, ``uint8 (N,3,32,32)``) from
    ``root/cifar-100-python`` via ``torchvision.datasets.CIFAR100``.

    Raises:
        DataError: as :func:`load_cifar10`.
    """
    return _load("cifar100", root, download)
