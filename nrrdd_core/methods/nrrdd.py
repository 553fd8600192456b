"""NRR-DD: critical-based initial data discovery + non-critical region refinement (METHODS.md §4).

Phase ``"cidd"`` (METHODS.md §4.2) [paper]: for each real image of class ``c`` its CAM on the full image
(METHODS.md §4.1); RDED's candidate boxes; per image the ``top_t`` boxes by CAM ratio
``sum_box C / sum C``; those patches scored by the teacher's confidence ``softmax(T(pad_H(p)))_c``;
the ``ipc * factor**2`` LOWEST-confidence (hardest) patches (``select="highest"``: the most
confident, paper appendix C) stitched as RDED into ``x~0``.

Phase ``"refine"`` (METHODS.md §4.3, Eq. 2-5): ``M = noncritical_mask(CAM(x~0), tau, mask_mode)``
(``max(0, tau - C)`` by default; critical pixels ``C >= tau`` frozen), computed once on ``x~0``
[ours] or every ``mask_recompute_every`` steps on the current images; Adam on
``L = CE(T(A(x~)), y) + alpha_bn * L_bn`` with ``M`` applied to the optimiser's UPDATE (Adam is
invariant to a per-pixel gradient scale), then clipping to the valid pixel range. The paper's
code is not available; every [ours] choice is a field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..cam import cam_ratio, noncritical_mask, teacher_cam
from ..configs import param
from ..errors import ConfigError
from .base import StepRecord, register_method
from .common import (PatchSelectionConfig, PatchSelectionDistiller, RefineConfig, Refiner,
                     cpu_copy, crop_patches, patch_cross_entropy, slot_batches, to01)


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

    Raises (constructor): DataError (a class has fewer real images than ``ipc * factor**2``
    candidates need), ConfigError, TeacherMismatchError. ``step`` raises NonFiniteLossError
    (images keep their last good value).
    """

    Config: ClassVar = NRRDDConfig

    def __init__(self, config: NRRDDConfig, **kwargs) -> None:
        super().__init__(config, **kwargs)
        self.refiner: Refiner | None = None
        self.cam0: torch.Tensor | None = None

    @property
    def per_image(self) -> int:
        return self.config.top_t

    @property
    def total_steps(self) -> int:
        batches = len(slot_batches(len(self.classes), self.ipc, self.config.batch_size))
        return self.select_steps + batches * self.config.iterations

    def _cam(self, x_norm: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return teacher_cam(self.teacher, x_norm, targets.to(self.device),
                           method=self.config.cam_method).detach()

    def _mask(self, x_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cam = self._cam(x_norm, self.labels)
        return cam, noncritical_mask(cam, self.config.tau, self.config.mask_mode).to(self.device)

    def _rank_chunk(self, c, x_norm, boxes):
        n, m = boxes.shape[:2]
        t = self.config.top_t
        cam = self._cam(x_norm, torch.full((n,), c, dtype=torch.long)).float().cpu()
        ratio = torch.stack([cam_ratio(cam[a], boxes[a]) for a in range(n)]) if n else \
            torch.zeros(0, m)
        top = torch.sort(ratio, dim=1, descending=True, stable=True).indices[:, :t]
        kept = torch.gather(boxes, 1, top.unsqueeze(-1).expand(n, t, 4))
        ce = patch_cross_entropy(self.teacher, crop_patches(x_norm, kept, self.side), c)
        key = -ce if self.config.select == "lowest" else ce
        losses = {"ce": float(ce.mean()), "confidence": float(torch.exp(-ce).mean())} if n else {}
        return torch.arange(n).repeat_interleave(t), kept.reshape(n * t, 4), key, losses

    def _start_refine(self) -> None:
        self.cam0, mask = self._mask(self.x0)
        cfg = self.config
        self.refiner = Refiner(self.teacher, self.x0, self.labels.to(self.device), cfg,
                               cfg.alpha_bn, slot_batches(len(self.classes), self.ipc,
                                                          cfg.batch_size), mask)

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
            self.refiner = Refiner(self.teacher, self.x0, self.labels.to(self.device), self.config,
                                   self.config.alpha_bn, slot_batches(
                                       len(self.classes), self.ipc, self.config.batch_size))
            self.refiner.load_state_dict(state["refiner"])

    def close(self) -> None:
        if self.refiner is not None:
            self.refiner.close()
