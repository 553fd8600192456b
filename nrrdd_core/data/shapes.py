"""``shapes``: the built-in, offline, procedurally generated 10-class dataset (METHODS.md §7 /
issue 2 section 2).

Each image shows one object (circle, triangle, square, pentagon, hexagon, star, cross, ring,
crescent, arrow) of random colour, size (35-60 % of the side), position and rotation, drawn
anti-aliased (4x supersampled mask, box-downsampled with Pillow) and fully inside the frame, on a
cluttered background shared by all classes: a smooth gradient between two muted colours
(RGB in [0.2, 0.8]), a texture (stripes, checks, smooth noise or none) and 1-3 soft-edged irregular distractor blobs whose colours come
from the same distribution as the objects' colours. The object colour is chosen far from the
mean background colour around it, so the object is the only discriminative region.

Determinism: image ``k`` of a split uses its own ``numpy.random.Generator`` seeded with
``(seed, split, k)`` and has label ``k % 10``, so the set does not depend on generation order and
a smaller set is a prefix of a larger one. Generated sets are cached on disk under
``cache_dir()/datasets/`` (key from every kwarg and :data:`GENERATOR_VERSION`) and in-process.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..errors import ConfigError
from ..io import atomic_write_bytes, cache_dir, config_key
from . import register_dataset
from .base import DataConfig, DatasetBundle, ImageSplit

log = logging.getLogger(__name__)

#: Bump when the drawing changes: it is part of the cache key.
GENERATOR_VERSION = 2

CLASS_NAMES = ("circle", "triangle", "square", "pentagon", "hexagon", "star", "cross", "ring",
               "crescent", "arrow")

#: Per-channel mean/std of [0, 1] pixels, measured once on the default train split
#: (seed 0, 500 per class, 32 px); fixed so every shapes variant shares one DataConfig.
MEAN = (0.4991, 0.4995, 0.5015)
STD = (0.1690, 0.1802, 0.1648)

_SUPERSAMPLE = 4
_SPLIT_IDS = {"train": 0, "test": 1}
_MIN_CONTRAST = 0.6  # Euclidean RGB distance in [0, 1] units between object and surroundings
_MIN_LUMA = 0.3  # luminance difference in [0, 1] units between object and surroundings
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _star_points(n: int = 5, inner: float = 0.42) -> np.ndarray:
    ang = np.pi / 2 + np.arange(2 * n) * np.pi / n
    r = np.where(np.arange(2 * n) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(ang), r * np.sin(ang)], 1)


def _regular(n: int) -> np.ndarray:
    ang = np.pi / 2 + np.arange(n) * 2 * np.pi / n
    return np.stack([np.cos(ang), np.sin(ang)], 1)


_W = 0.32  # half-width of the cross arms
#: Unit outlines (bounding radius 1) of the polygon classes.
_POLYGONS = {
    "triangle": _regular(3),
    "square": _regular(4),
    "pentagon": _regular(5),
    "hexagon": _regular(6),
    "star": _star_points(),
    "cross": np.array([(_W, 1), (_W, _W), (1, _W), (1, -_W), (_W, -_W), (_W, -1), (-_W, -1),
                       (-_W, -_W), (-1, -_W), (-1, _W), (-_W, _W), (-_W, 1)], dtype=float),
    "arrow": np.array([(-1, -0.22), (0.1, -0.22), (0.1, -0.62), (1, 0), (0.1, 0.62), (0.1, 0.22),
                       (-1, 0.22)], dtype=float),
}


def _object_mask(name: str, size: int, cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    """Anti-aliased alpha ``(size, size)`` float32 in [0, 1] of one object (pixel units)."""
    ss = _SUPERSAMPLE
    canvas = Image.new("L", (size * ss, size * ss), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy, r = cx * ss, cy * ss, radius * ss

    def disc(x, y, rr, fill):
        draw.ellipse((x - rr, y - rr, x + rr, y + rr), fill=fill)

    if name == "circle":
        disc(cx, cy, 0.9 * r, 255)
    elif name == "ring":
        disc(cx, cy, r, 255)
        disc(cx, cy, 0.55 * r, 0)
    elif name == "crescent":
        disc(cx, cy, r, 255)
        disc(cx + 0.5 * r * math.cos(angle), cy + 0.5 * r * math.sin(angle), 0.85 * r, 0)
    else:
        c, s = math.cos(angle), math.sin(angle)
        p = _POLYGONS[name] @ np.array([[c, s], [-s, c]]) * r + (cx, cy)
        draw.polygon([tuple(q) for q in p], fill=255)
    return np.asarray(canvas.reduce(ss), dtype=np.float32) / 255.0


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    return xx, yy


def _muted(rng: np.random.Generator) -> np.ndarray:
    """A background colour: RGB in [0.2, 0.8] (objects and blobs use all of [0, 1])."""
    return 0.2 + 0.6 * rng.random(3, dtype=np.float32)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Gradient + texture + 1-3 distractor blobs, ``(size, size, 3)`` float32 in [0, 1]."""
    xx, yy = _grid(size)
    a = rng.uniform(0, 2 * np.pi)
    t = (xx * math.cos(a) + yy * math.sin(a))
    t = (t - t.min()) / (np.ptp(t) + 1e-6)
    c0, c1 = _muted(rng), _muted(rng)
    img = c0 + (c1 - c0) * t[..., None]

    kind = rng.integers(4)
    if kind == 1:  # stripes
        b = rng.uniform(0, np.pi)
        period = rng.uniform(3, 8) * size / 32
        pat = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * math.cos(b) + yy * math.sin(b)) / period
                                 + rng.uniform(0, 2 * np.pi))
    elif kind == 2:  # checks
        cell = rng.uniform(2, 6) * size / 32
        ox, oy = rng.uniform(0, cell, 2)
        pat = ((np.floor((xx + ox) / cell) + np.floor((yy + oy) / cell)) % 2).astype(np.float32)
    elif kind == 3:  # smooth noise
        k = int(rng.integers(3, 9))
        low = Image.fromarray((rng.random((k, k)) * 255).astype(np.uint8))
        pat = np.asarray(low.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    else:
        pat = None
    if pat is not None:
        amp = rng.uniform(0.1, 0.25)
        c2 = _muted(rng)
        m = (amp * pat)[..., None]
        img = img * (1 - m) + c2 * m

    for _ in range(int(rng.integers(1, 4))):
        bx, by = rng.uniform(0, size, 2)
        rad = rng.uniform(0.1, 0.22) * size
        aspect = rng.uniform(0.5, 1.0)
        rot = rng.uniform(0, 2 * np.pi)
        u = ((xx - bx) * math.cos(rot) + (yy - by) * math.sin(rot)) / rad
        v = (-(xx - bx) * math.sin(rot) + (yy - by) * math.cos(rot)) / (rad * aspect)
        theta = np.arctan2(v, u)
        edge = (1 + rng.uniform(0, 0.25) * np.sin(2 * theta + rng.uniform(0, 6.3))
                + rng.uniform(0, 0.2) * np.sin(3 * theta + rng.uniform(0, 6.3)))
        soft = rng.uniform(0.5, 1.0)
        alpha = np.clip((edge - np.hypot(u, v)) / soft + 0.5, 0, 1) * rng.uniform(0.5, 0.9)
        img = img * (1 - alpha[..., None]) + rng.random(3, dtype=np.float32) * alpha[..., None]
    return img


def _object_colour(rng: np.random.Generator, around: np.ndarray) -> np.ndarray:
    """A random RGB colour that differs from ``around`` by at least ``_MIN_CONTRAST`` (RGB
    distance) and ``_MIN_LUMA`` (luminance); else the best of 64 candidates."""
    cands = rng.random((64, 3), dtype=np.float32)
    dist = np.linalg.norm(cands - around, axis=1)
    luma = np.abs((cands - around) @ _LUMA)
    ok = np.flatnonzero((dist >= _MIN_CONTRAST) & (luma >= _MIN_LUMA))
    return cands[ok[0] if len(ok) else int((dist / _MIN_CONTRAST + luma / _MIN_LUMA).argmax())]


def render_image(seed: int, split: str, index: int, image_size: int = 32) -> tuple[np.ndarray, int]:
    """Draw image ``index`` of ``split`` ("train"/"test"): ``uint8 (H, W, 3)`` RGB and its label
    ``index % 10`` (an index into :data:`CLASS_NAMES`)."""
    label = index % len(CLASS_NAMES)
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
    size = image_size
    img = _background(rng, size)
    radius = rng.uniform(0.35, 0.60) * size / 2
    cx, cy = rng.uniform(radius + 0.5, size - radius - 0.5, 2)
    alpha = _object_mask(CLASS_NAMES[label], size, cx, cy, radius, rng.uniform(0, 2 * np.pi))
    x0, x1 = int(cx - radius), int(math.ceil(cx + radius))
    y0, y1 = int(cy - radius), int(math.ceil(cy + radius))
    colour = _object_colour(rng, img[y0:y1, x0:x1].reshape(-1, 3).mean(0))
    img = img * (1 - alpha[..., None]) + colour * alpha[..., None]
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), label


