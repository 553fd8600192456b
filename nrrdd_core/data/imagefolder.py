"""``imagefolder`` (any ``root/<class>/<image>`` tree) and ``imagenet_subset`` (10-class
ImageNet-1k subsets, METHODS.md §7).

Every image is decoded with Pillow into the RGB picture a viewer shows (EXIF orientation applied;
grey, palette, CMYK, 16-bit and [0, 1] float images converted; transparency composited onto
white), resized so that its shorter side is ``image_size`` and centre-cropped to
``image_size x image_size``. Unreadable files (and modes with no single sensible picture) are
skipped with a warning naming the file and counted in ``bundle.source["skipped"]``; the
``max_per_class`` cap counts readable images only.
"""

from __future__ import annotations

import io
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import ConfigError, DataError
from . import register_dataset
from .base import DataConfig, DatasetBundle, ImageSplit
from .npz import channel_stats

log = logging.getLogger(__name__)

#: ImageNet-1k class indices of the 10-class subsets, in their published order (METHODS.md §7).
IMAGENET_SUBSETS = {
    "imagenette": (0, 217, 482, 491, 497, 566, 569, 571, 574, 701),
    "imagewoof": (193, 182, 258, 162, 155, 167, 159, 273, 207, 229),
    "imagemeow": (281, 282, 283, 284, 285, 291, 292, 290, 289, 287),
    "imagesquawk": (84, 130, 88, 144, 145, 22, 96, 9, 100, 89),
    "imageyellow": (309, 986, 954, 951, 987, 779, 599, 291, 72, 11),
    "imagefruit": (953, 954, 949, 950, 951, 957, 952, 945, 943, 948),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Sample = tuple[str, int]


#: Pillow modes of more than 8 bits per sample, and the largest value of each.
_DEEP_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535}


def _as_rgb(im: Image.Image) -> Image.Image:
    """The RGB picture a viewer shows for ``im``: EXIF orientation applied; 16-bit grey scaled to
    8 bits (Pillow's own conversion clips it to white); float images in [0, 1] scaled; an embedded
    ICC profile applied (to sRGB); palette, grey, CMYK and YCbCr converted; transparency
    composited onto white.

    Raises:
        ValueError: a mode or value range with no single sensible picture (float images outside
            [0, 1], 32-bit integers beyond 16 bits, modes Pillow cannot convert).
    """
    im = ImageOps.exif_transpose(im)
    if im.mode in _DEEP_MODES or im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise ValueError(f"{im.mode} image with non-finite values")
        if im.mode == "F":
            if arr.size and (arr.min() < 0 or arr.max() > 1):
                raise ValueError("32-bit float image with values outside [0, 1]")
            arr = arr * 255.0
        else:
            if arr.size and (arr.min() < 0 or arr.max() > _DEEP_MODES[im.mode]):
                raise ValueError(f"{im.mode} image with values beyond 16 bits")
            arr = arr / 257.0
        im = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    icc = im.info.get("icc_profile")
    if icc and im.mode in ("RGB", "CMYK", "L"):
        im = _to_srgb(im, icc)
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or \
            (im.mode in ("P", "L", "RGB") and "transparency" in im.info):
        im = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im)
    return im.convert("RGB")


def _to_srgb(im: Image.Image, icc: bytes) -> Image.Image:
    """``im`` converted from its embedded ICC profile to sRGB (as a colour-managed viewer shows
    it; matters most for CMYK JPEGs); unchanged when the profile cannot be used."""
    try:
        from PIL import ImageCms

        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        return ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except Exception as exc:  # noqa: BLE001 - lcms raises PyCMSError/OSError/ValueError...
        log.debug("ignoring the colour profile of an image: %s", exc)
        return im


def load_rgb(path: str | Path, size: int) -> np.ndarray:
    """One image file -> ``uint8 (size, size, 3)``: the RGB picture a viewer shows
    (:func:`_as_rgb`: EXIF orientation, 16-bit and float depths, palette / grey / CMYK, alpha on
    white), shorter side resized to ``size`` (bicubic), centre crop.

    Raises:
        OSError, ValueError, SyntaxError: unreadable or corrupt file (Pillow's errors), or a mode
        / value range with no single sensible picture.
    """
    with Image.open(path) as im:
        im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale >= size (faster)
        im = ImageOps.fit(_as_rgb(im), (size, size), Image.Resampling.BICUBIC)
        return np.asarray(im, dtype=np.uint8)


