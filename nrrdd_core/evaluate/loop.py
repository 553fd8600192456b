"""The skeleton every student-evaluation protocol shares (KD METHODS.md §1.4, EDF METHODS.md §5.6):
checks of the distilled set, the real test split restricted to the distilled classes, the epoch
loop (stop polling, timing, tested epochs, progress) and the :class:`EvalResult`. A protocol
(:mod:`.kd`, :mod:`.edf`) supplies only its student, optimiser and one training epoch.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..data.base import DatasetBundle, ImageSplit
from ..errors import DataError, StoppedError

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, dict], None]


@dataclass
class EvalResult:
    """Outcome of a student evaluation.

    Attributes:
        final_acc: top-1 in [0, 1] after the last epoch.
        best_acc: best top-1 in [0, 1] over the evaluated epochs (:func:`eval_epochs`).
        history: one dict per epoch: ``epoch`` (1-based), ``loss``, ``lr``, ``seconds``, the loss
            terms, and ``acc`` on evaluated epochs.
        seconds: wall time of the whole evaluation.
        n_test: number of real test images used.
        label_bytes: :func:`~nrrdd_core.labels.label_storage_bytes` of the stored labels (all
            zero when labels were computed online; empty for the EDF protocol).
        config: the settings as a dict, with the ``epochs``, ``seed`` and ``batch_size`` used.
    """

    final_acc: float
    best_acc: float
    history: list[dict]
    seconds: float
    n_test: int
    label_bytes: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def eval_epochs(epochs: int, every: int = 0) -> list[int]:
    """0-based epochs after which the student is tested.

    ``every = 0``: METHODS.md §1.4, epochs ``e`` with ``e % 10 == 9 and e > 0.8E``; when that gives
    fewer than two, every epoch in the last 20 % (``e + 1 > 0.8E``). ``every = k``: every k-th
    epoch. The last epoch is always included.
    """
    if every:
        out = {e for e in range(epochs) if e % every == every - 1}
    else:
        out = {e for e in range(epochs) if e % 10 == 9 and e > 0.8 * epochs}
        if len(out) < 2:
            out = {e for e in range(epochs) if e + 1 > 0.8 * epochs}
    return sorted(out | {epochs - 1})


def check_distilled_set(images01: torch.Tensor, labels: torch.Tensor, image_size: int,
                        expects: str = "the teacher") -> torch.Tensor:
    """Check a distilled set's shapes; returns the labels as int64 on the CPU.

    Args:
        images01: ``(N,3,S,S)`` images, N >= 1. labels: ``(N,)`` class indices.
        image_size: the side ``S`` the protocol's model takes. expects: who, for the message.

    Raises:
        DataError: empty set, counts that differ, or the wrong image shape.
    """
    if images01.ndim != 4 or len(images01) == 0 or len(images01) != len(labels):
        raise DataError(f"need images (N,3,S,S) with N >= 1 and N labels; got "
                        f"{tuple(images01.shape)} and {tuple(labels.shape)}")
    if tuple(images01.shape[1:]) != (3, image_size, image_size):
        raise DataError(f"images are {tuple(images01.shape[1:])} but {expects} expects "
                        f"(3, {image_size}, {image_size})")
    return labels.detach().cpu().long()


def distilled_test_split(bundle: DatasetBundle, labels: torch.Tensor,
                         classes: Sequence[int | str] | None = None
                         ) -> tuple[list[int], ImageSplit]:
    """The distilled classes (``classes``, default those in ``labels``) and the real test images
    of those classes.

    Raises:
        DataError: unknown class, or no test image of those classes.
    """
    cls = sorted(set(labels.tolist())) if classes is None else bundle.resolve_classes(classes)
    keep = torch.isin(bundle.test.y, torch.tensor(cls, dtype=torch.long))
    if not bool(keep.any()):
        raise DataError(f"dataset {bundle.config.name} has no test images of classes {cls}")
    return cls, ImageSplit(bundle.test.x[keep], bundle.test.y[keep])


def run_epochs(epochs: int, train_epoch: Callable[[int], dict], test: Callable[[], float],
               tested: set[int], progress: ProgressFn | None = None,
               should_stop: Callable[[], bool] | None = None,
               what: str = "student training") -> list[dict]:
    """The epoch loop: ``should_stop`` polled before each epoch, ``train_epoch(epoch)`` (0-based;
    returns the epoch's ``loss``, ``lr`` and terms), ``test()`` after the epochs in ``tested``,
    wall time, a log line and ``progress(epoch + 1, epochs, record)``.

    Returns:
        the history: ``{"epoch" (1-based), **train_epoch(...), ["acc"], "seconds"}`` per epoch.

    Raises:
        StoppedError: ``should_stop()`` returned True (names the epoch).
    """
    history: list[dict] = []
    for epoch in range(epochs):
        if should_stop is not None and should_stop():
            raise StoppedError(f"{what} stopped in epoch {epoch + 1}/{epochs}")
        te = time.perf_counter()
        rec = {"epoch": epoch + 1, **train_epoch(epoch)}
        if epoch in tested:
            rec["acc"] = test()
        rec["seconds"] = time.perf_counter() - te
        history.append(rec)
        log.info("%s epoch %d/%d %s", what, epoch + 1, epochs, rec)
        if progress is not None:
            progress(epoch + 1, epochs, rec)
    return history


def make_result(history: list[dict], t0: float, n_test: int, config: dict,
                label_bytes: dict | None = None) -> EvalResult:
    """:class:`EvalResult` of a finished loop (``t0``: ``time.perf_counter()`` at the start)."""
    accs = [r["acc"] for r in history if "acc" in r]
    return EvalResult(final_acc=accs[-1], best_acc=max(accs), history=history,
                      seconds=time.perf_counter() - t0, n_test=n_test,
                      label_bytes=label_bytes or {}, config=config)