def _render_split(seed: int, split: str, n: int, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.empty((n, 3, image_size, image_size), dtype=np.uint8)
    y = np.empty(n, dtype=np.int64)
    for k in range(n):
        img, y[k] = render_image(seed, split, k, image_size)
        x[k] = img.transpose(2, 0, 1)
    return x, y


@functools.lru_cache(maxsize=4)
def _cached_bundle(image_size: int, seed: int, train_per_class: int, test_per_class: int) -> DatasetBundle:
    kw = {"image_size": image_size, "seed": seed, "train_per_class": train_per_class,
          "test_per_class": test_per_class, "version": GENERATOR_VERSION}
    path = cache_dir() / "datasets" / f"shapes-{config_key(kw)}.npz"
    arrays = None
    if path.is_file():
        try:
            with np.load(path) as z:
                arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
        except Exception as exc:  # noqa: BLE001 - a corrupt cache file is regenerated
            log.warning("shapes cache %s unreadable (%s); regenerating", path, exc)
    if arrays is None:
        t0 = time.perf_counter()
        nc = len(CLASS_NAMES)
        x_tr, y_tr = _render_split(seed, "train", train_per_class * nc, image_size)
        x_te, y_te = _render_split(seed, "test", test_per_class * nc, image_size)
        arrays = {"x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te}
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write_bytes(path, buf.getvalue())
        log.info("generated shapes %s in %.1f s -> %s", kw, time.perf_counter() - t0, path)
    cfg = DataConfig("shapes", image_size, MEAN, STD, CLASS_NAMES)
    return DatasetBundle(
        ImageSplit(torch.from_numpy(arrays["x_train"]), torch.from_numpy(arrays["y_train"])),
        ImageSplit(torch.from_numpy(arrays["x_test"]), torch.from_numpy(arrays["y_test"])),
        cfg, source={"dataset": "shapes", **kw, "cache": str(path)})


@register_dataset("shapes")
def load_shapes(image_size: int = 32, seed: int = 0, train_per_class: int = 500,
                test_per_class: int = 100) -> DatasetBundle:
    """The built-in shapes dataset (10 classes, :data:`CLASS_NAMES`).

    Args:
        image_size: side in pixels, 16-256 (32 by default; 64 for the larger variant).
        seed: generator seed; the same seed always gives identical images.
        train_per_class, test_per_class: images per class in each split (>= 1).

    Returns:
        A :class:`DatasetBundle` with ``uint8 (N,3,S,S)`` splits (labels interleaved,
        ``y[k] = k % 10``) and fixed mean/std (:data:`MEAN`, :data:`STD`). The same object is
        returned for the same kwargs within a process: treat it as read-only.

    Raises:
        ConfigError: a kwarg out of range.
    """
    if not 16 <= int(image_size) <= 256:
        raise ConfigError(f"shapes image_size must be in [16, 256] px; got {image_size}")
    if int(train_per_class) < 1 or int(test_per_class) < 1:
        raise ConfigError(f"shapes train_per_class and test_per_class must be >= 1; "
                          f"got {train_per_class}, {test_per_class}")
    return _cached_bundle(int(image_size), int(seed), int(train_per_class), int(test_per_class))
