"""Datasets: one registry of entries, each yielding train/test splits plus a DataConfig.

Use :func:`load_dataset`::

    bundle = load_dataset("shapes")                                  # built-in, offline
    bundle = load_dataset("npz", root="../shared/data", train_file="cifar10_train.npz",
                          test_file="cifar10_test.npz", classes=["cat", "dog"])
"""

from __future__ import annotations

from typing import Callable, Sequence

from ..errors import DataError
from .base import DataConfig, DatasetBundle, ImageSplit, to_float01, to_uint8

_DATASETS: dict[str, Callable[..., DatasetBundle]] = {}


def register_dataset(name: str):
    """Decorator registering a loader ``fn(**kwargs) -> DatasetBundle`` under ``name``."""

    def deco(fn):
        if name in _DATASETS and _DATASETS[name] is not fn:
            raise ValueError(f"dataset {name!r} is already registered")
        _DATASETS[name] = fn
        return fn

    return deco


def _load_builtin() -> None:
    from . import _builtin  # noqa: F401


def list_datasets() -> list[str]:
    """Names of the registered dataset entries."""
    _load_builtin()
    return sorted(_DATASETS)


def load_dataset(name: str, classes: Sequence[int | str] | None = None, **kwargs) -> DatasetBundle:
    """Load dataset entry ``name`` and optionally keep a subset of ``classes`` (names or
    indices; relabelled ``0..k-1``, the original labels kept in ``bundle.class_map``).

    ``kwargs`` go to the entry (``root``, ``image_size``, ``seed``, file names...).

    Raises:
        DataError: unknown entry, missing/empty/corrupt data, unknown class.
    """
    _load_builtin()
    if name not in _DATASETS:
        raise DataError(f"unknown dataset {name!r}; available: {', '.join(sorted(_DATASETS))}")
    bundle = _DATASETS[name](**kwargs)
    if classes:
        bundle = bundle.subset(classes)
    return bundle


__all__ = ["DataConfig", "DatasetBundle", "ImageSplit", "list_datasets", "load_dataset",
           "register_dataset", "to_float01", "to_uint8"]
