"""Cached loaders shared by the pages.

Datasets and teachers live in ``st.cache_resource`` (one object per process, shared by every
session and thread: treat them as read-only; jobs that register hooks work on a copy).
Predictions and CAM maps live in ``st.cache_data`` keyed by plain values (the teacher/dataset key
tuples from :class:`studio.setup.Setup`, the method, the layer and the image indices), so moving
a slider only recomputes what changed: a tau, opacity or colour-map change re-uses the cached map.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import streamlit as st

from nrrdd_core.errors import ConfigError

from . import store
from .setup import DEFAULT_CLASS_CAP, Setup, current, teacher_ref

if TYPE_CHECKING:  # torch and the loaders are imported where used: the explorer can draw a
    # saved view (studio.explorer) before torch is imported
    import torch

    from nrrdd_core.data import DatasetBundle
    from nrrdd_core.models.teacher import Teacher

log = logging.getLogger(__name__)

#: Serialises forward/backward hooks on the shared teachers (CAMs of two sessions at once).
TEACHER_LOCK = threading.Lock()



@st.cache_resource(max_entries=4, show_spinner="Loading the dataset…")
def bundle(data_key: tuple) -> DatasetBundle:
    """The whole dataset ``(name, kwargs-items)`` (read-only, shared)."""
    from nrrdd_core.data import load_dataset

    name, kwargs = data_key
    return load_dataset(name, **dict(kwargs))


@st.cache_resource(max_entries=8, show_spinner="Loading the teacher…")
def teacher(teacher_key: tuple) -> Teacher:
    """The teacher of ``Setup.teacher_key`` on its device (read-only, shared).

    Raises:
        NrrddError subclasses from the loaders (missing file, wrong kind, no network...).
    """
    from nrrdd_core.device import resolve_device

    kind, path, arch, device, data_key = teacher_key
    ref = teacher_ref(kind, path, arch)
    if ref is None:
        raise ConfigError("no teacher checkpoint yet: train one or give its path on Setup")
    # a public CIFAR checkpoint gets its class names from public_checkpoint_data_config (the
    # CIFAR-10 names for a 10-class dataset, so check_compatible refuses others; as the CLI)
    names = bundle(data_key).config.class_names if ref.takes_class_names else None
    return ref.load(resolve_device(device), names)


@dataclass
class Context:
    """What a page works on: the setup, the dataset, the teacher and the chosen classes."""

    setup: Setup
    bundle: DatasetBundle
    teacher: Teacher | None
    classes: list[int]          # label indices in ``bundle``
    device: torch.device

    @property
    def class_names(self) -> list[str]:
        return [self.bundle.config.class_names[c] for c in self.classes]


def context(with_teacher: bool = True) -> Context:
    """Load the session's setup.

    Raises:
        NrrddError: unreadable dataset, unknown class, unloadable or mismatched teacher.
    """
    from nrrdd_core.device import resolve_device

    s = current()
    b = bundle(s.data_key)
    classes = b.resolve_classes(list(s.classes)) if s.classes else \
        list(range(min(b.num_classes, DEFAULT_CLASS_CAP)))
    t = None
    if with_teacher:
        t = teacher(s.teacher_key)
        t.check_compatible(b.config)
    return Context(s, b, t, classes, resolve_device(s.device))


@st.cache_data(max_entries=32, show_spinner="Measuring the teacher's test accuracy…")
def teacher_accuracy(teacher_key: tuple, max_images: int, _teacher: Teacher,
                     _bundle: DatasetBundle) -> tuple[float, int]:
    """Top-1 accuracy in [0, 1] of the teacher on the first ``max_images`` test images (an even
    stride through the test split), and the number of images used. Stored on disk
    (:mod:`studio.store`): a server restart reads it back instead of measuring again."""
    where = store.path("accuracy", teacher_key, (max_images,))
    z = store.load(where)
    if z is not None:
        return float(z["accuracy"]), int(z["images"])
    import torch

    n = len(_bundle.test)
    idx = torch.arange(0, n, max(1, n // max_images))[:max_images]
    with TEACHER_LOCK:
        probs = _teacher.predict01(_bundle.test.float01(idx))
    acc = float((probs.argmax(1) == _bundle.test.y[idx]).float().mean())
    store.save(where, {"accuracy": acc, "images": len(idx)})
    return acc, len(idx)


@st.cache_data(max_entries=8)
def pool_indices(data_key: tuple, classes: tuple, per_class: int) -> np.ndarray:
    """Training-image indices: the first ``per_class`` of each class (stored order), grouped by
    class."""
    b = bundle(data_key)
    return np.concatenate([b.train.indices_of(c)[:per_class].numpy() for c in classes])


@st.cache_data(max_entries=16, show_spinner=False)
def predictions(teacher_key: tuple, idx: tuple, _teacher: Teacher,
                _bundle: DatasetBundle) -> np.ndarray:
    """Teacher softmax ``(n, C)`` float32 on training images ``idx``."""
    with TEACHER_LOCK:
        return _teacher.predict01(_bundle.train.float01(list(idx))).numpy()


@st.cache_data(max_entries=32, show_spinner="Computing CAMs…")
def cam_maps(teacher_key: tuple, method: str, layer: str, idx: tuple, _teacher: Teacher,
             _bundle: DatasetBundle) -> np.ndarray:
    """CAM maps ``(n, H, W)`` float32 in [0, 1] of training images ``idx`` for their
    ground-truth class (METHODS.md §4.1), with ``method`` from ``nrrdd_core.cam.CAM_METHODS``."""
    from nrrdd_core.cam import get_cam

    x01 = _bundle.train.float01(list(idx)).to(_teacher.device)
    y = _bundle.train.y[list(idx)]
    with TEACHER_LOCK:
        cam = get_cam(method)(_teacher, layer).attribute(_teacher.data_config.normalize(x01), y)
    return cam.cpu().numpy()


@st.cache_resource
def compare_store() -> dict:
    """Process-wide store of Compare results keyed by setup, method and evaluation settings
    (so a second visit, or another session with the same setup, reuses them)."""
    return {}