def _decode_one(path: str, size: int) -> np.ndarray | None:
    try:
        return load_rgb(path, size)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        log.warning("skipping unreadable image %s: %s", path, exc)
        return None


def _decode(samples: list[Sample], size: int, max_per_class: int | None,
            gen: torch.Generator) -> tuple[list[Sample], dict[str, np.ndarray], list[str]]:
    """Decode ``samples``, at most ``max_per_class`` readable images per class (a seeded random
    choice: files are tried in a ``randperm`` order until that many decode, so unreadable files
    do not count against the cap). Returns the kept samples (stored order), their
    ``uint8 (size,size,3)`` images by path, and the skipped (unreadable) paths."""
    images: dict[str, np.ndarray] = {}
    skipped: list[str] = []
    kept: list[Sample] = []
    with ThreadPoolExecutor(max_workers=4) as pool:
        def run(batch: list[Sample]) -> list[Sample]:
            good = []
            decoded = pool.map(lambda p: _decode_one(p, size), [p for p, _ in batch])
            for s, img in zip(batch, decoded):
                if img is None:
                    skipped.append(s[0])
                else:
                    images[s[0]] = img
                    good.append(s)
            return good

        if max_per_class is None:
            return run(samples), images, skipped
        for c in sorted({lab for _, lab in samples}):
            mine = [s for s in samples if s[1] == c]
            order = torch.randperm(len(mine), generator=gen).tolist()
            got: list[int] = []
            pos = 0
            while len(got) < max_per_class and pos < len(order):
                batch = order[pos:pos + max(max_per_class - len(got), 4)]
                pos += len(batch)
                good = {s[0] for s in run([mine[i] for i in batch])}
                got += [i for i in batch if mine[i][0] in good][:max_per_class - len(got)]
            kept += [mine[i] for i in sorted(got)]
    drop = {p for p in images} - {p for p, _ in kept}
    for p in drop:
        del images[p]
    return kept, images, skipped


def _samples(folder: Path, class_to_idx: dict[str, int]) -> list[Sample]:
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    return make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)


def _check_cap(max_per_class) -> int | None:
    if max_per_class is None:
        return None
    whole = isinstance(max_per_class, int) or (isinstance(max_per_class, float)
                                               and max_per_class.is_integer())
    if isinstance(max_per_class, bool) or not whole or max_per_class < 1:
        raise ConfigError(f"max_per_class must be a whole number >= 1 (or None for all images); "
                          f"got {max_per_class!r}")
    return int(max_per_class)


def _split(samples: list[Sample], test_fraction: float, gen: torch.Generator):
    """Per-class seeded split: ``round(n * test_fraction)`` test images (at least 1 when
    ``n >= 2`` and ``test_fraction > 0``, at least 1 train image)."""
    train: list[Sample] = []
    test: list[Sample] = []
    for c in sorted({lab for _, lab in samples}):
        mine = [s for s in samples if s[1] == c]
        n_test = round(len(mine) * test_fraction)
        if test_fraction > 0 and len(mine) >= 2:
            n_test = min(max(n_test, 1), len(mine) - 1)
        perm = torch.randperm(len(mine), generator=gen).tolist()
        test += [mine[i] for i in sorted(perm[:n_test])]
        train += [mine[i] for i in sorted(perm[n_test:])]
    return train, test


def _classes(folder: Path) -> tuple[list[str], dict[str, int]]:
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}")
    try:
        from torchvision.datasets.folder import find_classes

        return find_classes(str(folder))
    except FileNotFoundError as exc:
        raise DataError(f"no class sub-folders in {folder}: expected {folder}/<class>/<image>") from exc


