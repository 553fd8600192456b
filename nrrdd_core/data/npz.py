"""``npz``: image arrays stored as ``.npz`` files (the format of ``../shared/data``).

Each file holds ``x``: ``uint8 (N, H, W, 3)`` RGB, channels last, square images, and ``y``:
integer ``(N,)`` class indices (extra arrays such as ``orig_index`` are ignored). Class names
come from an optional JSON file beside the arrays, see :func:`read_class_names`.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from . import register_dataset
from .base import DataConfig, DatasetBundle, ImageSplit

log = logging.getLogger(__name__)

#: Normalisation constants of the dataset-distillation code bases (SRe2L / RDED CIFAR loaders),
#: keyed by file prefix; other prefixes use the mean/std of their train split.
PUBLISHED_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}


def file_prefix(file_name: str) -> str:
    """Dataset name of an npz file: its name up to the first ``_`` (``"cifar10_test.npz"`` ->
    ``"cifar10"``), or the whole stem when it has no ``_``."""
    return Path(file_name).name.split("_")[0].removesuffix(".npz")


def read_class_names(path: str | Path) -> list[str]:
    """Class names from a JSON file, in label order.

    Accepted layouts: a plain list of names; CIFAR-100's ``{"fine": [...], "coarse": [...]}``
    (the fine names are used); Tiny-ImageNet's list of ``[wnid, words]`` pairs (the first
    comma-separated entry of ``words``, or the wnid when ``words`` is empty).

    Raises:
        DataError: unreadable file or another layout.
    """
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read class names from {path}: {exc}") from exc
    if isinstance(obj, dict) and "fine" in obj:
        obj = obj["fine"]
    if isinstance(obj, list) and obj and all(isinstance(c, str) for c in obj):
        return list(obj)
    if isinstance(obj, list) and obj and all(isinstance(c, list) and c and isinstance(c[0], str)
                                             for c in obj):
        return [(str(c[1]).split(",")[0].strip() if len(c) > 1 else "") or c[0] for c in obj]
    raise DataError(f"{path}: expected a list of class names, {{'fine': [...]}} or a list of "
                    "[wnid, words] pairs")


def channel_stats(x: np.ndarray, chunk: int = 2048) -> tuple[tuple, tuple]:
    """Per-channel mean and std (rounded to 4 decimals) of ``uint8 (N,H,W,3)`` images as [0, 1]
    pixels, accumulated in chunks to bound memory."""
    s, s2, n = np.zeros(3), np.zeros(3), 0
    for i in range(0, len(x), chunk):
        c = x[i:i + chunk].reshape(-1, 3).astype(np.float64) / 255.0
        s, s2, n = s + c.sum(0), s2 + (c * c).sum(0), n + len(c)
    mean = s / max(n, 1)
    std = np.sqrt(np.maximum(s2 / max(n, 1) - mean ** 2, 0))
    return tuple(mean.round(4).tolist()), tuple(std.round(4).tolist())


def _read_split(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DataError(f"npz file not found: {path}; put there an .npz with x uint8 (N,H,W,3) "
                        "and y int64 (N,) (see ../shared/data/README.md)")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z or "y" not in z:
                raise DataError(f"{path} must contain arrays 'x' and 'y'; found {sorted(z.files)}")
            x, y = z["x"], z["y"]
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - numpy raises many types for bad files
        raise DataError(f"cannot read npz file {path}: {type(exc).__name__}: {exc}") from exc
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[3] != 3 or x.shape[1] != x.shape[2]:
        raise DataError(f"{path}: x must be uint8 (N,H,W,3) with H == W; got {x.dtype} {x.shape}")
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: y must be integer (N,) with N={len(x)}; got {y.dtype} {y.shape}")
    return x, y.astype(np.int64)


def test_file_for(train_file: str) -> str:
    """The test file paired with ``train_file``: its ``train`` name part replaced by ``test``
    (``cifar100_exact_train_prefix.npz`` -> ``cifar100_exact_test_prefix.npz``,
    ``cifar10_train.npz`` -> ``cifar10_test.npz``).

    Raises:
        DataError: the name has no ``train`` part (separated by ``_``, ``-`` or ``.``).
    """
    parts = re.split(r"([_.-])", Path(train_file).name)
    hits = [i for i, t in enumerate(parts) if t.lower() == "train"]
    if len(hits) != 1:
        raise DataError(f"cannot tell the test file of {train_file!r} (no single 'train' part in "
                        "its name): give the test file (--test-file, or test_file=None for none)")
    parts[hits[0]] = "test" if parts[hits[0]].islower() else "TEST"
    return "".join(parts)


def _check_pair(root: Path, train_file: str, test_file: str) -> None:
    """Refuse a test file of another known dataset than the train file (e.g. CIFAR-10's test set
    with CIFAR-100's train set: its labels fit, the accuracy is silently wrong)."""
    a, b = file_prefix(train_file), file_prefix(test_file)
    if a == b:
        return

    def known(prefix: str) -> bool:
        return prefix in PUBLISHED_STATS or (root / f"{prefix}_classes.json").is_file()

    if known(a) and known(b):
        raise DataError(f"test file {test_file} is of dataset {b} but the train file {train_file} "
                        f"is of {a}: give the {a} test file (e.g. {test_file_for(train_file)})"
                        if "train" in train_file.lower() else
                        f"test file {test_file} is of dataset {b} but the train file "
                        f"{train_file} is of {a}")
    log.warning("npz test file %s and train file %s have different name prefixes", test_file,
                train_file)


@register_dataset("npz")
def load_npz(root: str | Path, train_file: str = "cifar10_train.npz",
             test_file: str | None = "", classes_file: str | None = None) -> DatasetBundle:
    """Load a train/test pair of ``.npz`` files from ``root``.

    Args:
        root: folder holding the files (e.g. ``../shared/data``).
        train_file, test_file: file names inside ``root``. ``test_file=""`` (default) takes the
            train file's pair (:func:`test_file_for`); ``test_file=None`` gives an empty test
            split (0 images; evaluation then needs another test set). A test file of another
            known dataset (another prefix with published stats or a class-name file) is refused.
        classes_file: JSON of class names (see :func:`read_class_names`); by default
            ``<prefix>_classes.json`` beside the arrays if present, else ``class_0, class_1...``
            (as many as ``max(y) + 1``).

    Returns:
        A :class:`DatasetBundle` (``uint8 (N,3,H,W)``). ``config.name`` is the file prefix
        (``"cifar10"``); mean/std are :data:`PUBLISHED_STATS` for ``cifar10`` / ``cifar100``,
        else the per-channel statistics of the train split in [0, 1] pixels.

    Raises:
        DataError: missing folder or file, wrong dtype/shape, test images of another size than
        the train images, labels outside ``[0, num_classes)``, unreadable class-name file, no
        test file derivable from ``train_file``, or a test file of another dataset.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"npz root folder not found: {root}")
    prefix = file_prefix(train_file)
    if test_file == "":
        test_file = test_file_for(train_file)
    if test_file is not None:
        _check_pair(root, train_file, test_file)
    x_tr, y_tr = _read_split(root / train_file)
    size = x_tr.shape[1]
    if test_file is None:
        x_te, y_te = np.empty((0, size, size, 3), np.uint8), np.empty(0, np.int64)
    else:
        x_te, y_te = _read_split(root / test_file)
        if x_te.shape[1] != size:
            raise DataError(f"{root / test_file}: images are {x_te.shape[1]}px but the train "
                            f"images ({root / train_file}) are {size}px")

    names_path = root / (classes_file or f"{prefix}_classes.json")
    if classes_file is not None or names_path.is_file():
        names = read_class_names(names_path)
    else:
        names = [f"class_{i}" for i in range(int(max(y_tr.max(initial=0), y_te.max(initial=0))) + 1)]
    for f, y in ((train_file, y_tr), (test_file, y_te)):
        if len(y) and (y.min() < 0 or y.max() >= len(names)):
            raise DataError(f"{root / f}: labels must be in [0, {len(names)}) for "
                            f"{len(names)} classes; found [{y.min()}, {y.max()}]")

    if prefix in PUBLISHED_STATS:
        mean, std = PUBLISHED_STATS[prefix]
    else:
        mean, std = channel_stats(x_tr)
    cfg = DataConfig(prefix, int(size), mean, std, tuple(names))

    def split(x, y):
        return ImageSplit(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))),
                          torch.from_numpy(y))

    return DatasetBundle(split(x_tr, y_tr), split(x_te, y_te), cfg,
                         source={"dataset": "npz", "root": str(root), "train_file": train_file,
                                 "test_file": test_file, "classes_file": str(names_path)
                                 if names_path.is_file() else None})
