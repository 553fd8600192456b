"""Export and import of distilled sets (issue 3 section 5).

A distilled set ("run") is a folder ``<root>/<name>/``:

- ``images/<label>_<k>.png`` (4-digit zero-padded label in the teacher's label space and index
  within the class; lossless PNG of the uint8-quantised images, or JPEG quality 75 with
  ``fmt="jpeg"`` for parity with the papers);
- ``labels_hard.pt``: the int64 labels ``(N,)`` in image order (``weights_only`` loadable);
- ``labels_soft/``, ``labels_dbr/``: stored soft / DBR labels when written
  (:class:`nrrdd_core.labels.SoftLabelStore`);
- ``extras.pt``: the tensors among the method's extras (``Distiller.export_extras()``, e.g. EDF's
  learned label logits ``(N,C)``), a ``weights_only``-loadable dict; their plain values (EDF's
  learned lr, architecture, ZCA eps) are in the manifest under ``extras``;
- ``evals/*.json``: student evaluation results (:func:`save_eval`);
- ``manifest.json``: method, full config, teacher, dataset, classes, IPC, seed, versions, timings,
  creation time, image format, the image file names in order, ``extras`` (plain values) and
  ``extra_tensors`` (name -> shape of each tensor in ``extras.pt``).

Loading a PNG run gives exactly ``to_float01(to_uint8(images01))`` of what was saved. The folder is
built in a hidden temporary folder beside the target and renamed into place (``os.replace``), so a
crash never leaves a half-written run; what a killed save leaves behind (a temporary folder, an
interrupted ``overwrite`` replace) is finished or undone by :func:`recover_runs` the next time the
runs folder is used. :func:`reserve_run` checks the output folder and name and reserves the name
before any work starts. Loads, zips and deletes only touch run folders directly inside the runs
folder (:func:`run_folder`: no ``..``, no links out). The default runs root is ``$NRRDD_RUNS`` or
``./runs``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import platform
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from . import __version__
from .data.base import DatasetBundle, to_float01, to_uint8
from .errors import ConfigError, DataError
from .io import atomic_torch_save, atomic_write_json, safe_torch_load
from .labels import HARD_LABELS_FILE
from .models.teacher import Teacher

if TYPE_CHECKING:
    from .models.ref import TeacherRef

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
IMAGES_DIR = "images"
EXTRAS_FILE = "extras.pt"
EVALS_DIR = "evals"
FORMATS = {"png": ".png", "jpeg": ".jpg"}
JPEG_QUALITY = 75


def default_runs_root() -> Path:
    """``$NRRDD_RUNS`` or ``./runs``."""
    return Path(os.environ.get("NRRDD_RUNS", "runs"))


#: Longest run / file name in UTF-8 bytes: file systems allow 255, and the hidden temporary
#: folders of :func:`save_run` add a prefix and a suffix to it.
MAX_NAME_BYTES = 200


def check_name(name: str, what: str = "run name") -> str:
    """Return ``name`` if it is a plain folder / file name.

    Raises:
        ConfigError: empty, ``.`` / ``..``, starting with ``.`` (hidden / temporary), holding a
            path separator or a control character, or longer than :data:`MAX_NAME_BYTES` bytes
            in UTF-8.
    """
    if not isinstance(name, str) or not name.strip() or name in (".", "..") or name.startswith(".") \
            or "/" in name or "\\" in name or os.sep in name or (os.altsep and os.altsep in name) \
            or "\0" in name:
        raise ConfigError(f"invalid {what} {name!r}: use a plain name without '/', '\\' or a leading '.'")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise ConfigError(f"invalid {what} {name!r}: control characters (new lines, tabs...) "
                          "are not allowed")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise ConfigError(f"invalid {what} {name!r}: not valid text ({exc.reason})") from None
    if size > MAX_NAME_BYTES:
        raise ConfigError(f"{what} is {size} bytes long; use at most {MAX_NAME_BYTES} bytes")
    return name


def versions() -> dict:
    """Versions of Python, torch, torchvision, numpy, Pillow and nrrdd_core."""
    import PIL
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": np.__version__, "pillow": PIL.__version__,
            "nrrdd_core": __version__}


def build_manifest(*, method: str, config: dict, teacher: Teacher, bundle: DatasetBundle,
                   classes: list[int], ipc: int, seed: int, teacher_ref: str | TeacherRef = "",
                   dataset_args: dict | None = None, timings: dict | None = None, **extra) -> dict:
    """The standard manifest of a distilled set.

    Args:
        method: registry name of the method.
        config: the method's full config (``Config.to_dict()``).
        teacher: the teacher used; ``teacher_ref`` how to load it again: a
            :class:`~nrrdd_core.models.ref.TeacherRef` or its text (``"shipped"``,
            ``"file:/abs/teacher.pt"``, ``"train:KEY"``...), stored as text in
            ``manifest["teacher"]["ref"]`` and read back by ``TeacherRef.of_manifest``.
        bundle: the dataset; ``dataset_args`` the ``load_dataset`` keyword arguments that rebuild
            it (without ``classes``).
        classes: distilled label indices (teacher label space).
        ipc, seed: images per class and seed of the run.
        timings: e.g. ``{"seconds": ..., "seconds_per_step": ...}``.
        **extra: any further JSON-serialisable fields (device, steps...).
    """
    names = bundle.config.class_names
    return {
        "method": method, "config": dict(config), "ipc": int(ipc), "seed": int(seed),
        "teacher": {"arch": teacher.arch, "arch_kwargs": dict(teacher.arch_kwargs),
                    "source": teacher.source, "ref": str(teacher_ref), "test_acc": teacher.test_acc,
                    "cam_layer": teacher.cam_layer},
        "dataset": {"name": bundle.config.name, "args": dict(dataset_args or {}),
                    "source": dict(bundle.source), "classes": [int(c) for c in classes],
                    "class_names": [names[c] for c in classes], "all_class_names": list(names),
                    "image_size": bundle.config.image_size},
        "timings": dict(timings or {}), **extra,
    }


def _encode(img_u8: torch.Tensor, fmt: str) -> bytes:
    buf = io.BytesIO()
    pil = Image.fromarray(img_u8.permute(1, 2, 0).numpy())
    if fmt == "png":
        pil.save(buf, format="PNG")
    else:
        pil.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _split_extras(extras: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, plain values)`` of a method's extras.

    Raises:
        ConfigError: a key that is not an identifier, or a value that is neither a tensor nor
            JSON-serialisable.
    """
    tensors, values = {}, {}
    for k, v in extras.items():
        if not isinstance(k, str) or not k.isidentifier():
            raise ConfigError(f"run extra name {k!r} must be an identifier")
        if isinstance(v, torch.Tensor):
            tensors[k] = v.detach().cpu().contiguous()
        else:
            values[k] = v
    try:
        json.dumps(values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"run extras must be tensors or JSON values: {exc}") from exc
    return tensors, values


