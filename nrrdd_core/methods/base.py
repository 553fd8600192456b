"""The step-wise Distiller protocol shared by every method, and the method registry.

The UI, the CLI and the tests drive every method the same way::

    d = make_distiller("nrrdd", config=None, teacher=t, dataset=b, classes=[0, 3], ipc=10,
                       device="cpu", seed=0)
    while not d.done:
        rec = d.step()          # one bounded unit of work (<~1 s at built-in defaults on CPU)
    x01, y = d.images()         # (N,3,H,W) float in [0,1] on CPU, (N,) int64 labels
    d.close()

``state_dict()`` / ``load_state_dict()`` resume a run exactly (same images as an
uninterrupted run with the same seed).
"""

from __future__ import annotations

import abc
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Sequence

import torch

from ..configs import ConfigBase
from ..data.base import DatasetBundle
from ..device import make_generator, resolve_device
from ..errors import ConfigError, DataError, NonFiniteLossError, StoppedError
from ..models.teacher import Teacher

log = logging.getLogger(__name__)


@dataclass
class StepRecord:
    """What one ``step()`` did.

    Attributes:
        step: 0-based index of the step just done.
        total: total number of steps of the run.
        phase: name of the phase (``"select"``, ``"recover"``, ``"refine"``, ``"match"``...).
        losses: loss terms of this step (plain floats), e.g. ``{"ce": 1.2, "bn": 0.3}``.
        seconds: wall time of the step in seconds.
        info: extra numbers for display (lr, skipped flag, class index...).
    """

    step: int
    total: int
    phase: str
    losses: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    info: dict = field(default_factory=dict)


_REGISTRY: dict[str, type["Distiller"]] = {}


