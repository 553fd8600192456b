"""Environment switches of the app.

``NRRDD_STUDIO_TINY=1``
    Tiny settings for tests and quick demos: the built-in ``shapes`` dataset with 20 training and
    10 test images per class, refinement and distillation runs of a few steps, student
    evaluation of 1 epoch, teacher training of 1 epoch. Everything else works as usual.
``NRRDD_STUDIO_FEED=0``
    Show running Refine jobs through fragment reruns instead of the live feed
    (:mod:`studio.feed`), e.g. to compare the two.
``NRRDD_RUNS``
    Folder of saved runs (default ``runs/`` in the working directory; read by
    ``nrrdd_core.export``).
"""

from __future__ import annotations

import os


def tiny() -> bool:
    """True when ``NRRDD_STUDIO_TINY`` is set to a true value."""
    return os.environ.get("NRRDD_STUDIO_TINY", "").lower() in ("1", "true", "yes", "on")


def shapes_kwargs() -> dict:
    """Extra kwargs of the built-in dataset (smaller in tiny mode)."""
    return {"train_per_class": 20, "test_per_class": 10} if tiny() else {}


#: Steps-like config fields shortened in tiny mode (field name -> value).
TINY_OVERRIDES = {"iterations": 6, "mipc": 4, "num_crops": 2, "syn_steps": 2, "batch_syn": 4,
                  "expert_epochs": 1, "current_max_start_epoch": 1, "max_start_epoch": 1,
                  "expansion_iterations": 2, "dae_interval": 2}


def method_overrides(fields: list[dict]) -> dict:
    """Config overrides of a method in tiny mode (only fields the method has, within range)."""
    if not tiny():
        return {}
    out = {}
    for f in fields:
        v = TINY_OVERRIDES.get(f["name"])
        if v is None or not isinstance(f["default"], int) or isinstance(f["default"], bool):
            continue
        lo, hi = f.get("lo"), f.get("hi")
        if (lo is None or v >= lo) and (hi is None or v <= hi) and v < f["default"]:
            out[f["name"]] = v
    return out