# ---- the runs folder: output checks, name reservation, crash recovery ---------------------------
_TMP, _OLD, _LOCK = ".tmp-", ".old-", ".lock"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0
    return True


def _owner(hidden: str) -> int | None:
    """The process id recorded in a hidden entry name ``.NAME.tmp-PID-xyz`` / ``.NAME.old-PID-xyz``
    (None when the name carries none, e.g. written by an older version)."""
    for mark in (_TMP, _OLD):
        if mark in hidden:
            head = hidden.rsplit(mark, 1)[1].split("-", 1)[0]
            return int(head) if head.isdigit() else None
    return None


def _lock_owner(lock: Path) -> int | None:
    try:
        text = lock.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def recover_runs(root: str | os.PathLike) -> list[str]:
    """Finish or undo what a killed save left in the runs folder ``root``.

    - ``.NAME.old-*`` (an ``overwrite`` replace stopped between its two renames): when ``NAME`` is
      missing, the complete new folder (a ``.NAME.tmp-*`` holding ``manifest.json``, which is
      written last) is put in place, else the old run is restored; the old copy is then removed.
    - ``.NAME.tmp-*`` folders and ``.NAME.lock`` reservations of processes that are gone are
      removed.

    Entries of running processes are left alone. Returns one line per action (also logged).
    """
    root = Path(root)
    if not root.is_dir():
        return []
    actions = []
    hidden = sorted(p for p in root.iterdir() if p.name.startswith("."))

    def gone(p: Path) -> bool:
        pid = _owner(p.name)
        return pid is None or not _pid_alive(pid)

    olds = [p for p in hidden if _OLD in p.name and p.is_dir() and not p.is_symlink() and gone(p)]
    for old in olds:
        name = old.name[1:].rsplit(_OLD, 1)[0]
        target = root / name
        if not target.exists() and not target.is_symlink():
            done = [t for t in hidden if t.name.startswith(f".{name}{_TMP}") and t.is_dir()
                    and (t / MANIFEST).is_file() and gone(t)]
            if done:
                newest = max(done, key=lambda t: t.stat().st_mtime)
                os.replace(newest, target)
                actions.append(f"finished the interrupted replace of run {name}")
            else:
                os.replace(old, target)
                actions.append(f"restored run {name} (its replacement was interrupted)")
                continue
        shutil.rmtree(old, ignore_errors=True)
    for tmp in (p for p in hidden if _TMP in p.name and p.is_dir() and not p.is_symlink()
                and not p.name.endswith(_LOCK) and gone(p)):
        shutil.rmtree(tmp, ignore_errors=True)
        actions.append(f"removed the unfinished save {tmp.name}")
    for lock in (p for p in hidden if p.name.endswith(_LOCK) and p.is_file()):
        pid = _lock_owner(lock)
        if pid is None or not _pid_alive(pid):
            lock.unlink(missing_ok=True)
    for a in actions:
        log.warning("%s: %s", root, a)
    return actions


