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
crash never leaves a half-written run. The default runs root is ``$NRRDD_RUNS`` or ``./runs``.
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

import numpy as np
import torch
from PIL import Image

from . import __version__
from .data.base import DatasetBundle, to_float01, to_uint8
from .errors import ConfigError, DataError
from .io import atomic_torch_save, atomic_write_json, safe_torch_load
from .labels import HARD_LABELS_FILE
from .models.teacher import Teacher

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


def check_name(name: str, what: str = "run name") -> str:
    """Return ``name`` if it is a plain folder / file name.

    Raises:
        ConfigError: empty, ``.`` / ``..``, starting with ``.`` (hidden / temporary), or holding a
            path separator.
    """
    if not isinstance(name, str) or not name.strip() or name in (".", "..") or name.startswith(".") \
            or "/" in name or "\\" in name or os.sep in name or (os.altsep and os.altsep in name) \
            or "\0" in name:
        raise ConfigError(f"invalid {what} {name!r}: use a plain name without '/', '\\' or a leading '.'")
    return name


def versions() -> dict:
    """Versions of Python, torch, torchvision, numpy, Pillow and nrrdd_core."""
    import PIL
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": np.__version__, "pillow": PIL.__version__,
            "nrrdd_core": __version__}


def build_manifest(*, method: str, config: dict, teacher: Teacher, bundle: DatasetBundle,
                   classes: list[int], ipc: int, seed: int, teacher_ref: str = "",
                   dataset_args: dict | None = None, timings: dict | None = None, **extra) -> dict:
    """The standard manifest of a distilled set.

    Args:
        method: registry name of the method.
        config: the method's full config (``Config.to_dict()``).
        teacher: the teacher used; ``teacher_ref`` how to load it again (a checkpoint path or
            ``"shipped"``).
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
                    "source": teacher.source, "ref": teacher_ref, "test_acc": teacher.test_acc,
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
        ConfigError: bad name or format, bad extras, or the run exists and ``overwrite`` is False.
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
    target = root / name
    if target.exists() and not overwrite:
        raise ConfigError(f"run {target} already exists: pick another name or overwrite it")
    root.mkdir(parents=True, exist_ok=True)
    u8 = to_uint8(images01.detach().cpu().float())
    labels = labels.detach().cpu().long()
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.tmp-"))
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
        atomic_write_json(tmp / MANIFEST, {
            **manifest, "format": fmt, "images": files, "num_images": len(files),
            "image_shape": list(u8.shape[1:]), "extras": extra_values,
            "extra_tensors": {k: list(v.shape) for k, v in extra_tensors.items()},
            "versions": versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        if target.exists():
            trash = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.old-"))
            os.replace(target, trash / name)
            os.replace(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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


def read_manifest(path: str | os.PathLike) -> dict:
    """The parsed ``manifest.json`` of the run folder ``path``.

    Raises:
        DataError: not a run folder, or the manifest is unreadable.
    """
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        raise DataError(f"{path} is not a distilled-set folder (no {MANIFEST})")
    try:
        return json.loads(mf.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {mf}: {exc}") from exc


def load_run(path: str | os.PathLike) -> Run:
    """Load a run folder written by :func:`save_run`.

    Raises:
        DataError: missing folder / manifest / image, images and labels disagree, or the extra
            tensors listed in the manifest are missing or differ in shape.
        CheckpointError: unreadable labels or extras file.
    """
    path = Path(path)
    manifest = read_manifest(path)
    labels = safe_torch_load(path / HARD_LABELS_FILE)
    files = manifest.get("images", [])
    if not isinstance(labels, torch.Tensor) or len(labels) != len(files) or not files:
        raise DataError(f"{path}: {len(files)} images listed but labels do not match; the run is damaged")
    imgs = []
    for f in files:
        p = path / IMAGES_DIR / check_name(f, "image file name")
        try:
            with Image.open(p) as im:
                arr = np.asarray(im.convert("RGB"))
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read image {p}: {exc}") from exc
        imgs.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))
    return Run(to_float01(torch.stack(imgs)), labels.long(), manifest, path,
               _load_extras(path, manifest))


def _load_extras(path: Path, manifest: dict) -> dict:
    """The run's extras: the manifest's plain values plus the tensors of ``extras.pt``, checked
    against the shapes the manifest lists."""
    extras = dict(manifest.get("extras") or {})
    shapes = manifest.get("extra_tensors") or {}
    if not shapes:
        return extras
    tensors = safe_torch_load(path / EXTRAS_FILE) if (path / EXTRAS_FILE).is_file() else {}
    for k, shape in shapes.items():
        t = tensors.get(k) if isinstance(tensors, dict) else None
        if not isinstance(t, torch.Tensor) or list(t.shape) != list(shape):
            raise DataError(f"{path}: extra tensor {k!r} {list(shape)} is missing from "
                            f"{EXTRAS_FILE} or has another shape; the run is damaged")
        extras[k] = t
    return extras


@dataclass
class RunInfo:
    """A run folder and its manifest (images not loaded)."""

    name: str
    path: Path
    manifest: dict


def list_runs(root: str | os.PathLike | None = None) -> list[RunInfo]:
    """The runs under ``root`` (default :func:`default_runs_root`), sorted by name; folders that
    are hidden (temporary) or have no readable manifest are skipped with a warning."""
    root = Path(root) if root is not None else default_runs_root()
    if not root.is_dir():
        return []
    out = []
    for p in sorted(root.iterdir()):
        if not p.is_dir() or p.name.startswith("."):
            continue
        try:
            out.append(RunInfo(p.name, p, read_manifest(p)))
        except DataError as exc:
            log.warning("skipping %s: %s", p, exc)
    return out


def delete_run(path: str | os.PathLike) -> None:
    """Delete a run folder.

    Raises:
        DataError: ``path`` is not a run folder (no manifest), so nothing is deleted.
    """
    path = Path(path)
    read_manifest(path)
    shutil.rmtree(path)


def zip_run(path: str | os.PathLike) -> bytes:
    """The run folder as a zip archive (entries under ``<name>/``), in memory.

    Raises:
        DataError: not a run folder.
    """
    path = Path(path)
    read_manifest(path)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            zf.write(f, arcname=f"{path.name}/{f.relative_to(path).as_posix()}")
    return buf.getvalue()


def save_eval(path: str | os.PathLike, result: dict) -> Path:
    """Write an evaluation result (e.g. ``EvalResult.to_dict()``) to
    ``<run>/evals/<time>_<student>_<label_mode>_s<seed>.json`` atomically.

    Raises:
        DataError: not a run folder.
    """
    path = Path(path)
    read_manifest(path)
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
            out.append({**json.loads(f.read_text()), "_file": f.name})
        except (OSError, ValueError) as exc:
            log.warning("skipping %s: %s", f, exc)
    return out
