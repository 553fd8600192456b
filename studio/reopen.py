"""Reopening a saved run on the Refine page (from the Runs page): the knob values of its method
and config, and its classes. Pure functions over the run's manifest (no ``st.*``), so the page
only renders."""

from __future__ import annotations

from nrrdd_core.export import Run
from nrrdd_core.methods import list_methods

from . import keys as K


def knob_values(manifest: dict) -> dict:
    """``session_state`` values that put a run's method and config into the Refine page's knobs
    (``K.METHOD`` and ``K.knob(method, field)``); empty when the run's method is not registered
    here (nothing to load)."""
    method = manifest.get("method")
    if method not in list_methods():
        return {}
    return {K.METHOD: method,
            **{K.knob(method, name): value for name, value in manifest.get("config", {}).items()}}


def run_classes(run: Run) -> tuple[list[int], list[str]]:
    """The classes present in a run's labels (sorted) and their names."""
    classes = sorted(set(run.labels.tolist()))
    names = run.manifest["dataset"]["all_class_names"]
    return classes, [names[c] for c in classes]