def check_output_dir(root: str | os.PathLike) -> Path:
    """Make sure runs can be written under ``root`` (created if missing): it is not a file and a
    file can be created in it.

    Raises:
        ConfigError: ``root`` (or a parent) is a file, or the folder cannot be created or written.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"output folder {root} is a file: give a folder for the runs")
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=root, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"cannot write to output folder {root}: {exc.strerror or exc}; "
                          "give a writable folder") from None
    return root


def check_output_file(path: str | os.PathLike) -> Path:
    """Make sure a file can be written at ``path`` (e.g. a teacher checkpoint) before the work
    that produces it starts: a plain file name of at most 255 bytes, not an existing folder, in a
    writable folder (created if missing, :func:`check_output_dir`).

    Raises:
        ConfigError: naming the path and what is wrong.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"output {path} is a folder: give a file path, e.g. {path / 'x.pt'}")
    if not path.name or path.name in (".", ".."):
        raise ConfigError(f"output {path} names no file: give a file path")
    if len(os.fsencode(path.name)) > 255:
        raise ConfigError(f"output file name is {len(os.fsencode(path.name))} bytes long; file "
                          "systems allow at most 255")
    check_output_dir(path.parent)
    return path


def reserve_run(root: str | os.PathLike, name: str, overwrite: bool = False) -> Path:
    """Check everything a later :func:`save_run` of ``name`` needs, before the work starts, and
    reserve the name so that a second process saving the same name is refused now, not after
    its work: the name is valid, ``root`` is a writable folder, the run does not exist (unless
    ``overwrite``), and no running process holds the name. Finishes interrupted saves first
    (:func:`recover_runs`). Release with :func:`release_run` (``save_run`` does it).

    Returns:
        The run folder to be written, ``root/name``.

    Raises:
        ConfigError: bad name or output folder, the run exists, or another process is saving it.
    """
    check_name(name)
    root = check_output_dir(root)
    recover_runs(root)
    target = root / name
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise ConfigError(f"run {target} already exists: pick another name or overwrite it")
    lock = root / f".{name}{_LOCK}"
    if _lock_owner(lock) == os.getpid():
        return target
    try:
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise ConfigError(f"another process (pid {_lock_owner(lock)}) is saving run {target} "
                          "right now: pick another name") from None
    except OSError as exc:
        raise ConfigError(f"cannot reserve run name {target}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "w") as fh:
        fh.write(str(os.getpid()))
    return target


def release_run(root: str | os.PathLike, name: str) -> None:
    """Drop this process's reservation of ``name`` (see :func:`reserve_run`); no-op otherwise."""
    lock = Path(root) / f".{name}{_LOCK}"
    if _lock_owner(lock) == os.getpid():
        lock.unlink(missing_ok=True)


def save_run(root: str | os.PathLike, name: str, images01: torch.Tensor, labels: torch.Tensor,
             manifest: dict, fmt: str = "png", label_files: dict[str, str | os.PathLike] | None = None,
             overwrite: bool = False, extras: dict | None = None) -> Path:
    """Write a distilled set to ``<root>/<name>/`` atomically.

    Args:
        root: runs root folder (created if missing).
        name: run folder name (:func:`check_name`).
        images01: ``(N,3,H,W)`` float images in [0, 1] (quantised to uint8, rounded).
        labels: ``(N,)`` int labels in the teacher's label space.
        manifest: fields to record (see :func:`build_manifest`); ``format``, ``images``,
            ``num_images``, ``image_shape``, ``extras``, ``extra_tensors``, ``versions`` and
            ``created`` are added (replacing those of a manifest read back from a run).
        fmt: ``"png"`` (lossless) or ``"jpeg"`` (quality 75).
        label_files: extra label files or folders to copy in, ``{name in the run: source path}``
            (e.g. ``{"labels_soft": store_dir}``).
        overwrite: replace an existing run of the same name.
        extras: the method's extra results (``Distiller.export_extras()``): tensors go to
            ``extras.pt``, plain JSON values to the manifest; :func:`load_run` gives them back.

    Returns:
        The run folder.

    Raises:
        ConfigError: bad name or format, bad extras, an output folder that cannot be written,
            the run exists and ``overwrite`` is False, or another process is saving that name
            (:func:`reserve_run`; a reservation this process holds is kept).
        DataError: images and labels do not match.
    """
    check_name(name)
    extra_tensors, extra_values = _split_extras(extras or {})
    if fmt not in FORMATS:
        raise ConfigError(f"image format {fmt!r} is not one of {list(FORMATS)}")
    if images01.ndim != 4 or images01.shape[1] != 3 or len(images01) != len(labels):
        raise DataError(f"need images (N,3,H,W) and N labels; got {tuple(images01.shape)} and "
                        f"{tuple(labels.shape)}")
    root = Path(root)
    held = _lock_owner(root / f".{name}{_LOCK}") == os.getpid()
    target = reserve_run(root, name, overwrite)
    u8 = to_uint8(images01.detach().cpu().float())
    labels = labels.detach().cpu().long()
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}{_TMP}{os.getpid()}-"))
    try:
        (tmp / IMAGES_DIR).mkdir()
        files, seen = [], {}
        for img, lab in zip(u8, labels.tolist()):
            k = seen.get(lab, 0)
            seen[lab] = k + 1
            fname = f"{lab:04d}_{k:04d}{FORMATS[fmt]}"
            (tmp / IMAGES_DIR / fname).write_bytes(_encode(img, fmt))
            files.append(fname)
        atomic_torch_save(labels, tmp / HARD_LABELS_FILE)
        if extra_tensors:
            atomic_torch_save(extra_tensors, tmp / EXTRAS_FILE)
        for rel, src in (label_files or {}).items():
            check_name(rel, "label file name")
            src = Path(src)
            if src.is_dir():
                shutil.copytree(src, tmp / rel)
            else:
                shutil.copy2(src, tmp / rel)
        atomic_write_json(tmp / MANIFEST, {  # written last: a tmp folder with it is complete
            **manifest, "format": fmt, "images": files, "num_images": len(files),
            "image_shape": list(u8.shape[1:]), "extras": extra_values,
            "extra_tensors": {k: list(v.shape) for k, v in extra_tensors.items()},
            "versions": versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        if target.is_symlink():
            target.unlink()
        if target.exists():
            # two renames; a crash between them is undone by recover_runs (old kept until the
            # new run is in place)
            old = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}{_OLD}{os.getpid()}-"))
            os.rmdir(old)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if not held:
            release_run(root, name)
    log.info("saved %d images to %s", len(files), target)
    return target


@dataclass
class Run:
    """A loaded distilled set.

    Attributes:
        images01: ``(N,3,H,W)`` float32 in [0, 1] (multiples of 1/255), CPU.
        labels: ``(N,)`` int64 (teacher label space).
        manifest: the parsed ``manifest.json``.
        path: the run folder.
        extras: the method's extra results saved with the run (tensors on CPU and plain values,
            e.g. EDF's ``label_logits`` ``(N,C)``, ``syn_lr``, ``arch_kwargs``, ``zca_eps``); pass
            them to ``evaluate_student(..., extras=run.extras)``. Empty for other methods.
    """

    images01: torch.Tensor
    labels: torch.Tensor
    manifest: dict
    path: Path
    extras: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name


def run_folder(path: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """``path`` checked to be a run folder directly inside the runs folder (every load, zip and
    delete goes through here): the last component is a plain name (not ``..``, ``.`` or hidden),
    it is not a link, and once resolved it lies directly inside ``root`` (default: the folder
    ``path`` names as its parent).

    Raises:
        DataError: any of these fails (nothing is read or deleted).
    """
    path = Path(path)
    if path.name in ("", ".", "..") or path.name.startswith("."):
        raise DataError(f"{path} is not a run folder name (a plain name inside the runs folder)")
    if path.is_symlink():
        raise DataError(f"{path} is a link ({os.readlink(path)}); runs are real folders inside "
                        "the runs folder: delete the link")
    parent = Path(root if root is not None else path.parent).resolve()
    if path.resolve().parent != parent:
        raise DataError(f"{path} is not inside the runs folder {parent}")
    return path


def _inside(run: Path, f: Path) -> Path:
    """``f`` if it resolves to a file inside the run folder ``run`` (links pointing out refused)."""
    try:
        f.resolve().relative_to(run.resolve())
    except ValueError:
        raise DataError(f"{f} points outside the run folder {run}; the run is damaged") from None
    return f


def check_manifest(obj, where: str | os.PathLike = "manifest") -> dict:
    """``obj`` if it has the shape of a run manifest: a JSON object whose ``images`` (when
    present) is a list of names and whose ``dataset``, ``teacher``, ``config``, ``timings``,
    ``extras`` and ``extra_tensors`` (when present) are objects.

    Raises:
        DataError: naming ``where`` and the first wrong field.
    """
    if not isinstance(obj, dict):
        raise DataError(f"{where} holds a {type(obj).__name__}, not a run manifest (a JSON "
                        "object); the run is damaged: delete it")
    if not isinstance(obj.get("images", []), list) or \
            not all(isinstance(f, str) for f in obj.get("images", [])):
        raise DataError(f"{where}: 'images' is not a list of file names; the run is damaged")
    for key in ("dataset", "teacher", "config", "timings", "extras", "extra_tensors"):
        if key in obj and not isinstance(obj[key], dict):
            raise DataError(f"{where}: '{key}' is not an object; the run is damaged")
    return obj


def read_manifest(path: str | os.PathLike) -> dict:
    """The parsed and checked (:func:`check_manifest`) ``manifest.json`` of the run folder ``path``.

    Raises:
        DataError: not a run folder, or the manifest is unreadable or of the wrong shape.
    """
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        raise DataError(f"{path} is not a distilled-set folder (no {MANIFEST})")
    _inside(path, mf)
    try:
        return check_manifest(json.loads(mf.read_text()), mf)
    except (OSError, ValueError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"cannot read {mf}: {exc}") from exc


def load_run(path: str | os.PathLike, root: str | os.PathLike | None = None) -> Run:
    """Load a run folder written by :func:`save_run` (checked by :func:`run_folder`).

    Raises:
        DataError: missing folder / manifest / image, a link out of the runs folder, images and
            labels disagree, or the extra tensors listed in the manifest are missing or differ in
            shape.
        CheckpointError: unreadable labels or extras file.
    """
    if Path(path).name in ("", ".") and root is None:  # `nrrdd evaluate .` inside a run folder
        path = Path(path).resolve()
    path = run_folder(path, root)
    manifest = read_manifest(path)
    labels = safe_torch_load(_inside(path, path / HARD_LABELS_FILE))
    files = manifest.get("images", [])
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.is_floating_point() \
            or len(labels) != len(files) or not files:
        raise DataError(f"{path}: {len(files)} images listed but labels do not match; the run is damaged")
    imgs = []
    for f in files:
        p = _inside(path, path / IMAGES_DIR / check_name(f, "image file name"))
        try:
            with Image.open(p) as im:
                arr = np.asarray(im.convert("RGB"))
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"cannot read image {p}: {exc}") from exc
        imgs.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))
    if len({tuple(i.shape) for i in imgs}) > 1:
        raise DataError(f"{path}: images of different sizes; the run is damaged")
    return Run(to_float01(torch.stack(imgs)), labels.long(), manifest, path,
               _load_extras(path, manifest))


