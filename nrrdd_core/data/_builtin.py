"""Imports every built-in dataset module so that each registers itself."""

import importlib

for _mod in ("shapes", "npz", "torchvision_sets", "imagefolder"):
    try:
        importlib.import_module(f"{__package__}.{_mod}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}.{_mod}":
            raise
