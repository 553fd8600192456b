"""Refinement diagnostics: does refinement add class features, or only fool the teacher?
(METHODS.md §4.6)

Image refinement with the teacher's cross-entropy (NRR-DD's NRR, SRe2L's recover) can raise the
teacher's probability of the label with a tiny, structured perturbation that no other network
sees: an adversarial example, not a better training image. Measured with the public ResNet-20 on
original CIFAR-10 pixels: patches the teacher assigns to another class flip to a true-class
probability of 1.000 within 25 iterations at a mean pixel change of 0.010 (2.6/255).

:func:`diagnose` compares a set before (``x0``) and after (``x``) refinement, per image:

- the teacher's probability of the label and whether its top-1 class is the label (agreement),
  before and after;
- the same for an *independent* model, a second network trained on the same data that refinement
  never saw (:func:`independent_model` trains a small ConvNet-BN; any second teacher works): a
  real class feature moves both, a perturbation that fools the teacher moves only the teacher;
- the mean and max absolute pixel change (in [0,1] pixels, over channels and pixels);
- the share of frozen pixels (update weight 0, the critical region of METHODS.md §4.3).

:meth:`RefineDiagnostics.warning` turns the summary into a one-line warning when refinement looks
adversarial (thresholds in :data:`WARN`, ours).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .data import DatasetBundle
from .errors import DataError
from .models.teacher import Teacher

log = logging.getLogger(__name__)

#: Thresholds of :func:`fooling_warning` [ours]: teacher agreement must rise by at least
#: ``teacher_gain`` (fraction of images); the independent model's rise counts as "flat" below
#: ``independent_share`` x the teacher's rise; a mean pixel change below ``tiny_change`` ([0,1]
#: pixels, 4/255) is "tiny"; without an independent model a mean teacher-probability rise of
#: ``prob_gain`` at a tiny change warns.
WARN = {"teacher_gain": 0.1, "independent_share": 0.25, "tiny_change": 4 / 255, "prob_gain": 0.3}

#: Recipe of :func:`independent_model` [ours]: small and quick, a different seed and width from any
#: teacher, trained on the same training split.
INDEPENDENT_RECIPE = {"arch": "convnet_bn", "width": 32, "epochs": 3, "seed": 1}


@dataclass
class RefineDiagnostics:
    """Per-image diagnostics of one set (all tensors on the CPU, ``N`` = number of images).

    Attributes:
        labels: int64 ``(N,)``.
        teacher_prob_before, teacher_prob_after: float ``(N,)`` in [0,1], teacher's softmax
            probability of the label on ``x0`` / ``x``.
        teacher_agree_before, teacher_agree_after: bool ``(N,)``, teacher top-1 == label.
        independent_prob_before, independent_prob_after, independent_agree_before,
            independent_agree_after: the same for the independent model, or None without one.
        change_mean, change_max: float ``(N,)``, mean / max of ``|x - x0|`` over channels and
            pixels, in [0,1] pixel units.
        frozen_share: float ``(N,)`` in [0,1], share of pixels whose update weight is 0, or None
            without a mask.
        independent_name: how the independent model was described ("" without one).
    """

    labels: torch.Tensor
    teacher_prob_before: torch.Tensor
    teacher_prob_after: torch.Tensor
    teacher_agree_before: torch.Tensor
    teacher_agree_after: torch.Tensor
    change_mean: torch.Tensor
    change_max: torch.Tensor
    independent_prob_before: torch.Tensor | None = None
    independent_prob_after: torch.Tensor | None = None
    independent_agree_before: torch.Tensor | None = None
    independent_agree_after: torch.Tensor | None = None
    frozen_share: torch.Tensor | None = None
    independent_name: str = ""

    @property
    def has_independent(self) -> bool:
        return self.independent_prob_before is not None

    def summary(self) -> dict[str, float]:
        """Means over images: ``teacher_prob_before/after``, ``teacher_agree_before/after``
        (fractions in [0,1]), the same with ``independent_`` when present, ``change_mean``
        (mean of the per-image means), ``change_max`` (max over images), ``frozen_share``."""
        m = lambda t: float(t.float().mean()) if t is not None and len(t) else float("nan")  # noqa: E731
        out = {"images": float(len(self.labels)),
               "teacher_prob_before": m(self.teacher_prob_before),
               "teacher_prob_after": m(self.teacher_prob_after),
               "teacher_agree_before": m(self.teacher_agree_before),
               "teacher_agree_after": m(self.teacher_agree_after),
               "change_mean": m(self.change_mean),
               "change_max": float(self.change_max.max()) if len(self.change_max) else float("nan")}
        if self.has_independent:
            out.update(independent_prob_before=m(self.independent_prob_before),
                       independent_prob_after=m(self.independent_prob_after),
                       independent_agree_before=m(self.independent_agree_before),
                       independent_agree_after=m(self.independent_agree_after))
        if self.frozen_share is not None:
            out["frozen_share"] = m(self.frozen_share)
        return out

    def warning(self) -> str | None:
        """:func:`fooling_warning` of :meth:`summary`."""
        return fooling_warning(self.summary())

    def rows(self, class_names: list[str] | None = None) -> list[dict]:
        """One dict per image for a table: class, teacher / independent probability and agreement
        before -> after, mean and max change (in /255 units), frozen share."""
        out = []
        for i, y in enumerate(self.labels.tolist()):
            r = {"image": i, "class": class_names[y] if class_names else y,
                 "teacher p(y) before": float(self.teacher_prob_before[i]),
                 "teacher p(y) after": float(self.teacher_prob_after[i]),
                 "teacher agrees before": bool(self.teacher_agree_before[i]),
                 "teacher agrees after": bool(self.teacher_agree_after[i])}
            if self.has_independent:
                r.update({"independent p(y) before": float(self.independent_prob_before[i]),
                          "independent p(y) after": float(self.independent_prob_after[i]),
                          "independent agrees before": bool(self.independent_agree_before[i]),
                          "independent agrees after": bool(self.independent_agree_after[i])})
            r.update({"mean change /255": 255 * float(self.change_mean[i]),
                      "max change /255": 255 * float(self.change_max[i])})
            if self.frozen_share is not None:
                r["frozen share"] = float(self.frozen_share[i])
            out.append(r)
        return out


def fooling_warning(summary: dict[str, float], thresholds: dict | None = None) -> str | None:
    """A one-line warning when refinement looks like it fools the teacher rather than adding class
    features, else None (thresholds: :data:`WARN`, ours).

    With an independent model: the teacher's agreement rose by at least ``teacher_gain`` while
    the independent model's rose by less than ``independent_share`` of that. Without one: the
    teacher's mean probability of the label rose by at least ``prob_gain`` at a mean pixel change
    below ``tiny_change``.

    Args:
        summary: :meth:`RefineDiagnostics.summary`.
        thresholds: overrides of :data:`WARN`.
    """
    w = {**WARN, **(thresholds or {})}
    t_gain = summary["teacher_agree_after"] - summary["teacher_agree_before"]
    change = summary["change_mean"]
    if "independent_agree_after" in summary:
        i_gain = summary["independent_agree_after"] - summary["independent_agree_before"]
        if t_gain >= w["teacher_gain"] and i_gain < w["independent_share"] * t_gain:
            return (f"Refinement may be fooling the teacher: its agreement with the labels rose "
                    f"{100 * t_gain:+.0f} points but the independent model's only "
                    f"{100 * i_gain:+.0f} (mean pixel change {255 * change:.1f}/255). Fewer "
                    "iterations or a lower learning rate change the images less; judge them by "
                    "the independent model.")
        return None
    p_gain = summary["teacher_prob_after"] - summary["teacher_prob_before"]
    if p_gain >= w["prob_gain"] and change < w["tiny_change"]:
        return (f"Refinement may be fooling the teacher: its probability of the labels rose "
                f"{p_gain:+.2f} at a mean pixel change of only {255 * change:.1f}/255. Check with an "
                "independent model.")
    return None


@torch.no_grad()
def _probs(model: Teacher, x01: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    p = model.predict01(x01).float()
    return p.gather(1, labels[:, None])[:, 0], p.argmax(1) == labels


@torch.no_grad()
def diagnose(teacher: Teacher, x0_01: torch.Tensor, x01: torch.Tensor, labels: torch.Tensor,
             independent: Teacher | None = None, mask: torch.Tensor | None = None,
             independent_name: str = "") -> RefineDiagnostics:
    """Per-image diagnostics of a set before and after refinement (module docstring).

    Args:
        teacher: the teacher that refinement optimised against (eval mode).
        x0_01: images before refinement ``(N,3,H,W)`` in [0,1] (pass ``x01`` for an unrefined set).
        x01: images after refinement ``(N,3,H,W)`` in [0,1].
        labels: int64 ``(N,)`` in the teacher's label space.
        independent: a second model trained on the same data, same classes (its own data config
            normalises the images), or None.
        mask: update weights ``(N,1,H,W)`` (0 = frozen), or None.
        independent_name: a description kept in the result.

    Returns:
        :class:`RefineDiagnostics`.

    Raises:
        DataError: shapes disagree.
        TeacherMismatchError: the independent model's classes differ from the teacher's.

    Call it between refinement steps, in the thread that runs them: the forward passes run the
    teacher's hooks (BN statistics of the refinement loss are overwritten by the next step).
    """
    x0_01, x01 = x0_01.detach().float().cpu(), x01.detach().float().cpu()
    labels = labels.detach().cpu().long()
    if x0_01.shape != x01.shape or x01.ndim != 4 or len(labels) != len(x01):
        raise DataError(f"need x0 and x of the same shape (N,3,H,W) and N labels; got "
                        f"{tuple(x0_01.shape)}, {tuple(x01.shape)} and {tuple(labels.shape)}")
    n = len(labels)
    both, both_labels = torch.cat([x0_01, x01]), torch.cat([labels, labels])
    p, a = _probs(teacher, both, both_labels)  # before and after in one forward per model
    tb, ta, ab, aa = p[:n], p[n:], a[:n], a[n:]
    diff = (x01 - x0_01).abs()
    d = RefineDiagnostics(labels, tb, ta, ab, aa, diff.mean((1, 2, 3)), diff.flatten(1).amax(1)
                          if len(diff) else torch.zeros(0), independent_name=independent_name)
    if independent is not None:
        independent.check_compatible(teacher.data_config)
        p, a = _probs(independent, both, both_labels)
        d.independent_prob_before, d.independent_prob_after = p[:n], p[n:]
        d.independent_agree_before, d.independent_agree_after = a[:n], a[n:]
    if mask is not None:
        d.frozen_share = (mask.detach().float().cpu() == 0).flatten(1).float().mean(1)
    return d


def independent_model(bundle: DatasetBundle, device: str | torch.device = "auto",
                      recipe: dict | None = None) -> Teacher:
    """A small second network trained on ``bundle``'s training split, for :func:`diagnose`
    (``train_teacher`` with :data:`INDEPENDENT_RECIPE`; cached on disk, so only the first call
    trains: seconds on the built-in dataset, about a minute on 20,000 CIFAR images on 2 CPU cores).

    Raises:
        DataError: the training split is empty.
    """
    from .models import TeacherTrainConfig, train_teacher

    cfg = TeacherTrainConfig.from_dict({**INDEPENDENT_RECIPE, **(recipe or {})})
    log.info("independent model for the diagnostics: %s", cfg.to_dict())
    return train_teacher(cfg, bundle, device=device)
