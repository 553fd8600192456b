"""Distillation methods behind one step-wise protocol (see :mod:`.base`)."""

from .base import (Distiller, StepRecord, get_method, list_methods, make_distiller,
                   register_method, run_distiller)

__all__ = ["Distiller", "StepRecord", "get_method", "list_methods", "make_distiller",
           "register_method", "run_distiller"]