def _load_extras(path: Path, manifest: dict) -> dict:
    """The run's extras: the manifest's plain values plus the tensors of ``extras.pt``, checked
    against the shapes the manifest lists."""
    extras = dict(manifest.get("extras") or {})
    shapes = manifest.get("extra_tensors") or {}
    if not shapes:
        return extras
    f = _inside(path, path / EXTRAS_FILE)
    tensors = safe_torch_load(f) if f.is_file() else {}
    for k, shape in shapes.items():
        t = tensors.get(k) if isinstance(tensors, dict) else None
        if not isinstance(t, torch.Tensor) or list(t.shape) != list(shape):
            raise DataError(f"{path}: extra tensor {k!r} {list(shape)} is missing from "
                            f"{EXTRAS_FILE} or has another shape; the run is damaged")
        extras[k] = t
    return extras


@dataclass
class RunInfo:
    """A run folder and its manifest (images not loaded); ``error`` says why a damaged run
    cannot be used (its ``manifest`` is then ``{}``), None for a sound one."""

    name: str
    path: Path
    manifest: dict
    error: str | None = None


def list_runs(root: str | os.PathLike | None = None, damaged: bool = False) -> list[RunInfo]:
    """The runs under ``root`` (default :func:`default_runs_root`), sorted by name. Hidden
    (temporary) entries are skipped, and interrupted saves are finished or undone first
    (:func:`recover_runs`). Folders with a manifest that cannot be used (unreadable, wrong shape,
    a link) are skipped with a warning, or listed with ``error`` set when ``damaged``."""
    root = Path(root) if root is not None else default_runs_root()
    if not root.is_dir():
        return []
    try:
        recover_runs(root)
    except OSError as exc:  # a read-only runs folder can still be listed
        log.warning("cannot tidy %s: %s", root, exc)
    out = []
    for p in sorted(root.iterdir()):
        if p.name.startswith(".") or not (p.is_dir() or p.is_symlink()):
            continue
        if not p.is_symlink() and not (p / MANIFEST).exists():
            continue  # not a run (another folder kept in the runs folder)
        try:
            out.append(RunInfo(p.name, p, read_manifest(run_folder(p, root))))
        except DataError as exc:
            log.warning("skipping %s: %s", p, exc)
            if damaged:
                out.append(RunInfo(p.name, p, {}, str(exc)))
    return out


