"""ImageFolder data read per class on demand (METHODS.md §7): ``imagefolder_stream`` and
``imagenet_subset_stream``.

The in-memory entries (``imagefolder``, ``imagenet_subset``) decode every image when the dataset
is loaded, so memory grows with the dataset. These entries only list the files: a
:class:`StreamingSplit` knows every image's path and label, and decodes images when a method asks
for them (:meth:`StreamingSplit.float01`), in ``DataLoader`` worker processes. RDED and NRR-DD's
selection then read only the ``mipc`` images of each class they score (plus the few they stitch),
and memory does not grow with the dataset. Decoding is :func:`~nrrdd_core.data.imagefolder.load_rgb`
(shorter side resized to ``image_size``, centre crop), so an image is the same pixels as in the
in-memory entry.

Differences from the in-memory entries: an unreadable file is found when it is read (a
:class:`~nrrdd_core.errors.DataError` naming it, instead of being skipped at load time); the
``imagefolder_stream`` mean/std come from a seeded sample of at most 256 training images; code that
needs every image at once (teacher training, expert trajectories, a student's test set) reads
``split.x``, which decodes the whole split (logged).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError, DataError
from . import register_dataset
from .base import DataConfig, DatasetBundle, ImageSplit, to_float01
from .imagefolder import (IMAGENET_MEAN, IMAGENET_STD, IMAGENET_SUBSETS, Sample, _check_size,
                          _check_subset, _classes, _samples, _split, load_rgb, subset_wnids)
from .npz import channel_stats

log = logging.getLogger(__name__)

#: images per DataLoader batch when decoding
DECODE_BATCH = 16


class _Files(torch.utils.data.Dataset):
    """``uint8 (3,S,S)`` tensors of image files (what a DataLoader worker decodes)."""

    def __init__(self, paths: Sequence[str], size: int):
        self.paths, self.size = list(paths), size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        try:
            arr = load_rgb(self.paths[i], self.size)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise DataError(f"unreadable image {self.paths[i]}: {exc}; remove it, or use the "
                            "in-memory entry (imagefolder / imagenet_subset), which skips such "
                            "files") from exc
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


class StreamingSplit:
    """One split whose images are decoded when asked for (the interface of
    :class:`~nrrdd_core.data.base.ImageSplit` that the methods use).

    Attributes:
        paths: image file of each index. y: ``int64 (N,)`` labels. size: image side in px.
        workers: DataLoader worker processes decoding (0 = in this process).
        decoded: number of images decoded so far (reads of the same image count again).
    """

    def __init__(self, samples: Sequence[Sample], size: int, workers: int = 2):
        self.paths = [p for p, _ in samples]
        self.y = torch.tensor([lab for _, lab in samples], dtype=torch.long)
        self.size, self.workers = int(size), int(workers)
        self.decoded = 0

    # the label-only methods of the in-memory split
    __len__, indices_of, counts = ImageSplit.__len__, ImageSplit.indices_of, ImageSplit.counts

    def uint8(self, idx: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        """Images ``idx`` (all when None) decoded: ``uint8 (n,3,S,S)``, in ``idx`` order.

        Raises:
            DataError: an unreadable file (named).
        """
        idx = torch.arange(len(self)) if idx is None else torch.as_tensor(idx, dtype=torch.long)
        files = _Files([self.paths[i] for i in idx.reshape(-1).tolist()], self.size)
        self.decoded += len(files)
        if len(files) == 0:
            return torch.zeros(0, 3, self.size, self.size, dtype=torch.uint8)
        workers = min(self.workers, -(-len(files) // DECODE_BATCH))
        if workers <= 1:
            return torch.stack([files[i] for i in range(len(files))])
        loader = torch.utils.data.DataLoader(files, batch_size=DECODE_BATCH, num_workers=workers)
        return torch.cat(list(loader))

    def float01(self, idx: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        """Images ``idx`` (all when None) as float32 [0, 1] ``(n,3,S,S)``, decoded now."""
        return to_float01(self.uint8(idx))

    @property
    def x(self) -> torch.Tensor:
        """Every image of the split, decoded now (``uint8 (N,3,S,S)``): memory grows with the
        split. For code that needs all images at once (teacher training, experts, test sets)."""
        log.info("decoding all %d images of a streamed split (%d px)", len(self), self.size)
        return self.uint8()

    def select(self, mask: torch.Tensor, labels: torch.Tensor) -> "StreamingSplit":
        """The images where ``mask`` (``bool (N,)``) is True, relabelled ``labels`` (for
        :meth:`~nrrdd_core.data.base.DatasetBundle.subset`); nothing is decoded."""
        keep = torch.nonzero(mask).flatten().tolist()
        out = StreamingSplit([(self.paths[i], 0) for i in keep], self.size, self.workers)
        out.y = labels.long().clone()
        return out


def _sample_stats(split: StreamingSplit, seed: int, n: int = 256) -> tuple[tuple, tuple]:
    """Channel mean/std of a seeded sample of at most ``n`` images of ``split``."""
    pick = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    x = split.uint8(pick).permute(0, 2, 3, 1).numpy()
    split.decoded = 0  # the statistics sample is not a method's read
    return channel_stats(x, chunk=16)  # small float64 chunks: the sample costs little memory


def _check_workers(workers) -> int:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"workers must be a whole number >= 0; got {workers!r}")
    return workers


@register_dataset("imagefolder_stream")
def load_imagefolder_stream(root: str | Path, image_size: int = 64, test_fraction: float = 0.2,
                            seed: int = 0, workers: int = 2) -> DatasetBundle:
    """An ImageFolder tree read on demand (same layouts, classes and split as ``imagefolder``).

    Args:
        root: ``root/train/<class>/*`` + ``root/val|test/<class>/*``, or ``root/<class>/*``.
        image_size: output side in pixels (shorter side resized, centre crop).
        test_fraction: share of each class sent to the test split (``root/<class>`` layout).
        seed: seed of the split and of the mean/std sample.
        workers: DataLoader worker processes decoding images (0 = in the calling process).

    Returns:
        A :class:`DatasetBundle` of two :class:`StreamingSplit`; ``config.name`` =
        ``"imagefolder"``; mean/std of a sample of the train split.

    Raises:
        DataError: missing root, no class folders, an empty class.
        ConfigError: ``image_size``, ``test_fraction`` or ``workers`` out of range.
    """
    size, workers = _check_size(image_size), _check_workers(workers)
    if not 0 <= float(test_fraction) < 1:
        raise ConfigError(f"test_fraction must be in [0, 1); got {test_fraction}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    val_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if (root / "train").is_dir() and val_dir is not None:
        train_dir = root / "train"
        classes, class_to_idx = _classes(train_dir)
        train, test = _samples(train_dir, class_to_idx), _samples(val_dir, class_to_idx)
    else:
        train_dir = root
        classes, class_to_idx = _classes(root)
        train, test = _split(_samples(root, class_to_idx), float(test_fraction),
                             torch.Generator().manual_seed(int(seed)))
    tr = _nonempty(StreamingSplit(train, size, workers), train_dir, classes)
    mean, std = _sample_stats(tr, int(seed))
    return DatasetBundle(tr, StreamingSplit(test, size, workers),
                         DataConfig("imagefolder", size, mean, std, tuple(classes)),
                         source={"dataset": "imagefolder_stream", "root": str(root),
                                 "seed": int(seed), "streamed": True})


@register_dataset("imagenet_subset_stream")
def load_imagenet_subset_stream(root: str | Path, subset: str = "imagenette", image_size: int = 128,
                                workers: int = 2) -> DatasetBundle:
    """A 10-class ImageNet-1k subset (METHODS.md §7) of a full ImageNet tree, read on demand
    (classes, labels and names as ``imagenet_subset``; ImageNet mean/std; the ImageNet-1k index of
    each label in ``source["imagenet_indices"]``).

    Raises:
        ConfigError: unknown subset, bad ``image_size`` / ``workers``.
        DataError: ``root/train`` missing or without the 1000 wnid folders, an empty class.
    """
    from torchvision.models import ResNet18_Weights

    _check_subset(subset)
    size, workers = _check_size(image_size), _check_workers(workers)
    root = Path(root).expanduser()
    train_dir, val_dir = root / "train", root / "val"
    chosen = subset_wnids(train_dir, subset, "imagenet_subset_stream", "imagefolder_stream")
    indices = IMAGENET_SUBSETS[subset]
    class_to_idx = {w: k for k, w in enumerate(chosen)}
    test = _samples(val_dir, class_to_idx) if val_dir.is_dir() else []
    tr = _nonempty(StreamingSplit(_samples(train_dir, class_to_idx), size, workers), train_dir, chosen)
    names = tuple(ResNet18_Weights.IMAGENET1K_V1.meta["categories"][i] for i in indices)
    return DatasetBundle(tr, StreamingSplit(test, size, workers),
                         DataConfig(subset, size, IMAGENET_MEAN, IMAGENET_STD, names),
                         source={"dataset": "imagenet_subset_stream", "root": str(root),
                                 "subset": subset, "wnids": chosen, "streamed": True,
                                 "imagenet_indices": list(indices)})


def _nonempty(split: StreamingSplit, folder: Path, classes: list[str]) -> StreamingSplit:
    empty = [classes[i] for i in torch.nonzero(split.counts(len(classes)) == 0).flatten().tolist()]
    if empty:
        raise DataError(f"no images in {folder / empty[0]}; each class folder needs at least one")
    return split
