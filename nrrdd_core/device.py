"""Device selection: chosen once per run, ``auto`` = CUDA when present, else CPU.

The library never hard-codes CUDA; tensors move with ``.to(device)``.
"""

from __future__ import annotations

import torch

from .errors import ConfigError


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """Return the torch device for ``name``.

    Args:
        name: ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``
            or a ``torch.device``. ``None`` means ``"auto"``.

    Raises:
        ConfigError: CUDA was asked for but is not available, or the name is unknown.
    """
    if isinstance(name, torch.device):
        return name
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"unknown device {name!r}: use auto, cpu or cuda[:N]") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but CUDA is not available here: use cpu or auto")
    return dev


def device_info(device: torch.device | str | None = "auto") -> dict:
    """Describe a device for display: ``{"type", "name", "total_bytes", "free_bytes"}``.

    Memory fields are ``None`` on CPU.
    """
    dev = resolve_device(device)
    if dev.type == "cuda":
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(idx)
        return {"type": "cuda", "name": torch.cuda.get_device_name(idx),
                "total_bytes": int(total), "free_bytes": int(free)}
    return {"type": "cpu", "name": "CPU", "total_bytes": None, "free_bytes": None}


def make_generator(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed``.

    Every run owns one; random tensors are drawn on the CPU with it and then moved to the
    run's device, so the same seed gives the same numbers on every device.
    """
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    return g


def class_generator(seed: int, c: int) -> torch.Generator:
    """A CPU generator for class ``c`` of a run seeded with ``seed`` (seeded from a hash of the
    pair): a class's random draws then do not depend on which other classes are drawn before it,
    so classes can be split over processes (:mod:`nrrdd_core.distributed`) with the same result."""
    import hashlib

    digest = hashlib.sha256(f"nrrdd-class:{int(seed)}:{int(c)}".encode()).digest()
    return make_generator(int.from_bytes(digest[:8], "little") >> 1)
