"""The shared setup (dataset, classes, teacher, device, IPC, seed), kept in the URL.

The Setup page's widgets own the keys of :data:`studio.keys.SETUP_KEYS` (with
``persist_state="session"`` so they survive page switches). :func:`init_session` fills them once
per session from the URL (or the defaults); :func:`write_url` mirrors them back into the query
parameters on every run, so a copied link reopens the same setup on any page.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import streamlit as st

from nrrdd_core.errors import ConfigError

if TYPE_CHECKING:  # imported where used (it imports torch; see studio.cache)
    from nrrdd_core.models.ref import TeacherRef

from . import keys as K
from .settings import shapes_kwargs

#: Default of every setup key (the built-in, offline dataset and the shipped teacher).
DEFAULTS: dict = {
    K.DATASET: "shapes", K.DS_ROOT: "../shared/data", K.DS_TRAIN_FILE: "cifar10_train.npz",
    K.DS_TEST_FILE: "cifar10_test.npz", K.DS_CLASSES_FILE: "",
    K.DS_IMAGE_SIZE: 32, K.DS_SUBSET: "imagenette", K.DS_MAX_PER_CLASS: 0, K.CLASSES: [],
    K.TEACHER: "shipped", K.TEACHER_PATH: "", K.TEACHER_ARCH: "resnet20_cifar", K.DEVICE: "auto",
    K.IPC: 1, K.SEED: 0,
}

#: Which kwargs each dataset entry takes from the setup.
DATASET_FIELDS = {
    "shapes": (K.DS_IMAGE_SIZE,),
    "npz": (K.DS_ROOT, K.DS_TRAIN_FILE, K.DS_TEST_FILE, K.DS_CLASSES_FILE),
    "cifar10": (K.DS_ROOT,),
    "cifar100": (K.DS_ROOT,),
    "imagefolder": (K.DS_ROOT, K.DS_IMAGE_SIZE, K.DS_MAX_PER_CLASS),
    "imagenet_subset": (K.DS_ROOT, K.DS_SUBSET, K.DS_IMAGE_SIZE, K.DS_MAX_PER_CLASS),
    "imagefolder_stream": (K.DS_ROOT, K.DS_IMAGE_SIZE),
    "imagenet_subset_stream": (K.DS_ROOT, K.DS_SUBSET, K.DS_IMAGE_SIZE),
}
_KWARG_NAMES = {K.DS_IMAGE_SIZE: "image_size"}

#: At most this many classes are used by default when none are chosen.
DEFAULT_CLASS_CAP = 10


@dataclass(frozen=True)
class Setup:
    """A plain, hashable snapshot of the setup."""

    dataset: str
    dataset_kwargs: tuple          # sorted (name, value) pairs passed to load_dataset
    classes: tuple[str, ...]       # chosen class names (empty = default choice)
    teacher: str
    teacher_path: str
    teacher_arch: str
    device: str
    ipc: int
    seed: int

    @property
    def data_key(self) -> tuple:
        """Cache key of the dataset."""
        return (self.dataset, self.dataset_kwargs)

    @property
    def teacher_key(self) -> tuple:
        """Cache key of the teacher (with the dataset it is checked against)."""
        return (self.teacher, self.teacher_path, self.teacher_arch, self.device, self.data_key)

    @property
    def teacher_ref(self) -> TeacherRef | None:
        """The chosen teacher as a :class:`~nrrdd_core.models.ref.TeacherRef` (see
        :func:`teacher_ref`)."""
        return teacher_ref(self.teacher, self.teacher_path, self.teacher_arch)


def teacher_ref(kind: str, path: str, arch: str) -> TeacherRef | None:
    """The teacher reference of the Setup page's choice: ``kind`` (a key of the page's teacher
    radio), the checkpoint field (a path, or the ``train:KEY`` / ``upload:KEY`` the page writes
    there after training or an upload) and the architecture box. None while a kind that needs a
    checkpoint has none yet.

    Raises:
        ConfigError: an unknown kind, or an architecture that does not fit it.
    """
    from nrrdd_core.models.ref import TeacherRef

    if kind == "shipped":
        return TeacherRef("shipped")
    if kind == "pretrained":
        return TeacherRef("pretrained", arch=arch)
    if kind not in ("train", "file", "resnet_cifar"):
        raise ConfigError(f"unknown teacher choice {kind!r}")
    if not path.strip():
        return None
    if kind == "resnet_cifar":
        return TeacherRef("resnet_cifar", arch=arch, path=path.strip())
    return TeacherRef.parse(path)


def _coerce(key: str, raw: list[str]):
    default = DEFAULTS[key]
    if isinstance(default, list):
        return [r for r in raw if r]
    value = raw[-1]
    if isinstance(default, int):
        try:
            return int(value)
        except ValueError:
            return default
    return value


def init_session() -> None:
    """Fill the setup keys once per session: URL query parameters first, then defaults."""
    if st.session_state.get(K.URL_LOADED):
        return
    for key in K.SETUP_KEYS:
        raw = st.query_params.get_all(key)
        st.session_state[key] = _coerce(key, raw) if raw else DEFAULTS[key]
    st.session_state[K.URL_LOADED] = True


def write_url() -> None:
    """Mirror the setup into the URL (values equal to their default are left out)."""
    for key in K.SETUP_KEYS:
        value = st.session_state.get(key, DEFAULTS[key])
        if value == DEFAULTS[key] or value in ("", None, []):
            if key in st.query_params:
                del st.query_params[key]
        elif isinstance(value, list):
            st.query_params[key] = [str(v) for v in value]
        else:
            st.query_params[key] = str(value)


def current() -> Setup:
    """The setup of this session as a hashable :class:`Setup`."""
    s = {k: st.session_state.get(k, DEFAULTS[k]) for k in K.SETUP_KEYS}
    name = s[K.DATASET]
    kwargs = {_KWARG_NAMES.get(f, f): s[f] for f in DATASET_FIELDS.get(name, ())}
    if name == "npz" and not kwargs.get(K.DS_CLASSES_FILE):
        kwargs.pop(K.DS_CLASSES_FILE, None)
    if name in ("imagefolder", "imagenet_subset") and not kwargs.get(K.DS_MAX_PER_CLASS):
        kwargs.pop(K.DS_MAX_PER_CLASS, None)
    if name == "shapes":
        kwargs.update(shapes_kwargs())
    return Setup(dataset=name, dataset_kwargs=tuple(sorted(kwargs.items())),
                 classes=tuple(s[K.CLASSES] or ()), teacher=s[K.TEACHER],
                 teacher_path=s[K.TEACHER_PATH], teacher_arch=s[K.TEACHER_ARCH],
                 device=s[K.DEVICE], ipc=int(s[K.IPC]), seed=int(s[K.SEED]))
