"""RDED: select and stitch realistic, teacher-easy real patches (METHODS.md §3) [code, RDED].

Per class ``c``: ``mipc`` real images, ``num_crops`` square RandomResizedCrop candidates each of
side ``H / factor``; ``score(p) = CE(T(pad_H(p)), c)``; each image keeps its lowest-score crop; the
class keeps the ``ipc * factor**2`` lowest; ``factor x factor`` grids are stitched (image ``j``
holds the patches ranked ``j, j+ipc, ...``). Unlike the released code the selection is seeded,
and exact score ties (common in float32 with a confident teacher) are broken deterministically:
by the teacher's logit margin (``tie_break="margin"``, default) or image order, optionally with
float64 scoring (``score_precision``); each step reports the number of ties.
Soft labels come later, from the teacher (METHODS.md §1.4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import StepRecord, register_method
from ..configs import param
from .common import (PatchSelectionConfig, PatchSelectionDistiller, crop_patches, float64_model,
                     patch_scores, rank, to01)


@dataclass(frozen=True)
class RDEDConfig(PatchSelectionConfig):
    """RDED's fields: candidate sampling (:class:`~nrrdd_core.methods.common.PatchSelectionConfig`)
    and how exact score ties are handled (METHODS.md §3, ties)."""

    score_precision: str = param("float32", "precision of the teacher when scoring patches "
                                 "(float64 separates most scores that are exactly 0.0 in float32; "
                                 "slower)", choices=("float32", "float64"),
                                 source="code (RDED synthesize/utils.py cross_entropy) / ours")
    tie_break: str = param("margin", "order of patches with exactly equal scores: the larger "
                           "teacher logit margin first, or image order (index)",
                           choices=("margin", "index"), source="ours")


@register_method("rded")
class RDED(PatchSelectionDistiller):
    """RDED as a step-wise :class:`~nrrdd_core.methods.base.Distiller` (METHODS.md §3).

    One step scores ``images_per_step`` real images of one class (a class with at most that many
    images is one step); the class's images are stitched on its last step. ``images()`` returns
    ``(len(classes)*ipc, 3, H, W)`` [0,1] images (classes not selected yet are black) and labels
    ordered class by class. Views: ``"initial"`` (= the images). Step records: losses ``"ce"``
    (mean best score of the chunk) and ``"zero_scores"`` (images of the chunk whose best score is
    exactly 0.0), info ``"ties"`` / ``"tie_at_cut"`` (:class:`PatchSelectionDistiller`).

    Raises (constructor): DataError (a class has fewer than ``ipc * factor**2`` real images),
    ConfigError (``mipc`` below that), TeacherMismatchError.
    """

    Config: ClassVar = RDEDConfig

    def __init__(self, config: RDEDConfig, **kwargs) -> None:
        super().__init__(config, **kwargs)
        self._model64: torch.nn.Module | None = None  # float64 teacher copy, made on first use

    @property
    def total_steps(self) -> int:
        return self.select_steps

    crop_01 = True  # crop [0,1] pixels, then normalise (the released order)

    def _rank_chunk(self, c, x01, boxes):
        n, m = boxes.shape[:2]
        cfg = self.config
        if cfg.score_precision == "float64" and self._model64 is None:
            self._model64 = float64_model(self.teacher)
        patches = self.teacher.data_config.normalize(crop_patches(x01, boxes, self.side))
        ce, margin = patch_scores(self.teacher, patches, c, cfg.score_precision, self._model64)
        ce, margin = ce.view(n, m), margin.view(n, m)
        use_margin = cfg.tie_break == "margin"
        best = rank(ce, margin if use_margin else None)[:, 0]
        rows = torch.arange(n)
        key = ce[rows, best]
        if use_margin:
            key = torch.stack([key, -margin[rows, best]], 1)
        losses = {"ce": float(ce[rows, best].mean()) if n else 0.0,
                  "zero_scores": float((ce[rows, best] == 0).sum())}
        return rows, boxes[rows, best], key, losses

    def _step(self) -> StepRecord:
        return self._select_step()

    def images(self) -> tuple[torch.Tensor, torch.Tensor]:
        return to01(self.teacher, self.x0), self.labels.clone()

    def views(self) -> dict[str, torch.Tensor]:
        return {"initial": to01(self.teacher, self.x0)}

    def state_dict(self) -> dict:
        return {**super().state_dict(), **self._selection_state()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._load_selection_state(state)
