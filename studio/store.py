"""Views stored on disk: what a page computed with torch, read back later without it.

A stored view is a ``.npz`` of NumPy arrays (no pickles) in ``<cache>/views/`` (the cache folder
of ``nrrdd_core.io.cache_dir``), written atomically. Its file name is a key of everything it
depends on: the setup (dataset and the sizes and times of its files, teacher and its
checkpoint's, device, whether a GPU is visible), the view's own arguments, and the code that
computes it (a hash of the library's data, model and CAM sources and of the app modules that
compute views). A changed input gives another key, so a stale view is never read; the oldest
files beyond :data:`MAX_STORED` are deleted. Teachers trained or uploaded in this server's
session are not stored (nothing on disk names them for certain).

Used by the Grad-CAM explorer (:mod:`studio.explorer`) and the Setup page's teacher accuracy
(``studio.cache.teacher_accuracy``): a server restart then draws them without recomputing
(start-up: ``bench/ui_speed.py``).
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
from pathlib import Path

import numpy as np

from nrrdd_core.io import atomic_write_bytes, cache_dir, config_key

log = logging.getLogger(__name__)

#: Stored views kept on disk (the oldest are deleted beyond this).
MAX_STORED = 256
#: Sources whose code decides what a stored view holds (relative to the repository root, or to
#: the site-packages folder of an install).
CODE = ("nrrdd_core/cam.py", "nrrdd_core/display.py", "nrrdd_core/data", "nrrdd_core/models",
        "nrrdd_core/assets", "studio/explorer.py", "studio/cache.py", "studio/settings.py",
        "studio/store.py")
#: Teacher kinds whose weights are named by something on disk (or the package).
STORED_TEACHERS = ("shipped", "pretrained", "file", "resnet_cifar")


@functools.cache
def code_hash() -> str:
    """A hash of the sources in :data:`CODE` (names and bytes), computed once per process."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for rel in CODE:
        p = root / rel
        for f in (sorted(p.rglob("*")) if p.is_dir() else [p]):
            if f.is_file() and f.suffix in (".py", ".pt", ".pth", ".json"):
                h.update(f.relative_to(root).as_posix().encode())
                h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _stat(path: str) -> list | None:
    """Resolved name, size and time of a path that exists (and of a folder's direct entries),
    else None."""
    p = Path(path).expanduser()
    try:
        info = p.stat()
        out = [str(p.resolve()), info.st_size, info.st_mtime_ns]
        if p.is_dir():
            with os.scandir(p) as it:
                out += sorted([e.name, e.stat().st_size, e.stat().st_mtime_ns]
                              for e in it if not e.name.startswith("."))[:2000]
    except (OSError, ValueError):
        return None
    return out


def fingerprint(teacher_key: tuple) -> str | None:
    """A key of the setup a view depends on, from ``Setup.teacher_key`` (teacher kind,
    checkpoint field, architecture, device, and the dataset key), or None when views of it are
    not stored (a teacher of this session, or a checkpoint path that does not exist)."""
    kind, path, arch, device, data_key = teacher_key
    if kind not in STORED_TEACHERS:
        return None
    teacher_file = None
    if kind in ("file", "resnet_cifar"):
        teacher_file = _stat(path.partition(":")[2] if path.startswith("file:") else path)
        if teacher_file is None:
            return None
    files = [_stat(v) for _, v in data_key[1] if isinstance(v, str) and v.strip()]
    gpu = os.path.exists("/dev/nvidiactl"), os.environ.get("CUDA_VISIBLE_DEVICES")  # "auto"
    return config_key([repr(teacher_key), teacher_file, files, gpu, code_hash()], 24)


def path(kind: str, teacher_key: tuple, view: tuple) -> Path | None:
    """Where the view ``kind`` with arguments ``view`` (plain values) of the setup
    ``teacher_key`` is stored, or None when it is not stored (:func:`fingerprint`, or a cache
    folder that cannot be created)."""
    fp = fingerprint(teacher_key)
    if fp is None:
        return None
    try:
        root = cache_dir()
    except OSError as exc:  # an unwritable cache folder: views are computed, not stored
        log.warning("views are not stored: %s", exc)
        return None
    return root / "views" / f"{kind}-{config_key([fp, repr(view)], 24)}.npz"


def load(where: Path | None) -> dict[str, np.ndarray] | None:
    """The arrays of a stored view, or None: not stored, or unreadable (then deleted, to be
    recomputed)."""
    if where is None or not where.is_file():
        return None
    try:
        with np.load(where, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as exc:  # noqa: BLE001 - a damaged cache file is recomputed
        log.info("stored view %s unreadable (%s): recomputing", where.name, exc)
        where.unlink(missing_ok=True)
        return None


def save(where: Path | None, arrays: dict) -> None:
    """Store a view (arrays or plain values, no objects) atomically and keep at most
    :data:`MAX_STORED`; a failure is only logged (the view was computed and is shown)."""
    if where is None:
        return
    try:
        buf = io.BytesIO()
        np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
        atomic_write_bytes(where, buf.getvalue())
        stored = sorted(where.parent.glob("*.npz"), key=lambda p: p.stat().st_mtime)
        for old in stored[:-MAX_STORED]:
            old.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("could not store the view %s: %s", where.name, exc)