def delete_run(path: str | os.PathLike, root: str | os.PathLike | None = None) -> None:
    """Delete a run folder directly inside the runs folder ``root`` (default: ``path``'s parent
    folder), also a damaged one. A link there is removed itself, never what it points to.

    Raises:
        DataError: ``path`` is not a run folder inside ``root`` (a ``..`` or hidden name, a folder
            elsewhere, no ``manifest.json``), so nothing is deleted.
    """
    path = Path(path)
    try:
        run_folder(path, root)
    except DataError:
        inside = path.parent.resolve() == Path(root if root is not None else path.parent).resolve()
        if path.is_symlink() and path.name not in (".", "..") and not path.name.startswith(".") \
                and inside:
            path.unlink()
            return
        raise
    if not (path / MANIFEST).is_file():
        raise DataError(f"{path} is not a distilled-set folder (no {MANIFEST}); nothing deleted")
    shutil.rmtree(path)


def zip_run(path: str | os.PathLike, root: str | os.PathLike | None = None) -> bytes:
    """The run folder as a zip archive (entries under ``<name>/``), in memory. Links inside the
    run are left out (never followed).

    Raises:
        DataError: not a run folder inside the runs folder (:func:`run_folder`).
    """
    path = run_folder(path, root)
    read_manifest(path)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for folder, dirs, files in sorted(os.walk(path, followlinks=False)):
            dirs.sort()
            for fname in sorted(files):
                f = Path(folder) / fname
                if f.is_symlink() or not f.is_file():
                    continue
                zf.write(f, arcname=f"{path.name}/{f.relative_to(path).as_posix()}")
    return buf.getvalue()


