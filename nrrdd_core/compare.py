"""Compare distillation methods on one setup: the one implementation behind the app's Compare
page (``studio.runners.compare``) and the accuracy bench (``bench/accuracy.py``).

Policy (METHODS.md §1.4, §5.6): every method distils the same classes with the same teacher,
IPC and seed (each from its config defaults plus the given overrides); the random real subset of
the same size (``"random"``, first) is the baseline; every set is evaluated with the SAME
student protocol (``eval_cfg``, the KD protocol by default) so the numbers are comparable, and
a method that has its own protocol (EDF: METHODS.md §5.6, using the run's learned labels and lr)
is also evaluated with it when ``own_protocol`` is set.

Example::

    res = compare_methods(["rded", "nrrdd"], teacher, bundle, classes=[0, 1], ipc=1, seed=0,
                          eval_cfg=EvalConfig(epochs=30), device="cpu")
    {name: r.evals["kd"].final_acc for name, r in res.items()}
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .data.base import DatasetBundle
from .evaluate import EvalConfig, EvalResult, evaluate_student, random_real_subset
from .methods import make_distiller, run_distiller
from .models.teacher import Teacher

log = logging.getLogger(__name__)

RANDOM = "random"
"""Name of the random-real-subset baseline in the results."""

OWN_PROTOCOL = {"edf": "edf"}
"""Methods evaluated with a protocol of their own as well (method -> ``EvalConfig.protocol``)."""


@dataclass
class DistilledSet:
    """What a distillation gives the comparison.

    Attributes:
        images01: ``(N,3,S,S)`` float in [0,1] on the CPU. labels: ``(N,)`` int64.
        seconds: distillation wall time (0 for the random subset). steps: steps run.
        extras: ``Distiller.export_extras()`` (EDF's learned labels, lr...), for the own protocol.
        info: anything else the caller's distil function records (manifest, diagnostics...).
    """

    images01: torch.Tensor
    labels: torch.Tensor
    seconds: float = 0.0
    steps: int = 0
    extras: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)


@dataclass
class SetResult:
    """One compared set: its :class:`DistilledSet` and its evaluations by protocol
    (``"kd"``, and ``"edf"`` for EDF with ``own_protocol``)."""

    name: str
    distilled: DistilledSet
    evals: dict[str, EvalResult] = field(default_factory=dict)
    reused: bool = False


def distill_set(method: str, config: dict, teacher: Teacher, bundle: DatasetBundle,
                classes: Sequence[int], ipc: int, seed: int,
                device: str | torch.device = "auto") -> DistilledSet:
    """Run ``method`` to completion with ``config`` (overrides of its defaults)."""
    t0 = time.perf_counter()
    with make_distiller(method, config, teacher=teacher, dataset=bundle, classes=list(classes),
                        ipc=ipc, device=device, seed=seed) as d:
        run_distiller(d)
        x, y = d.images()
        return DistilledSet(x, y, time.perf_counter() - t0, d.step_index, d.export_extras(),
                            {"config": d.config.to_dict()})


def compare_methods(methods: Sequence[str], teacher: Teacher, bundle: DatasetBundle,
                    classes: Sequence[int], ipc: int, seed: int, eval_cfg: EvalConfig,
                    device: str | torch.device = "auto", *, configs: dict[str, dict] | None = None,
                    own_protocol: bool = True,
                    distill: Callable[[str, dict], DistilledSet | None] | None = None,
                    cached: Callable[[str], SetResult | None] | None = None,
                    on_result: Callable[[SetResult], None] | None = None,
                    should_stop: Callable[[], bool] | None = None,
                    progress: Callable[[str, str], None] | None = None) -> dict[str, SetResult]:
    """Distil ``classes`` with each method and evaluate every set the same way (module policy).

    Args:
        methods: registered method names (in the order to run them).
        teacher, bundle, classes, ipc, seed, device: the shared setup.
        eval_cfg: the student evaluation every set gets (its ``protocol``, normally ``"kd"``).
        configs: per-method config overrides (default: each method's defaults).
        own_protocol: also evaluate a method of :data:`OWN_PROTOCOL` with its own protocol (same
            epochs as ``eval_cfg``), using its extras.
        distill: ``distill(method, config) -> DistilledSet`` (default :func:`distill_set`); a
            return of None (stopped) ends the comparison.
        cached: ``cached(name)`` gives a result computed before (reused as is, ``reused=True``).
        on_result: called with each new or reused result as soon as it is there.
        should_stop: polled before each set and inside the evaluations.
        progress: ``progress(name, stage)`` with stage ``"distil"`` or ``"evaluate"``.

    Returns:
        ``{name: SetResult}``, :data:`RANDOM` first, in order; fewer when stopped.
    """
    configs = configs or {}
    distill = distill or (lambda m, c: distill_set(m, c, teacher, bundle, classes, ipc, seed, device))
    out: dict[str, SetResult] = {}
    for name in [RANDOM, *methods]:
        prev = cached(name) if cached is not None else None
        if prev is not None:
            prev.reused = True
            out[name] = prev
            if on_result is not None:
                on_result(prev)
            continue
        if should_stop is not None and should_stop():
            break
        if progress is not None:
            progress(name, "distil")
        if name == RANDOM:
            x, y = random_real_subset(bundle, classes, ipc, seed=seed)
            dset = DistilledSet(x, y)
        else:
            dset = distill(name, dict(configs.get(name, {})))
            if dset is None:
                break
        if progress is not None:
            progress(name, "evaluate")
        res = SetResult(name, dset)
        protocols = [eval_cfg]
        if own_protocol and name in OWN_PROTOCOL and OWN_PROTOCOL[name] != eval_cfg.protocol:
            protocols.append(eval_cfg.replace(protocol=OWN_PROTOCOL[name]))
        for cfg in protocols:
            res.evals[cfg.protocol] = evaluate_student(
                dset.images01, dset.labels, teacher, bundle, cfg, device=device, seed=seed,
                should_stop=should_stop, classes=list(classes),
                extras=dset.extras if cfg.protocol != "kd" else None)
        log.info("compare %s: %s", name, {p: r.final_acc for p, r in res.evals.items()})
        out[name] = res
        if on_result is not None:
            on_result(res)
    return out
