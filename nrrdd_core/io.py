"""Atomic file writes and the on-disk cache location.

Every cache or export write goes to a temporary file in the target folder and is then
renamed over the target (``os.replace``), so a crash never leaves a half-written file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    """Root of the on-disk cache: ``$NRRDD_CACHE`` or ``~/.cache/nrrdd``. Created if missing."""
    root = Path(os.environ.get("NRRDD_CACHE", Path.home() / ".cache" / "nrrdd"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def config_key(obj: Any, length: int = 16) -> str:
    """A stable hex key of a JSON-serialisable object (sorted keys), for cache file names."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` atomically. Save only tensors and plain Python types so the
    file loads with ``torch.load(..., weights_only=True)``."""
    import torch  # here, not at the top: the app reads caches before torch is imported

    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def safe_torch_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True``; a missing, truncated or corrupt file raises
    :class:`~nrrdd_core.errors.CheckpointError` naming the path. A file that holds anything but
    tensors and plain Python values (it would run code when unpickled) is refused as unsafe; the
    message never suggests loading it without ``weights_only``."""
    import torch

    from .errors import CheckpointError

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        what = re.search(r"unsupported GLOBAL (\S+)", str(exc)) or \
            re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        raise CheckpointError(
            f"refused {path}: it holds Python objects that would run code when loaded"
            f"{f' ({what.group(1)})' if what else ''}; only checkpoints of tensors and plain "
            "values are read: save the model's state_dict (or use `nrrdd teacher train`)") from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files
        raise CheckpointError(f"cannot read checkpoint {path} (truncated or not a torch file): "
                              f"{type(exc).__name__}: {_first_sentence(exc)}") from exc


def _first_sentence(exc: BaseException) -> str:
    """The first line / sentence of an exception message, without torch's retry advice."""
    text = " ".join(str(exc).split())
    text = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
    return re.sub(r"[^.]*weights_only[^.]*\.?", "", text).strip() or type(exc).__name__


def write_if_changed(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically unless the file already holds exactly these bytes
    (a content-addressed cache entry that was truncated or corrupted is replaced)."""
    path = Path(path)
    try:
        if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
            return path
    except OSError:
        pass
    return atomic_write_bytes(path, data)
