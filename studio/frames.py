"""Frames of a live run, made by the worker thread (no ``st.*``): pictures encoded once.

A page only shows these pictures (through the live feed, :mod:`studio.feed`, or by re-sending
the same PNG bytes from a polling fragment: unchanged bytes keep their media URL, so the browser
fetches nothing new); all pixel work happens here, in the worker, at a bounded rate
(:mod:`studio.runners`). A frame is one picture (the row kinds stacked: current images, initial
images, mask over the images, mask, change since the start), whatever the IPC.
"""

from __future__ import annotations

import io
import math

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # torch is imported by the callers (the explorer draws before it is)
    import torch

#: Upper end of the change heatmap, in [0,1] pixel units (mean absolute change over RGB). The
#: same scale on every frame (brighter = changed more), values above it saturate.
CHANGE_SCALE = 0.25
#: White pixels between two row kinds of a frame picture.
ROW_GAP = 8
#: Tint of the non-critical (refined) region in the mask overlay, RGB.
REFINED_TINT = np.array([70.0, 120.0, 230.0])


def to_hwc(x01) -> np.ndarray:
    """Image ``(3,H,W)`` / ``(H,W,3)`` float [0,1] or uint8 -> uint8 ``(H,W,3)``."""
    a = x01.detach().cpu().numpy() if hasattr(x01, "detach") else np.asarray(x01)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(1, 2, 0)
    if a.dtype != np.uint8:
        a = (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return a


def png(img: np.ndarray) -> bytes:
    """A uint8 ``(H,W,3)`` image as PNG bytes (fast compression: the images are small)."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def heat(values: np.ndarray) -> np.ndarray:
    """A ``(H,W)`` array in [0,1] as a uint8 ``(H,W,3)`` dark-blue-to-orange heat image."""
    v = np.clip(values, 0, 1)[..., None]
    lo, hi = np.array([20, 20, 35], float), np.array([255, 170, 40], float)
    return (lo + (hi - lo) * v).astype(np.uint8)


def mask_overlay(img: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``img`` uint8 ``(H,W,3)`` with the update weight ``(H,W)`` in [0,1] shown as a blue tint
    (1 = free, refined: tinted; 0 = critical, frozen: its own colours)."""
    grey = img.astype(float).mean(-1, keepdims=True)
    tint = 0.45 * grey + 0.55 * REFINED_TINT
    w = np.clip(weight, 0, 1)[..., None]
    return ((1 - w) * img + w * tint).astype(np.uint8)


def mosaic(images: list[np.ndarray], cols: int, gap: int = 2, fill: int = 255) -> np.ndarray:
    """Tile uint8 ``(H,W,3)`` images of one size row-major, ``cols`` per row, ``gap`` pixels of
    ``fill`` between them: one ``(rows*(H+gap)-gap, cols*(W+gap)-gap, 3)`` uint8 image."""
    if not images:
        raise ValueError("mosaic needs at least one image")
    h, w, ch = images[0].shape
    cols = max(1, min(cols, len(images)))
    rows = -(-len(images) // cols)
    out = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, ch), fill, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        out[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = im
    return out


def mosaic_layout(labels: list[int], class_names: list[str], max_cols: int = 10) -> tuple[int, str]:
    """Columns of a :func:`mosaic` of images grouped by class (``labels`` in class order) and a
    caption naming where each class is: one row per class when a class has several images,
    else the classes left to right (wrapping every ``max_cols``)."""
    from collections import Counter

    counts = Counter(labels)  # in first-seen (class) order
    per = max(counts.values(), default=1)
    names = ", ".join(class_names[c] for c in counts)
    if per > 1 and all(n == per for n in counts.values()):
        return per, f"one row per class, top to bottom: {names}"
    cols = min(len(labels), max_cols)
    if per > 1:
        return cols, f"grouped by class, in this order: {names}"
    where = "left to right" + (", then the next row" if len(labels) > cols else "")
    return cols, f"classes {where}: {names}"


def image_rows(frame: dict, class_names: list[str]) -> list[dict]:
    """A live frame as ONE picture (``[{"title", "pixels", "tile", "width", "rows"}]``, empty
    before there are images; :func:`encoded` makes its PNG): the row kinds (current images,
    initial images, mask over the images, mask, change) stacked top to bottom, each a :func:`mosaic` with the same layout,
    so image ``i`` sits at the same place in every block. One file per frame keeps what the
    browser fetches, and the server serves, to one request however many images there are.
    ``pixels`` is the picture (uint8 ``(H,W,3)``), ``tile`` the side of one image in it and
    ``width`` its width, so a page can show it ``k`` times larger without re-encoding;
    ``title`` names the blocks in order.

    ``frame`` holds ``images`` ``(N,3,H,W)`` [0,1] and ``labels`` ``(N,)``, and optionally the
    ``Distiller.views()`` entries ``initial``, ``mask`` ``(N,1,H,W)`` and ``change`` ``(N,H,W)``.
    The change is drawn on the fixed scale [0, :data:`CHANGE_SCALE`] on every frame."""
    x = frame.get("images")
    if x is None or not len(x):
        return []
    labels = frame["labels"].tolist()
    cols, where = mosaic_layout(labels, class_names)
    current = [to_hwc(im) for im in x]
    rows = [(f"Current images ({where})", current)]
    if "initial" in frame:
        rows.append(("Initial images x̃₀ (after selection, before refinement)",
                     [to_hwc(im) for im in frame["initial"]]))
    if "mask" in frame:
        mk = frame["mask"][:, 0].float().numpy()
        rows.append(("Mask over the current images: tinted blue = non-critical, refined; own "
                     "colours = critical, frozen",
                     [mask_overlay(im, m) for im, m in zip(current, mk)]))
        peak = float(mk.max()) or 1.0
        rows.append(("Mask: update weight (white = free, black = critical, frozen)",
                     [to_hwc(m / peak) for m in mk]))
    if "change" in frame:
        ch = frame["change"].float().numpy()
        rows.append((f"Change since the start: mean |Δ| over RGB on a fixed scale, dark = 0, "
                     f"orange = {CHANGE_SCALE} or more ([0,1] pixels; largest now "
                     f"{ch.max():.3f})", [heat(c / CHANGE_SCALE) for c in ch]))
    mosaics = [mosaic(imgs, cols) for _, imgs in rows]
    band = np.full((ROW_GAP, mosaics[0].shape[1], 3), 255, np.uint8)
    picture = np.concatenate([m for mo in mosaics for m in (mo, band)][:-1], 0)
    title = rows[0][0] + "".join(f"; then {t[0].lower()}{t[1:]}" for t, _ in rows[1:])
    return [{"title": title, "pixels": picture, "tile": current[0].shape[1],
             "width": picture.shape[1], "rows": [t for t, _ in rows]}]


def encoded(row: dict, fmt: str = "png") -> bytes:
    """A picture row of :func:`image_rows` encoded as ``fmt`` (``"png"``, or ``"bmp"``: no
    compression, 30 times faster to make, for the live feed on the same machine), made once per
    row and format and kept in it."""
    if fmt not in row:
        if fmt == "png":
            row[fmt] = png(row["pixels"])
        else:
            buf = io.BytesIO()
            Image.fromarray(row["pixels"]).save(buf, format=fmt.upper())
            row[fmt] = buf.getvalue()
    return row[fmt]


def duration(seconds: float) -> str:
    """``75.2`` -> ``"1 min 15 s"``; under a minute ``"42.0 s"``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s_ = divmod(int(round(seconds)), 60)
    if m < 60:
        return f"{m} min {s_:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def progress_text(view: dict, unit: str = "steps", rate: float | None = None) -> str:
    """The progress line of a job view (:meth:`studio.jobs.Job.view`): ``"running · 12/124
    steps · 4.1 s · about 38.0 s left · refine"``: status, progress in ``unit``, working time
    (pauses left out), with ``rate`` (``unit`` per second) the estimated time left while it
    runs or is paused, and the job's message."""
    eta = ""
    if rate and math.isfinite(rate) and rate > 0 and view["status"] in ("running", "paused") \
            and view["total"]:
        eta = f" · about {duration(max(0, view['total'] - view['step']) / rate)} left"
    return (f"{view['status']} · {view['step']}/{view['total']} {unit} · "
            f"{duration(view['elapsed'])}{eta}" + (f" · {view['message']}" if view["message"] else ""))


def gif(pictures: list[bytes], seconds: float = 0.15, scale: int = 2) -> bytes:
    """An animated GIF (looping, ``seconds`` per picture, each ``scale`` times larger,
    nearest-neighbour) of PNG ``pictures`` (e.g. a run's frames, :meth:`studio.jobs.Job.film`);
    all are resized to the first one's size.

    Raises:
        ValueError: no pictures.
    """
    if not pictures:
        raise ValueError("gif needs at least one picture")
    frames = [Image.open(io.BytesIO(p)).convert("RGB") for p in pictures]
    size = (frames[0].width * scale, frames[0].height * scale)
    frames = [f.resize(size, Image.NEAREST) for f in frames]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:],
                   duration=int(seconds * 1000), loop=0)
    return buf.getvalue()


