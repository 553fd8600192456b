"""Core dataset types shared by every dataset entry, method and page.

Images are held in memory as ``uint8`` tensors ``(N, 3, H, W)`` (RGB, [0, 255]) with ``int64``
labels ``(N,)``. Models consume *normalised* float images: ``(x/255 - mean) / std`` with the
mean and std of the :class:`DataConfig` (no mean/std literal appears anywhere else).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Sequence

import torch

from ..errors import DataError


@dataclass(frozen=True)
class DataConfig:
    """What a model needs to know about its input data.

    Attributes:
        name: dataset name (registry key, e.g. ``"shapes"``, ``"cifar10"``).
        image_size: side of the square input in pixels (32, 64, 128, 224...).
        mean, std: per-channel RGB normalisation constants for [0, 1] pixels.
        class_names: class names in label order (index = label).
    """

    name: str
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict:
        return {"name": self.name, "image_size": self.image_size, "mean": list(self.mean),
                "std": list(self.std), "class_names": list(self.class_names)}

    @classmethod
    def from_dict(cls, d: dict) -> "DataConfig":
        return cls(name=str(d["name"]), image_size=int(d["image_size"]),
                   mean=tuple(float(v) for v in d["mean"]), std=tuple(float(v) for v in d["std"]),
                   class_names=tuple(str(c) for c in d["class_names"]))

    def mean_tensor(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """Mean as a ``(1, 3, 1, 1)`` tensor."""
        return torch.tensor(self.mean, device=device, dtype=dtype).view(1, 3, 1, 1)

    def std_tensor(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """Std as a ``(1, 3, 1, 1)`` tensor."""
        return torch.tensor(self.std, device=device, dtype=dtype).view(1, 3, 1, 1)

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels ``(N,3,H,W)`` -> normalised pixels (same shape)."""
        return (x01 - self.mean_tensor(x01.device, x01.dtype)) / self.std_tensor(x01.device, x01.dtype)

    def denormalize(self, xn: torch.Tensor) -> torch.Tensor:
        """Normalised pixels ``(N,3,H,W)`` -> [0, 1] pixels (not clipped)."""
        return xn * self.std_tensor(xn.device, xn.dtype) + self.mean_tensor(xn.device, xn.dtype)

    def pixel_bounds(self, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel normalised images of pixel values 0 and 1, each ``(1,3,1,1)``: the box
        a synthetic image is clipped to."""
        m, s = self.mean_tensor(device, dtype), self.std_tensor(device, dtype)
        return (0 - m) / s, (1 - m) / s


def to_float01(x_uint8: torch.Tensor) -> torch.Tensor:
    """``uint8`` images ``(N,3,H,W)`` -> float32 in [0, 1]."""
    return x_uint8.float().div_(255.0)


def to_uint8(x01: torch.Tensor) -> torch.Tensor:
    """float images in [0, 1] ``(N,3,H,W)`` -> ``uint8`` (rounded, clipped)."""
    return (x01.clamp(0, 1) * 255.0).round().to(torch.uint8)


@dataclass
class ImageSplit:
    """One split of a dataset held in memory.

    Attributes:
        x: ``uint8`` ``(N, 3, H, W)`` RGB images, CPU.
        y: ``int64`` ``(N,)`` labels in ``[0, num_classes)``.
    """

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.dtype != torch.uint8 or self.x.ndim != 4 or self.x.shape[1] != 3:
            raise DataError(f"images must be uint8 (N,3,H,W); got {self.x.dtype} {tuple(self.x.shape)}")
        if self.y.ndim != 1 or len(self.y) != len(self.x):
            raise DataError(f"labels must be (N,) with N={len(self.x)}; got {tuple(self.y.shape)}")
        self.y = self.y.long()

    def __len__(self) -> int:
        return len(self.y)

    def indices_of(self, c: int) -> torch.Tensor:
        """Indices (``int64``) of the images of class ``c``, in stored order."""
        return torch.nonzero(self.y == c, as_tuple=False).flatten()

    def counts(self, num_classes: int) -> torch.Tensor:
        """Images per class, ``(num_classes,)``."""
        return torch.bincount(self.y, minlength=num_classes)

    def float01(self, idx: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        """Images (all, or ``idx``) as float32 [0, 1] ``(n,3,H,W)``."""
        x = self.x if idx is None else self.x[torch.as_tensor(idx, dtype=torch.long)]
        return to_float01(x)


@dataclass
class DatasetBundle:
    """Train and test splits plus their :class:`DataConfig`.

    Attributes:
        train, test: the splits (labels in ``[0, config.num_classes)``).
        config: image size, mean/std and class names.
        class_map: for a class subset, the original label of each new label
            (``class_map[new] = old``); identity for the full dataset.
        source: free-form provenance (paths, seed) recorded in manifests.
    """

    train: ImageSplit
    test: ImageSplit
    config: DataConfig
    class_map: tuple[int, ...] = ()
    source: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.class_map:
            self.class_map = tuple(range(self.config.num_classes))

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def resolve_classes(self, classes: Sequence[int | str] | None) -> list[int]:
        """Class names or indices -> sorted unique label indices of this bundle.

        Raises:
            DataError: an unknown name or an index out of range (the message lists valid names).
        """
        if classes is None or len(classes) == 0:
            return list(range(self.num_classes))
        names = list(self.config.class_names)
        out = []
        for c in classes:
            if isinstance(c, str) and not c.strip().lstrip("-").isdigit():
                if c not in names:
                    raise DataError(f"unknown class {c!r} for dataset {self.config.name}; "
                                    f"valid: {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}")
                out.append(names.index(c))
            else:
                i = int(c)
                if not 0 <= i < len(names):
                    raise DataError(f"class index {i} out of range [0, {len(names)}) "
                                    f"for dataset {self.config.name}")
                out.append(i)
        return sorted(set(out))

    def subset(self, classes: Sequence[int | str]) -> "DatasetBundle":
        """Keep only ``classes`` (names or indices), relabelled ``0..k-1`` in the given sorted
        order; ``class_map`` records the original labels."""
        keep = self.resolve_classes(classes)
        remap = torch.full((self.num_classes,), -1, dtype=torch.long)
        remap[torch.tensor(keep)] = torch.arange(len(keep))

        def cut(s: ImageSplit) -> ImageSplit:
            m = remap[s.y] >= 0
            if hasattr(s, "select"):  # a streamed split (data/stream.py): nothing is decoded
                return s.select(m, remap[s.y[m]])
            return ImageSplit(s.x[m], remap[s.y[m]])

        cfg = replace(self.config, class_names=tuple(self.config.class_names[i] for i in keep))
        return DatasetBundle(cut(self.train), cut(self.test), cfg,
                             tuple(self.class_map[i] for i in keep), dict(self.source))


def dataset_identity(bundle: DatasetBundle) -> dict:
    """What identifies a dataset for caching (expert buffers, ZCA): config, class map, split sizes
    and a SHA-256 of the train split's images and labels."""
    h = hashlib.sha256(bundle.train.x.contiguous().numpy().tobytes())
    h.update(bundle.train.y.contiguous().numpy().tobytes())
    return {"config": bundle.config.to_dict(), "class_map": list(bundle.class_map),
            "n_train": len(bundle.train), "n_test": len(bundle.test), "train_sha256": h.hexdigest()}
