"""NRR-DD: critical-based initial data discovery + non-critical region refinement (METHODS.md §4).

Phase ``"cidd"`` (METHODS.md §4.2) [paper]: for each real image of class ``c`` its CAM on the full image
(METHODS.md §4.1); RDED's candidate boxes; per image the ``top_t`` boxes by CAM ratio
``sum_box C / sum C``; those patches scored by the teacher's confidence (``confidence=
"true_class"``: ``softmax(T(pad_H(p)))_c``; ``"max_prob"``: ``max_k softmax(T(pad_H(p)))_k``, the
paper's "highest prediction probability"); the ``ipc * factor**2`` LOWEST-confidence (hardest)
patches (``select="highest"``: the most confident, paper appendix C) stitched as RDED into ``x~0``.

Phase ``"refine"`` (METHODS.md §4.3, Eq. 2-5): ``M = noncritical_mask(CAM(x~0), tau, mask_mode)``
(``max(0, tau - C)`` by default; critical pixels ``C >= tau`` frozen), computed once on ``x~0``
[ours] or every ``mask_recompute_every`` steps on the current images; Adam on
``L = CE(T(A(x~)), y) + alpha_bn * L_bn`` with ``M`` applied to the optimiser's UPDATE (Adam is
invariant to a per-pixel gradient scale), then clipping to the valid pixel range. With
``label_refine_weight > 0`` the loss adds the label-refinement term reconstructed from the paper's
words for Eq. 11-12 (METHODS.md §4.5): CutMix pairs of the refined images and ask the teacher's
prediction on the mixed image to concentrate on its two classes (:func:`label_refine_loss`). The
paper's code is not available; every [ours] choice is a field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

import torch.nn.functional as F

from ..augment import cutmix
from ..cam import get_cam, noncritical_mask
from ..configs import param
from ..diagnostics import RefineDiagnostics, diagnose
from ..models.teacher import Teacher
from ..errors import ConfigError
from .base import StepRecord, register_method
from .common import (CONFIDENCES, PatchSelectionConfig, PatchSelectionDistiller, RefineConfig,
                     Refiner, cidd_rank, cpu_copy, crop_patches, patch_log_confidence, slot_batches,
                     to01)

#: forms of the label-refinement term (METHODS.md §4.5)
LABEL_REFINE_FORMS = ("two_class", "mixed_ce")


def label_refine_loss(teacher, x_norm: torch.Tensor, y: torch.Tensor, generator: torch.Generator,
                      form: str = "two_class") -> tuple[torch.Tensor, dict[str, float]]:
    """NRR-DD's label-refinement term, reconstructed from the paper's words for Eq. 11-12
    (METHODS.md §4.5): the teacher's prediction on a mixed refined image should concentrate on the
    two classes mixed into it.

    CutMix (:func:`nrrdd_core.augment.cutmix`, ``lam ~ Beta(1,1)``, partner ``pi``) of the batch,
    ``p = softmax(T(x_mix))``; ``"two_class"``: ``mean(-log(p_y + p_{y_pi}))`` (``-log p_y`` when
    both images have the same class) [paper words]; ``"mixed_ce"``: the soft cross-entropy to
    ``lam' e_y + (1 - lam') e_{y_pi}`` with ``lam'`` the true pixel fraction [ours: also fixes the
    split between the two classes].

    Args:
        teacher: frozen teacher. x_norm: ``(B,3,H,W)`` normalised images (differentiable).
        y: ``(B,)`` int64 labels. generator: CPU generator (box, partner, lam).
        form: one of :data:`LABEL_REFINE_FORMS`.

    Returns:
        ``(loss, {"two_class_mass": mean p_y + p_{y_pi}})``; ``loss`` a differentiable scalar in nats.
    """
    x_mix, perm, lam, _ = cutmix(x_norm, generator)
    logp = F.log_softmax(teacher(x_mix).float(), 1)
    y2 = y[perm.to(y.device)]
    la, lb = logp.gather(1, y[:, None])[:, 0], logp.gather(1, y2[:, None])[:, 0]
    mass = torch.where(y == y2, la, torch.logaddexp(la, lb))
    if form == "two_class":
        loss = -mass.mean()
    else:
        loss = -(lam * la + (1.0 - lam) * lb).mean()
    return loss, {"two_class_mass": float(mass.detach().exp().mean())}


@dataclass(frozen=True)
class NRRDDConfig(RefineConfig, PatchSelectionConfig):
    """NRR-DD fields: candidate sampling (:class:`PatchSelectionConfig`), Adam refinement
    (:class:`RefineConfig`, with NRR's lr and iterations), and CIDD / mask choices."""

    iterations: int = param(2000, "refinement iterations (one step each)", unit="steps", lo=1,
                            source="paper (appendix A.1)")
    lr: float = param(0.05, "Adam learning rate of the refinement (cosine decay to 0)", unit="1",
                      lo=0.0, lo_open=True, source="paper (appendix A.1)")
    alpha_bn: float = param(0.01, "weight of the BN-statistics loss in L_C", unit="1", lo=0.0,
                            source="ours (SRe2L value)")
    top_t: int = param(1, "t: candidate boxes kept per real image by CAM ratio", unit="boxes",
                       lo=1, source="ours")
    select: str = param("lowest", "keep the lowest-confidence (hardest) or highest-confidence "
                        "patches", choices=("lowest", "highest"), source="paper (appendix C)")
    confidence: str = param("max_prob", "CIDD confidence of a patch: its highest probability over "
                            "all classes (max_prob, the paper's wording) or the teacher's "
                            "probability of its own class (true_class)", choices=CONFIDENCES,
                            source="paper (CIDD: 'the highest prediction probability'; "
                            "docs/RESULTS.md) / ours (true_class)")
    label_refine_weight: float = param(0.0, "weight of the label-refinement term: the teacher's "
                                       "prediction on a CutMix of two refined images should "
                                       "concentrate on their two classes (0 = off)", unit="1",
                                       lo=0.0, source="paper (Eq. 11-12, reconstructed from the "
                                       "text)")
    label_refine_form: str = param("two_class", "label-refinement term: -log(p_a + p_b) "
                                   "(two_class) or CE to the mixed label (mixed_ce)",
                                   choices=LABEL_REFINE_FORMS,
                                   source="paper (Eq. 11-12 text) / ours (mixed_ce)")
    cam_method: str = param("cam", "CAM used for selection and the mask (cam = Zhou et al., "
                            "gradcam_torch = batched Grad-CAM)", choices=("cam", "gradcam_torch"),
                            source="paper (CAM)")
    tau: float = param(0.5, "CAM threshold: pixels with C >= tau are critical and frozen",
                       unit="1", lo=0.0, hi=1.0, source="paper (sensitivity table)")
    mask_mode: str = param("soft", "mask form: soft max(0, tau-C), binary 1[C<tau], scaled "
                           "max(0, tau-C)/tau", choices=("soft", "binary", "scaled"),
                           source="paper (Eq. 4) / ours")
    mask_recompute_every: int = param(0, "recompute the mask on the current images every k "
                                      "refinement steps (0 = once, on x~0)", unit="steps",
                                      lo=0, source="ours")

    def validate(self) -> None:
        super().validate()
        if self.top_t > self.num_crops:
            raise ConfigError(f"top_t={self.top_t} is larger than num_crops={self.num_crops}")


@register_method("nrrdd")
class NRRDD(PatchSelectionDistiller):
    """NRR-DD as a step-wise :class:`~nrrdd_core.methods.base.Distiller` (METHODS.md §4).

    Steps: ``select_steps`` CIDD steps (``images_per_step`` real images of one class each; the
    mask is computed at the end of the last one), then ``iterations`` refinement steps per batch
    (default one batch of all images). ``images()``: ``(len(classes)*ipc, 3, H, W)`` [0,1]
    images, labels ordered class by class. Views: ``"initial"`` (``x~0`` in [0,1]), and once
    CIDD is done ``"mask"`` ``(N,1,H,W)`` (current update weights), ``"cam"`` ``(N,H,W)`` (CAM of
    ``x~0``), ``"change"`` ``(N,H,W)`` (mean over channels of ``|x - x~0|`` in [0,1] pixels).
    :meth:`diagnostics`: per-image teacher / independent-model agreement before and after
    refinement, pixel change and frozen share (METHODS.md §4.6); the independent model is the
    constructor's ``independent=`` (optional).

    Raises (constructor): DataError (a class has fewer real images than ``ipc * factor**2``
    candidates need), ConfigError, TeacherMismatchError. ``step`` raises NonFiniteLossError
    (images keep their last good value).
    """

    Config: ClassVar = NRRDDConfig

    def __init__(self, config: NRRDDConfig, independent: Teacher | None = None, **kwargs) -> None:
        super().__init__(config, **kwargs)
        self.refiner: Refiner | None = None
        self.cam0: torch.Tensor | None = None
        self.independent = independent

    def diagnostics(self, independent: Teacher | None = None) -> RefineDiagnostics:
        """Per-image refinement diagnostics of the current images against ``x~0``
        (:func:`nrrdd_core.diagnostics.diagnose`, METHODS.md §4.6): teacher and independent-model
        probability of the label and agreement before / after, mean and max pixel change, share
        of frozen pixels (mask == 0).

        Args:
            independent: a second model trained on the same data; default: the one given to the
                constructor (``independent=``), or none.

        Call between steps, in the thread that runs them (the teacher's BN hooks run).
        """
        x, y = self.images()
        mask = self.refiner.mask if self.refiner is not None else None
        ind = independent if independent is not None else self.independent
        return diagnose(self.teacher, to01(self.teacher, self.x0), x, y, ind, mask)

    @property
    def per_image(self) -> int:
        return self.config.top_t

    @property
    def total_steps(self) -> int:
        batches = len(slot_batches(len(self.classes), self.ipc, self.config.batch_size))
        return self.select_steps + batches * self.config.iterations

    def _cam(self, x_norm: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return get_cam(self.config.cam_method)(self.teacher).attribute(x_norm, targets.to(self.device))

    def _mask(self, x_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cam = self._cam(x_norm, self.labels)
        return cam, noncritical_mask(cam, self.config.tau, self.config.mask_mode).to(self.device)

    def _rank_chunk(self, c, x_norm, boxes):
        n = len(boxes)
        t = self.config.top_t
        cam = self._cam(x_norm, torch.full((n,), c, dtype=torch.long)).float().cpu()
        top = cidd_rank(cam, boxes)[1][:, :t]
        kept = torch.gather(boxes, 1, top.unsqueeze(-1).expand(n, t, 4))
        logc = patch_log_confidence(self.teacher, crop_patches(x_norm, kept, self.side), c,
                                    self.config.confidence)
        key = logc if self.config.select == "lowest" else -logc
        losses = {"confidence": float(torch.exp(logc).mean())} if n else {}
        return torch.arange(n).repeat_interleave(t), kept.reshape(n * t, 4), key, losses

    def _new_refiner(self, mask: torch.Tensor | None) -> Refiner:
        cfg = self.config
        extra = None
        if cfg.label_refine_weight > 0:
            def extra(x, y, g):
                loss, terms = label_refine_loss(self.teacher, x, y, g, cfg.label_refine_form)
                return cfg.label_refine_weight * loss, {"label_refine": loss, **terms}
        return Refiner(self.teacher, self.x0, self.labels.to(self.device), cfg, cfg.alpha_bn,
                       slot_batches(len(self.classes), self.ipc, cfg.batch_size), mask,
                       extra_loss=extra)

    def _start_refine(self) -> None:
        self.cam0, mask = self._mask(self.x0)
        self.refiner = self._new_refiner(mask)

    def _step(self) -> StepRecord:
        if self.step_index < self.select_steps:
            rec = self._select_step()
            rec.phase = "cidd"
            if self.step_index == self.select_steps - 1:
                self._start_refine()
            return rec
        i = self.step_index - self.select_steps
        k = self.config.mask_recompute_every
        if k > 0 and i > 0 and i % k == 0:
            self.refiner.mask = self._mask(self.refiner.x)[1]
        losses, info = self.refiner.step(i, self.generator, self.check_finite)
        return StepRecord(0, 0, "refine", losses, info=info)

    def images(self) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.refiner.x if self.refiner is not None else self.x0
        return to01(self.teacher, x), self.labels.clone()

    def views(self) -> dict[str, torch.Tensor]:
        init = to01(self.teacher, self.x0)
        out = {"initial": init}
        if self.refiner is not None:
            out["mask"] = self.refiner.mask.detach().float().cpu()
            out["cam"] = self.cam0.float().cpu()
            out["change"] = (to01(self.teacher, self.refiner.x) - init).abs().mean(1)
        return out

    def state_dict(self) -> dict:
        state = {**super().state_dict(), **self._selection_state(), "cam0": cpu_copy(self.cam0)}
        if self.refiner is not None:
            state["refiner"] = self.refiner.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._load_selection_state(state)
        self.close()
        self.refiner = None
        self.cam0 = state["cam0"].to(self.device) if state.get("cam0") is not None else None
        if "refiner" in state:
            self.refiner = self._new_refiner(None)
            self.refiner.load_state_dict(state["refiner"])

    def close(self) -> None:
        if self.refiner is not None:
            self.refiner.close()