def grid_figure(sets: list[tuple[str, torch.Tensor, torch.Tensor]], classes: list[int],
                class_names: list[str], scale: int = 3, gap: int = 6) -> bytes:
    """A comparison grid as one PNG for slides: one column per set (``(title, images (N,3,H,W)
    in [0,1], labels (N,))``), one row per class of ``classes`` (its images side by side),
    titles and class names written above and left, images ``scale`` times larger
    (nearest-neighbour)."""
    from PIL import ImageDraw

    side = max(int(x.shape[-1]) for _, x, _ in sets) * scale
    per = max(max((int((y == c).sum()) for _, _, y in sets), default=1) for c in classes) or 1
    col_w = per * (side + 2) + gap
    left, top = 90, 24
    out = Image.new("RGB", (left + len(sets) * col_w, top + len(classes) * (side + gap)), "white")
    draw = ImageDraw.Draw(out)
    for k, (title, x, y) in enumerate(sets):
        x0 = left + k * col_w
        draw.text((x0, 6), title, fill=(0, 0, 0))
        for r, c in enumerate(classes):
            for j, i in enumerate((y == c).nonzero().flatten().tolist()[:per]):
                tile = Image.fromarray(to_hwc(x[i])).resize((side, side), Image.NEAREST)
                out.paste(tile, (x0 + j * (side + 2), top + r * (side + gap)))
    for r, c in enumerate(classes):
        draw.text((4, top + r * (side + gap) + side // 2 - 6), class_names[c][:14], fill=(0, 0, 0))
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()