def _check_nonempty(split: ImageSplit, folder: Path, classes: list[str]) -> None:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    counts = split.counts(len(classes))
    empty = [classes[i] for i in torch.nonzero(counts == 0).flatten().tolist()]
    if empty:
        raise DataError(f"no readable images in {folder / empty[0]}"
                        f"{f' (and {len(empty) - 1} more class folders)' if len(empty) > 1 else ''}; "
                        f"each class folder needs at least one image ({', '.join(IMG_EXTENSIONS)})")


def _bundle(train: list[Sample], test: list[Sample], images: dict[str, np.ndarray],
            skipped: list[str], size: int, cfg_fn, train_folder: Path, classes: list[str],
            source: dict) -> DatasetBundle:
    def split(samples: list[Sample]) -> ImageSplit:
        x = np.stack([images[p] for p, _ in samples]) if samples else \
            np.empty((0, size, size, 3), np.uint8)
        y = np.array([lab for _, lab in samples], dtype=np.int64)
        return ImageSplit(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))),
                          torch.from_numpy(y))

    train_split = split(train)
    _check_nonempty(train_split, train_folder, classes)
    if skipped:
        log.warning("skipped %d unreadable image(s) under %s", len(skipped), source["root"])
    x_tr = train_split.x.permute(0, 2, 3, 1).numpy()
    return DatasetBundle(train_split, split(test), cfg_fn(x_tr),
                         source={**source, "skipped": len(skipped), "skipped_files": skipped[:20]})


def _check_size(image_size: int) -> int:
    if not 8 <= int(image_size) <= 1024:
        raise ConfigError(f"image_size must be in [8, 1024] px; got {image_size}")
    return int(image_size)