def run_test_classes(manifest: dict, bundle: DatasetBundle,
                     requested: list[str | int] | None = None) -> list[int]:
    """The classes a student trained on a run is tested on: ``requested`` (names or indices of
    ``bundle``) or, by default, the run's classes.

    Raises:
        DataError: a requested class is not one of the run's distilled classes (a student
            cannot learn a class it has no images of), or the run lists no classes.
    """
    ds = manifest.get("dataset") or {}
    names = list(bundle.config.class_names)
    own = ds.get("class_names") or [names[c] for c in ds.get("classes", []) if 0 <= c < len(names)]
    if not own:
        raise DataError("the run's manifest lists no classes; pass them with --classes")
    if not requested:
        return bundle.resolve_classes(list(own))
    chosen = bundle.resolve_classes(list(requested))
    extra = [names[c] for c in chosen if names[c] not in own]
    if extra:
        raise DataError(f"class(es) {', '.join(extra)} are not in the run (it has "
                        f"{', '.join(own)}): a student cannot learn classes it has no images of")
    return chosen


def save_eval(path: str | os.PathLike, result: dict, *, dataset: dict | None = None,
              test_classes: list[str] | None = None) -> Path:
    """Write an evaluation result (e.g. ``EvalResult.to_dict()``) to
    ``<run>/evals/<time>_<student>_<label_mode>_s<seed>.json`` atomically.

    Args:
        dataset: what the student was tested on, e.g. ``{"name", "entry", "args"}`` (recorded
            as ``result["dataset"]``); default: the run's own dataset (its manifest).
        test_classes: names of the test classes (recorded as ``result["test_classes"]``);
            default: the run's classes.

    Raises:
        DataError: not a run folder.
    """
    path = run_folder(path)
    ds = read_manifest(path).get("dataset") or {}
    result = dict(result)
    result["dataset"] = dataset if dataset is not None else \
        {"name": ds.get("name"), "args": ds.get("args", {})}
    result["test_classes"] = list(test_classes if test_classes is not None else
                                  ds.get("class_names", []))
    cfg = result.get("config", {})
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}_{cfg.get('student', 'student')}_" \
           f"{cfg.get('label_mode', 'labels')}_s{cfg.get('seed', 0)}"
    out = path / EVALS_DIR / f"{stem}.json"
    k = 1
    while out.exists():
        out = path / EVALS_DIR / f"{stem}_{k}.json"
        k += 1
    return atomic_write_json(out, result)


def list_evals(path: str | os.PathLike) -> list[dict]:
    """The evaluation results stored in a run folder, oldest first (``_file`` = the file name);
    unreadable files are skipped with a warning."""
    out = []
    for f in sorted((Path(path) / EVALS_DIR).glob("*.json")):
        try:
            obj = json.loads(f.read_text())
            if not isinstance(obj, dict) or not isinstance(obj.get("config", {}), dict):
                raise ValueError("not an evaluation result")
            out.append({**obj, "_file": f.name})
        except (OSError, ValueError) as exc:
            log.warning("skipping %s: %s", f, exc)
    return out