def register_method(name: str):
    """Class decorator registering a :class:`Distiller` under ``name``.

    Raises:
        ValueError: the name is already registered.
    """

    def deco(cls: type["Distiller"]) -> type["Distiller"]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method {name!r} is already registered by {_REGISTRY[name].__name__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _load_builtin_methods() -> None:
    from . import _builtin  # noqa: F401  (imports each method module, which registers itself)


def get_method(name: str) -> type["Distiller"]:
    """The Distiller class registered as ``name``.

    Raises:
        ConfigError: unknown method (the message lists the registered ones).
    """
    _load_builtin_methods()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def list_methods() -> list[str]:
    """Names of the registered methods."""
    _load_builtin_methods()
    return sorted(_REGISTRY)


def make_distiller(name: str, config: ConfigBase | dict | None = None, **kwargs) -> "Distiller":
    """Build the method ``name`` with ``config`` (a Config instance, a dict of overrides, or
    None for the defaults); ``kwargs`` go to the constructor (teacher, dataset, classes, ipc,
    device, seed)."""
    cls = get_method(name)
    if config is None or isinstance(config, dict):
        config = cls.Config.from_dict(config or {})
    return cls(config, **kwargs)


class Distiller(abc.ABC):
    """Base of every distillation method.

    Constructor arguments (cheap: no heavy work before the first ``step()``):
        config: the method's frozen Config dataclass.
        teacher: frozen :class:`Teacher`; must be compatible with ``dataset``.
        dataset: the :class:`DatasetBundle` whose *train* split provides real images.
        classes: label indices (or names) of the dataset to distil; None = all.
        ipc: images per class (>= 1).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or a torch.device.
        seed: seed of the run's own ``torch.Generator`` (no global RNG is used).

    Attributes set here: ``config``, ``teacher`` (moved to ``device``), ``dataset``, ``classes``
    (list of int), ``ipc``, ``device``, ``seed``, ``generator``, ``step_index`` (steps done),
    ``history`` (list of StepRecord).

    Raises:
        ConfigError: ipc < 1.
        DataError: a class has fewer real training images than the method needs.
        TeacherMismatchError: teacher and dataset disagree on classes or image size.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[ConfigBase]]

    def __init__(self, config: ConfigBase, *, teacher: Teacher, dataset: DatasetBundle,
                 classes: Sequence[int | str] | None = None, ipc: int = 10,
                 device: str | torch.device = "auto", seed: int = 0) -> None:
        if not isinstance(config, self.Config):
            raise ConfigError(f"{type(self).__name__} needs a {self.Config.__name__}, "
                              f"got {type(config).__name__}")
        if int(ipc) < 1:
            raise ConfigError(f"ipc must be >= 1, got {ipc}")
        teacher.check_compatible(dataset.config)
        self.config = config
        self.device = resolve_device(device)
        self.teacher = teacher.to(self.device)
        self.dataset = dataset
        self.classes = dataset.resolve_classes(classes)
        self.ipc = int(ipc)
        self.seed = int(seed)
        self.generator = make_generator(seed)
        self.step_index = 0
        self.history: list[StepRecord] = []

    # ---- protocol -------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def total_steps(self) -> int:
        """Total number of ``step()`` calls of the run."""

    @property
    def done(self) -> bool:
        """True once ``step_index == total_steps``."""
        return self.step_index >= self.total_steps

    def step(self) -> StepRecord:
        """Do one bounded unit of work and return its record.

        Raises:
            RuntimeError: the run is already done.
            NonFiniteLossError: a loss became NaN/inf; the images keep their last good value.
        """
        if self.done:
            raise RuntimeError(f"{self.name}: run already done ({self.total_steps} steps)")
        t0 = time.perf_counter()
        rec = self._step()
        rec.seconds = time.perf_counter() - t0
        rec.step = self.step_index
        rec.total = self.total_steps
        self.step_index += 1
        self.history.append(rec)
        return rec

    @abc.abstractmethod
    def _step(self) -> StepRecord:
        """Method-specific work of one step (step/total/seconds are filled in by ``step``)."""

    @abc.abstractmethod
    def images(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Current synthetic set: images ``(N,3,H,W)`` float32 in [0, 1] on CPU, and labels
        ``(N,)`` int64 in the dataset's label space. Valid after any number of steps (before the
        first step: the initialisation, or an empty tensor if there is none yet)."""

    def views(self) -> dict[str, torch.Tensor]:
        """Intermediate tensors for viewers, all on CPU: ``"initial"`` ``(N,3,H,W)`` [0,1]
        images at the start of optimisation, ``"mask"`` ``(N,1,H,W)`` in [0,1] (update weight per
        pixel, 1 = free), ``"change"`` ``(N,H,W)`` mean absolute per-pixel change since the start
        in [0,1] pixel units. Methods include what they have."""
        return {}

    def export_extras(self) -> dict:
        """Method-specific results a saved run keeps beside its images and hard labels, for the
        method's own evaluation protocol: CPU tensors and JSON-serialisable plain values keyed by
        identifier names (:func:`nrrdd_core.export.save_run` ``extras=``; read back as
        ``Run.extras``). Default: none."""
        return {}

    def state_dict(self) -> dict:
        """Everything needed to resume exactly (tensors and plain types only)."""
        return {"name": self.name, "config": self.config.to_dict(), "step_index": self.step_index,
                "generator": self.generator.get_state(), "classes": list(self.classes),
                "ipc": self.ipc, "seed": self.seed,
                "history": [vars(r).copy() for r in self.history]}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state from :meth:`state_dict` of a run built with the same arguments."""
        if state.get("name") != self.name:
            raise ConfigError(f"state is for method {state.get('name')!r}, not {self.name!r}")
        self.step_index = int(state["step_index"])
        self.generator.set_state(state["generator"])
        self.history = [StepRecord(**r) for r in state.get("history", [])]

    def close(self) -> None:
        """Release hooks and large buffers. Safe to call twice."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- helpers for subclasses -------------------------------------------------------------
    def check_finite(self, losses: dict[str, torch.Tensor | float]) -> dict[str, float]:
        """Convert loss terms to floats, raising :class:`NonFiniteLossError` naming the step and
        term if any is NaN/inf."""
        out = {}
        for k, v in losses.items():
            f = float(v.detach()) if isinstance(v, torch.Tensor) else float(v)
            if not math.isfinite(f):
                # every method checks its losses before it changes the images, so the images of
                # the previous step are intact; only methods with a learning rate get that hint
                rates = [n for n in self.config.to_dict() if n == "lr" or n.startswith("lr_")]
                hint = f" (lower {' or '.join(rates)}?)" if rates else ""
                raise NonFiniteLossError(
                    f"{self.name}: loss term {k!r} is {f} at step {self.step_index}; "
                    f"the images of the last good step are kept{hint}",
                    step=self.step_index, term=k)
            out[k] = f
        return out

    def real_indices(self, c: int, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` random training-image indices of class ``c`` drawn with ``generator`` (default: the
        run's generator), without replacement; all of them when the class has fewer and ``n`` is
        larger.

        Raises:
            DataError: the class has no training images.
        """
        idx = self.dataset.train.indices_of(c)
        if len(idx) == 0:
            raise DataError(f"class {self.dataset.config.class_names[c]!r} has no training images")
        perm = torch.randperm(len(idx), generator=generator or self.generator)
        return idx[perm[: min(n, len(idx))]]

    def require_images(self, c: int, n: int) -> None:
        """Raise :class:`DataError` if class ``c`` has fewer than ``n`` training images."""
        have = int((self.dataset.train.y == c).sum())
        if have < n:
            raise DataError(f"class {self.dataset.config.class_names[c]!r} has {have} training "
                            f"images but {n} are needed (ipc={self.ipc}); lower ipc")


def run_distiller(d: Distiller, callback: Callable[[StepRecord], None] | None = None,
                  should_stop: Callable[[], bool] | None = None) -> Distiller:
    """Run ``d`` to the end, calling ``callback(record)`` after each step.

    Raises:
        StoppedError: ``should_stop()`` returned True (the distiller keeps its partial state).
    """
    while not d.done:
        if should_stop is not None and should_stop():
            raise StoppedError(f"{d.name} stopped at step {d.step_index}/{d.total_steps}")
        rec = d.step()
        if callback is not None:
            callback(rec)
    return d