@register_dataset("imagefolder")
def load_imagefolder(root: str | Path, image_size: int = 64, max_per_class: int | None = None,
                     test_fraction: float = 0.2, seed: int = 0) -> DatasetBundle:
    """Any ImageFolder tree as a dataset.

    Layouts: ``root/train/<class>/*`` plus ``root/val/<class>/*`` (or ``root/test/``) give the
    two splits (classes from ``train/``; a ``val`` class not in ``train`` is an error);
    otherwise ``root/<class>/*`` is split per class with ``seed`` (``test_fraction`` to test).
    Classes are the sorted folder names (torchvision ``find_classes``).

    Args:
        root: the tree.
        image_size: output side in pixels (shorter side resized, centre crop).
        max_per_class: keep at most this many readable images per class (and per split in the
            train/val layout), a seeded random choice applied while decoding (unreadable files
            do not count); ``None`` keeps all.
        test_fraction: share of each class sent to the test split, in [0, 1).
        seed: seed of the split and of the ``max_per_class`` choice.

    Returns:
        A :class:`DatasetBundle` of ``uint8 (N,3,S,S)`` images; ``config.name`` =
        ``"imagefolder"``, mean/std of the train split; ``source["skipped"]`` = number of
        unreadable files skipped.

    Raises:
        DataError: missing root, no class folders, a class without readable images.
        ConfigError: ``image_size``, ``max_per_class`` or ``test_fraction`` out of range.
    """
    size = _check_size(image_size)
    cap = _check_cap(max_per_class)
    if not 0 <= float(test_fraction) < 1:
        raise ConfigError(f"test_fraction must be in [0, 1); got {test_fraction}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    gen = torch.Generator().manual_seed(int(seed))
    val_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if (root / "train").is_dir() and val_dir is not None:
        train_dir = root / "train"
        classes, class_to_idx = _classes(train_dir)
        extra = sorted(set(_classes(val_dir)[0]) - set(classes))
        if extra:
            raise DataError(f"{val_dir} has class folders not in {train_dir}: {', '.join(extra[:5])}")
        train, images, skipped = _decode(_samples(train_dir, class_to_idx), size, cap, gen)
        test, test_images, test_skipped = _decode(_samples(val_dir, class_to_idx), size, cap, gen)
        images.update(test_images)
        skipped += test_skipped
    else:
        train_dir = root
        classes, class_to_idx = _classes(root)
        samples, images, skipped = _decode(_samples(root, class_to_idx), size, cap, gen)
        train, test = _split(samples, float(test_fraction), gen)

    def cfg(x_tr):
        mean, std = channel_stats(x_tr)
        return DataConfig("imagefolder", size, mean, std, tuple(classes))

    return _bundle(train, test, images, skipped, size, cfg, train_dir, classes,
                   {"dataset": "imagefolder", "root": str(root), "seed": int(seed),
                    "split": "folders" if train_dir != root else f"random {test_fraction}"})


def _check_subset(subset: str) -> None:
    if subset not in IMAGENET_SUBSETS:
        raise ConfigError(f"unknown ImageNet subset {subset!r}; valid: {', '.join(IMAGENET_SUBSETS)}")


def subset_wnids(train_dir: Path, subset: str, entry: str, other: str) -> list[str]:
    """The wnid folders of ImageNet subset ``subset`` under ``train_dir``, in the subset's
    published order (METHODS.md §7), for the dataset entry ``entry`` (``other`` names the entry
    to use for trees that are not ImageNet-1k).

    Raises:
        ConfigError: an unknown subset.
        DataError: ``train_dir`` does not hold the 1000 ImageNet-1k wnid folders.
    """
    _check_subset(subset)
    wnids, _ = _classes(train_dir)
    if len(wnids) != 1000:
        raise DataError(f"{train_dir} has {len(wnids)} class folders; {entry} needs the "
                        f"1000 ImageNet-1k wnid folders (use {other!r} for other trees)")
    return [wnids[i] for i in IMAGENET_SUBSETS[subset]]


@register_dataset("imagenet_subset")
def load_imagenet_subset(root: str | Path, subset: str = "imagenette", image_size: int = 128,
                         max_per_class: int | None = None) -> DatasetBundle:
    """A 10-class ImageNet-1k subset (METHODS.md §7) read from a full ImageNet tree.

    ``root/train`` must hold the 1000 wnid folders; class index = position in their sorted list
    (torchvision ``ImageFolder`` order). The test split comes from ``root/val/<wnid>`` (class
    folders, e.g. after the usual val-prep script); without ``root/val`` it is empty (warning).
    Labels ``0..9`` follow METHODS.md §7's order; ``class_map`` holds the ImageNet indices;
    class names are torchvision's ImageNet category names.

    Args:
        root: the ImageNet folder (with ``train/`` and optionally ``val/``).
        subset: one of :data:`IMAGENET_SUBSETS`.
        image_size: output side in pixels.
        max_per_class: at most this many images per class and split (seeded choice, seed 0).

    Returns:
        A :class:`DatasetBundle`; ``config.name`` = ``subset``, ImageNet mean/std.

    Raises:
        ConfigError: unknown subset.
        DataError: ``root/train`` missing or without exactly 1000 class folders, a ``val/``
        without a subset's wnid folder, a class without readable images.
    """
    from torchvision.models import ResNet18_Weights

    _check_subset(subset)
    size = _check_size(image_size)
    cap = _check_cap(max_per_class)
    root = Path(root).expanduser()
    train_dir, val_dir = root / "train", root / "val"
    chosen = subset_wnids(train_dir, subset, "imagenet_subset", "imagefolder")
    indices = IMAGENET_SUBSETS[subset]
    class_to_idx = {w: k for k, w in enumerate(chosen)}
    gen = torch.Generator().manual_seed(0)
    train, images, skipped = _decode(_samples(train_dir, class_to_idx), size, cap, gen)
    if val_dir.is_dir():
        missing = [w for w in chosen if not (val_dir / w).is_dir()]
        if missing:
            raise DataError(f"{val_dir / missing[0]} not found: arrange {val_dir} into wnid class "
                            "folders (as train/) or remove it")
        test, test_images, test_skipped = _decode(_samples(val_dir, class_to_idx), size, cap, gen)
        images.update(test_images)
        skipped += test_skipped
    else:
        log.warning("no %s: the %s test split is empty", val_dir, subset)
        test = []
    categories = ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    names = tuple(categories[i] for i in indices)
    bundle = _bundle(train, test, images, skipped, size,
                     lambda _x: DataConfig(subset, size, IMAGENET_MEAN, IMAGENET_STD, names),
                     train_dir, chosen, {"dataset": "imagenet_subset", "root": str(root),
                                         "subset": subset, "wnids": chosen})
    bundle.class_map = indices
    return bundle
