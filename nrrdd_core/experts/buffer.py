"""The expert buffer on disk (METHODS.md §5.1): a folder ``cache_dir()/experts/<key>/`` holding
one ``expert_NNN.pt`` per expert (``{"kind", "trajectory" (E+1,P), "test_acc"}``), an optional
``zca.pt`` and ``manifest.json`` (written last, with each file's size and SHA-256). Every file is
written atomically and read with ``weights_only=True``; a missing, truncated or corrupt file
raises :class:`~nrrdd_core.errors.CheckpointError`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..data.base import DatasetBundle, dataset_identity
from ..errors import CheckpointError
from ..io import cache_dir, config_key, safe_torch_load
from ..zca import ZCA
from .config import ARCH, ExpertConfig

EXPERT_KIND = "nrrdd-expert-v1"
MANIFEST = "manifest.json"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ExpertBuffer:
    """A verified expert buffer folder (see :func:`load_buffer`).

    Attributes:
        path: the folder; manifest: the parsed ``manifest.json``; num_experts, epochs (E),
        num_params (P), arch_kwargs, num_classes, image_size, test_accs, zca (a :class:`ZCA`
        or None).
    """

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self.num_experts = len(manifest["experts"])
        self.epochs = int(manifest["epochs"])
        self.num_params = int(manifest["num_params"])
        self.arch_kwargs = dict(manifest["arch_kwargs"])
        self.num_classes = int(manifest["num_classes"])
        self.image_size = int(manifest["image_size"])
        self.test_accs = [float(e["test_acc"]) for e in manifest["experts"]]
        self.zca = None
        if manifest.get("zca_file"):
            f = path / manifest["zca_file"]
            try:
                self.zca = ZCA.from_state(safe_torch_load(f), f, 3 * self.image_size ** 2)
            except CheckpointError as exc:
                raise CheckpointError(f"{exc}; delete {path} and retrain") from None
        self._cache: tuple[int, torch.Tensor] | None = None

    def trajectory(self, i: int) -> torch.Tensor:
        """Expert ``i``'s snapshots ``(E+1, P)`` float32 on CPU (the last one is kept in memory).

        Raises:
            CheckpointError: checksum mismatch, unreadable file or wrong shape.
        """
        if self._cache is not None and self._cache[0] == i:
            return self._cache[1]
        entry = self.manifest["experts"][i]
        f = self.path / entry["file"]
        if file_sha256(f) != entry["sha256"]:
            raise CheckpointError(f"expert buffer file {f} is corrupt (checksum mismatch); "
                                  f"delete {self.path} and retrain")
        obj = safe_torch_load(f)
        traj = obj.get("trajectory") if isinstance(obj, dict) else None
        if not isinstance(obj, dict) or obj.get("kind") != EXPERT_KIND or \
                not isinstance(traj, torch.Tensor) or \
                tuple(traj.shape) != (self.epochs + 1, self.num_params):
            raise CheckpointError(f"{f} is not an expert trajectory of shape "
                                  f"({self.epochs + 1}, {self.num_params}); delete the buffer folder")
        self._cache = (i, traj.float())
        return self._cache[1]

    def release(self) -> None:
        """Drop the trajectory kept in memory (the next :meth:`trajectory` reads its file again)."""
        self._cache = None


def load_buffer(path: str | Path, verify: bool = True) -> ExpertBuffer:
    """Open an expert buffer folder written by :func:`train_experts`.

    Args:
        path: the buffer folder (or its ``manifest.json``).
        verify: also check every file's SHA-256 against the manifest (reads all files once).

    Raises:
        CheckpointError: missing/corrupt manifest, a missing file, a size that differs from the
            manifest (truncated) or a checksum mismatch (corrupt).
    """
    path = Path(path)
    if path.name == MANIFEST:
        path = path.parent
    mf = path / MANIFEST
    if not mf.is_file():
        raise CheckpointError(f"no expert buffer at {path} ({MANIFEST} missing): run `nrrdd experts`")
    try:
        manifest = json.loads(mf.read_text())
        files = [manifest["experts"][i] for i in range(len(manifest["experts"]))]
        if manifest.get("zca_file"):
            files.append({"file": manifest["zca_file"], **manifest["zca_check"]})
        for e in files:  # every entry names a file inside the folder, with a size and checksum
            if not isinstance(e["file"], str) or int(e["bytes"]) < 0 or \
                    not isinstance(e["sha256"], str) or Path(e["file"]).name != e["file"] or \
                    e["file"] in ("", ".", ".."):
                raise ValueError(f"bad file entry {e}")
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"corrupt expert buffer manifest {mf}: {type(exc).__name__}: {exc}; "
                              f"delete {path} and retrain") from None
    for e in files:
        f = path / e["file"]
        if not f.is_file():
            raise CheckpointError(f"expert buffer file missing: {f}; delete {path} and retrain")
        if f.stat().st_size != int(e["bytes"]):
            raise CheckpointError(f"expert buffer file {f} is truncated or changed "
                                  f"({f.stat().st_size} bytes, manifest says {e['bytes']}); "
                                  f"delete {path} and retrain")
        if verify and file_sha256(f) != e["sha256"]:
            raise CheckpointError(f"expert buffer file {f} is corrupt (checksum mismatch); "
                                  f"delete {path} and retrain")
    try:
        return ExpertBuffer(path, manifest)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"corrupt expert buffer manifest {mf}: {type(exc).__name__}: {exc}; "
                              f"delete {path} and retrain") from None


def buffer_dir(cfg: ExpertConfig, bundle: DatasetBundle) -> Path:
    """The cache folder of the buffer of ``cfg`` on ``bundle``:
    ``cache_dir()/experts/<config_key(cfg + dataset identity)>``."""
    return cache_dir() / "experts" / config_key({"cfg": cfg.to_dict(), "arch": ARCH,
                                                  "data": dataset_identity(bundle)})
