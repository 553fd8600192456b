"""Drawing CAMs for people: colour maps, overlays, boxes and the non-critical share.

Only NumPy and OpenCV (no torch), so the app can draw a saved view before torch is imported;
:mod:`nrrdd_core.cam` re-exports everything here. Tensors are accepted wherever an array is
(they are copied to the CPU).
"""

from __future__ import annotations

import cv2
import numpy as np

from .errors import ConfigError

#: Colour maps of the CAM overlays (OpenCV's, as the grad-cam package's ``show_cam_on_image``).
COLORMAPS = {"jet": cv2.COLORMAP_JET, "viridis": cv2.COLORMAP_VIRIDIS,
             "inferno": cv2.COLORMAP_INFERNO, "turbo": cv2.COLORMAP_TURBO, "hot": cv2.COLORMAP_HOT}


def _array(x, dtype=np.float32) -> np.ndarray:
    """``x`` (a tensor on any device, an array or a nested list) as a NumPy array."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def noncritical_share(cam, tau: float):
    """Share of each image's pixels that are non-critical, ``mean(1[C < tau])`` (METHODS.md §4.3:
    the pixels NRR-DD may change, where :func:`noncritical_mask` is non-zero).

    Args:
        cam: CAMs ``(N,H,W)`` in [0,1] (tensor or array). tau: threshold in [0,1].

    Returns:
        ``(N,)`` shares in [0,1], same kind (tensor / array) as ``cam``.

    Raises:
        ConfigError: ``tau`` outside [0,1].
    """
    if not 0.0 <= float(tau) <= 1.0:
        raise ConfigError(f"tau must lie in [0, 1], got {tau}")
    below = cam < tau
    return below.float().mean((1, 2)) if hasattr(below, "float") else below.mean((1, 2))


def overlay(img01, cam, alpha: float = 0.5, colormap: str = "jet") -> np.ndarray:
    """Heat-map overlay of a CAM on its image (for display): the grad-cam package's
    ``show_cam_on_image(img, cam, use_rgb=True, colormap, image_weight=1 - alpha)`` (same bytes),
    written with OpenCV alone because importing that package takes seconds (matplotlib, scipy,
    torchvision).

    Args:
        img01: image in [0,1] pixels, ``(3,H,W)`` or ``(H,W,3)`` (tensor or array).
        cam: map ``(H,W)`` in [0,1] (tensor or array).
        alpha: opacity of the heat map in [0,1] (``image_weight = 1 - alpha``).
        colormap: ``"jet"``, ``"viridis"``, ``"inferno"``, ``"turbo"`` or ``"hot"``.

    Returns:
        RGB ``uint8`` array ``(H,W,3)``.

    Raises:
        ConfigError: ``alpha`` outside [0,1], unknown colormap, or image / map sizes disagree.
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ConfigError(f"overlay alpha must lie in [0, 1], got {alpha}")
    if colormap not in COLORMAPS:
        raise ConfigError(f"unknown colormap {colormap!r}: choose one of {', '.join(COLORMAPS)}")
    img = _array(img01)
    if img.ndim == 3 and img.shape[0] == 3 and img.shape[-1] != 3:
        img = img.transpose(1, 2, 0)
    mask = _array(cam)
    if img.ndim != 3 or tuple(img.shape[:2]) != tuple(mask.shape):
        raise ConfigError(f"overlay needs an image (H,W,3) and a map (H,W) of the same size, got "
                          f"{tuple(img.shape)} and {tuple(mask.shape)}")
    heat = cv2.applyColorMap(np.uint8(255 * np.clip(mask, 0, 1)), COLORMAPS[colormap])
    heat = np.float32(cv2.cvtColor(heat, cv2.COLOR_BGR2RGB)) / 255
    w = 1.0 - float(alpha)  # the package's image_weight
    out = (1 - w) * heat + w * np.clip(img, 0, 1)
    return np.uint8(255 * (out / np.max(out)))


def draw_boxes(img: np.ndarray, boxes, color: tuple[int, int, int] = (255, 230, 0),
               width: int = 1) -> np.ndarray:
    """A copy of an RGB ``uint8`` image ``(H,W,3)`` with the outline of each box drawn (for
    display: CIDD's candidate boxes, METHODS.md §4.2).

    Args:
        img: RGB ``uint8`` array ``(H,W,3)``.
        boxes: int ``(K,4)`` boxes ``(i, j, h, w)`` in pixels (top row, left column, height,
            width), as :func:`cam_ratio` takes them.
        color: RGB outline colour. width: outline thickness in pixels (inside the box).

    Returns:
        RGB ``uint8`` array ``(H,W,3)``; the input is not changed.
    """
    out = np.array(img, dtype=np.uint8, copy=True)
    for i, j, h, w in _array(boxes, None).reshape(-1, 4).astype(int).tolist():
        t = max(1, min(int(width), h, w))
        out[i:i + t, j:j + w] = color
        out[i + h - t:i + h, j:j + w] = color
        out[i:i + h, j:j + t] = color
        out[i:i + h, j + w - t:j + w] = color
    return out
