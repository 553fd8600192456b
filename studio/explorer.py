"""The Grad-CAM explorer's data: what its controls offer and its CAM grid shows, kept on disk.

Everything the explorer draws is plain NumPy (:class:`Controls`, :class:`GridData`). It is
computed with torch on the first visit of a view and stored on disk (:mod:`studio.store`, keyed
by the setup, the view's classes, CAM method, layer, images per class and filter, and the code);
a later visit, also after a server restart, reads it back without importing torch, so a fresh
server draws the explorer before torch is imported (start-up: ``bench/ui_speed.py``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np
import streamlit as st

from . import store
from .frames import to_hwc

#: The CAM methods offered, in the order of ``nrrdd_core.cam.CAM_METHODS`` (a test checks they
#: agree), with their labels; listed here so the controls draw before torch is imported.
METHOD_LABELS = {"cam": "CAM (classic, NRR-DD's choice)",
                 "gradcam_torch": "Grad-CAM (batched torch)",
                 "gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "xgradcam": "XGrad-CAM",
                 "scorecam": "Score-CAM (slow: seconds per image)", "layercam": "Layer-CAM",
                 "eigencam": "Eigen-CAM (ignores the class)"}
#: Which images the grid shows.
FILTERS = {"all": "all images", "correct": "correctly classified", "incorrect": "misclassified"}


@dataclass
class Controls:
    """What the explorer's controls offer for one setup and CAM method."""

    classes: list[int]        # the chosen classes (label indices)
    class_names: list[str]    # every class of the dataset, in label order
    layers: list[str]         # the teacher's layers the method can use
    teacher_layer: str        # the teacher's default CAM layer
    dataset: str              # the dataset's name
    image_size: int           # its image side in pixels
    teacher: str              # the teacher's architecture
    device: str               # the device type the CAMs are computed on ("cpu", "cuda")


@dataclass
class GridData:
    """What the CAM grid shows: ``n`` training images, the first ``per_class`` of each chosen
    class that pass the filter, among the first ``pool_n`` of that class."""

    idx: np.ndarray           # (n,) int64 training-image indices
    labels: np.ndarray        # (n,) int64
    probs: np.ndarray         # (n, C) float32 teacher softmax
    cams: np.ndarray          # (n, H, W) float32 in [0, 1], for the true class
    images: np.ndarray        # (n, H, W, 3) uint8 pixels
    pool_n: int


def _arrays(view: Controls | GridData) -> dict:
    """A view's fields as arrays, for :func:`studio.store.save`."""
    return {k: np.asarray(v) for k, v in asdict(view).items()}


def _view(cls: type, z: dict):
    """A :class:`Controls` or :class:`GridData` from its stored arrays (lists, str and int fields
    as plain values again)."""
    plain = {"str": str, "int": int}
    return cls(**{f.name: z[f.name] if f.type == "np.ndarray" else z[f.name].tolist()
                  if f.type.startswith("list") else plain[f.type](z[f.name])
                  for f in fields(cls)})


@st.cache_data(max_entries=32, show_spinner="Loading the teacher…")
def controls(data_key: tuple, teacher_key: tuple, classes: tuple, method: str) -> Controls:
    """The classes, class names and usable layers of ``method`` (``supported_layers`` of its
    CAM class, the top-level blocks first: classic CAM only the map the classifier sees, the
    gradient CAMs the spatial maps) for the session's setup, whose keys ``data_key`` and
    ``teacher_key`` are (``classes``: its chosen class names). Read from the disk when stored.

    Raises:
        NrrddError, KeyError: the setup cannot be used (the page shows why:
        ``widgets.setup_error``).
    """
    path = store.path("controls", teacher_key, (classes, method))
    z = store.load(path)
    if z is not None:
        return _view(Controls, z)
    from nrrdd_core.cam import get_cam

    from . import cache
    ctx = cache.context()
    names = get_cam(method).supported_layers(ctx.teacher)
    out = Controls(list(ctx.classes), list(ctx.bundle.config.class_names),
                   [n for n in names if "." not in n] or names, ctx.teacher.cam_layer,
                   ctx.bundle.config.name, int(ctx.bundle.config.image_size), ctx.teacher.arch,
                   ctx.device.type)
    store.save(path, _arrays(out))
    return out


@st.cache_data(max_entries=32, show_spinner="Computing CAMs…")
def grid_data(data_key: tuple, teacher_key: tuple, classes: tuple, method: str, layer: str,
              per_class: int, which: str, sample_n: int) -> GridData:
    """The images of the CAM grid with the teacher's softmax and their CAM (``method`` at
    ``layer``, for the true class; METHODS.md §4.1): of each class in ``classes``, the first
    ``per_class`` training images that pass the filter ``which`` (:data:`FILTERS`) among the
    first ``per_class`` (``"all"``) or ``max(sample_n, 4 * per_class)``, for the session's
    setup, whose keys ``data_key`` and ``teacher_key`` are. Read from the disk when stored.

    Raises:
        NrrddError, RuntimeError: the CAM method fails on ``layer`` (nothing is stored).
    """
    from . import cache

    path = store.path("grid", teacher_key, (classes, method, layer, per_class, which, sample_n))
    z = store.load(path)
    if z is not None:
        return _view(GridData, z)
    ctx = cache.context()
    pool_n = per_class if which == "all" else max(sample_n, 4 * per_class)
    pool = cache.pool_indices(data_key, classes, pool_n)
    probs = cache.predictions(teacher_key, tuple(pool.tolist()), ctx.teacher, ctx.bundle)
    labels = ctx.bundle.train.y[pool].numpy()
    correct = probs.argmax(1) == labels
    keep = {"all": np.ones_like(correct), "correct": correct, "incorrect": ~correct}[which]
    shown = np.concatenate([np.flatnonzero(keep & (labels == c))[:per_class] for c in classes])
    idx = pool[shown].astype(np.int64)
    if len(idx):
        cams = cache.cam_maps(teacher_key, method, layer, tuple(idx.tolist()), ctx.teacher,
                              ctx.bundle)
        images = np.stack([to_hwc(x) for x in ctx.bundle.train.float01(idx.tolist())])
    else:
        side = ctx.bundle.config.image_size
        cams, images = np.zeros((0, side, side), np.float32), np.zeros((0, side, side, 3), np.uint8)
    out = GridData(idx, labels[shown].astype(np.int64), probs[shown].astype(np.float32),
                   cams.astype(np.float32), images, pool_n)
    store.save(path, _arrays(out))
    return out
