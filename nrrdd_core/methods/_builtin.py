"""Imports every built-in method module so that each registers itself."""

import importlib
import logging

log = logging.getLogger(__name__)

for _mod in ("sre2l", "rded", "nrrdd", "edf"):
    try:
        importlib.import_module(f"{__package__}.{_mod}")
    except ModuleNotFoundError as exc:  # a method module not written yet
        if exc.name != f"{__package__}.{_mod}":
            raise
        log.debug("method module %s not available", _mod)
