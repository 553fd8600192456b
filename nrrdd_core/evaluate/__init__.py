"""Student evaluation of a distilled set: ``protocol="kd"`` (METHODS.md §1.4, :mod:`.kd`) or ``"edf"``
(METHODS.md §5.6, :mod:`.edf`, imported on first use).

Example::

    cfg = EvalConfig(student="resnet18_small", label_mode="dbr", epochs=300)
    res = evaluate_student(x01, y, teacher, bundle, cfg, device="auto", seed=0)
    res.final_acc, res.best_acc

    run = load_run("runs/edf_demo")               # an EDF run: its learned labels and lr
    res = evaluate_student(run.images01, run.labels, teacher, bundle, EvalConfig(protocol="edf"),
                           extras=run.extras)
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from ..data.base import DatasetBundle
from ..errors import ConfigError
from ..models.teacher import Teacher
from .kd import EvalConfig, default_batch_size, evaluate_kd, random_real_subset, smoothing_lr
from .loop import EvalResult, eval_epochs


def evaluate_student(images01: torch.Tensor, labels: torch.Tensor, teacher: Teacher,
                     bundle: DatasetBundle, cfg: EvalConfig | None = None,
                     device: str | torch.device = "auto", seed: int = 0,
                     progress: Callable[[int, int, dict], None] | None = None,
                     should_stop: Callable[[], bool] | None = None,
                     classes: Sequence[int | str] | None = None,
                     label_dir: str | Path | None = None, extras: dict | None = None,
                     **kwargs) -> EvalResult:
    """Train a fresh student on ``(images01, labels)`` and report top-1 on ``bundle``'s test split.

    Dispatches on ``cfg.protocol``: ``"kd"`` -> :func:`.kd.evaluate_kd` (arguments documented
    there); ``"edf"`` -> ``.edf.evaluate_edf(images01, labels, teacher, bundle, cfg, device=,
    seed=, progress=, should_stop=, classes=, **kwargs)``. ``kwargs`` are protocol-specific
    (e.g. EDF's learned soft labels and learning rate).

    ``extras`` are a distilled set's method-specific results (``Run.extras`` of a loaded run, or
    ``Distiller.export_extras()``): the EDF protocol takes those named in ``.edf.RUN_EXTRAS``
    (learned label logits ``(N,C)``, student lr, ConvNet-IN architecture, ZCA eps; explicit
    ``kwargs`` win); the KD protocol uses none of them.

    Raises:
        ConfigError: bad settings.
        (and the errors of the protocol function).
    """
    cfg = cfg or EvalConfig()
    if cfg.protocol == "edf":
        from . import edf  # imported on first use (it imports the EDF method's modules)

        kwargs = {**{k: v for k, v in (extras or {}).items() if k in edf.RUN_EXTRAS}, **kwargs}
        return edf.evaluate_edf(images01, labels, teacher, bundle, cfg, device=device, seed=seed,
                                progress=progress, should_stop=should_stop, classes=classes, **kwargs)
    if kwargs:
        raise ConfigError(f"the kd protocol takes no option(s) {sorted(kwargs)}")
    return evaluate_kd(images01, labels, teacher, bundle, cfg, device=device, seed=seed,
                       progress=progress, should_stop=should_stop, classes=classes, label_dir=label_dir)


__all__ = ["EvalConfig", "EvalResult", "default_batch_size", "eval_epochs", "evaluate_student",
           "random_real_subset", "smoothing_lr"]
