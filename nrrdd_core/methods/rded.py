"""RDED: select and stitch realistic, teacher-easy real patches (METHODS.md §3) [code, RDED].

Per class ``c``: ``mipc`` real images, ``num_crops`` square RandomResizedCrop candidates each of
side ``H / factor``; ``score(p) = CE(T(pad_H(p)), c)``; each image keeps its lowest-score crop; the
class keeps the ``ipc * factor**2`` lowest; ``factor x factor`` grids are stitched (image ``j``
holds the patches ranked ``j, j+ipc, ...``). Unlike the released code the selection is seeded.
Soft labels come later, from the teacher (METHODS.md §1.4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import StepRecord, register_method
from .common import (PatchSelectionConfig, PatchSelectionDistiller, crop_patches,
                     patch_cross_entropy, to01)


@dataclass(frozen=True)
class RDEDConfig(PatchSelectionConfig):
    """RDED's fields (all in :class:`~nrrdd_core.methods.common.PatchSelectionConfig`)."""


@register_method("rded")
class RDED(PatchSelectionDistiller):
    """RDED as a step-wise :class:`~nrrdd_core.methods.base.Distiller` (METHODS.md §3).

    One step scores ``images_per_step`` real images of one class (a class with at most that many
    images is one step); the class's images are stitched on its last step. ``images()`` returns
    ``(len(classes)*ipc, 3, H, W)`` [0,1] images (classes not selected yet are black) and labels
    ordered class by class. Views: ``"initial"`` (= the images).

    Raises (constructor): DataError (a class has fewer than ``ipc * factor**2`` real images),
    ConfigError (``mipc`` below that), TeacherMismatchError.
    """

    Config: ClassVar = RDEDConfig

    @property
    def total_steps(self) -> int:
        return self.select_steps

    def _rank_chunk(self, c, x_norm, boxes):
        n, m = boxes.shape[:2]
        ce = patch_cross_entropy(self.teacher, crop_patches(x_norm, boxes, self.side), c).view(n, m)
        best = ce.argmin(1)
        key = ce[torch.arange(n), best]
        return torch.arange(n), boxes[torch.arange(n), best], key, \
            {"ce": float(key.mean()) if n else 0.0}

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
