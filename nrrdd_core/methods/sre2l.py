"""SRe2L recover: synthesise images from noise by matching the teacher's BN statistics
(METHODS.md §2) [code, SRe2L].

``x~ ~ N(0,1)`` in normalised space; Adam(lr 0.25, betas (0.5, 0.9)), cosine decay to 0 over
``iterations``; each iteration ``L = CE(T(A(x~)), y) + r_bn * L_bn`` (METHODS.md §1.2) with ``A``
the recover augmentation (a random roll, plus a shared RandomResizedCrop and flip above 32 px),
then each channel is clipped to the normalised image of [0,1]. The last iterate is kept. lr, r_bn
and the roll offsets default to the released values for the input side (0.25 / 0.01 / {0..4} at
32 px, 0.1 / 1.0 / {-4..4} at 64 px, 0.25 / 0.01 / {0..32} at 224 px). Soft labels come later,
from the teacher (METHODS.md §1.4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..configs import param
from ..errors import ConfigError
from .base import Distiller, StepRecord, register_method
from .common import (SRE2L_RECOVER_CODE, RefineConfig, Refiner, class_labels, slot_batches,
                     to01)


@dataclass(frozen=True)
class SRe2LConfig(RefineConfig):
    """SRe2L recover fields (METHODS.md §2); the Adam/batch fields are in
    :class:`~nrrdd_core.methods.common.RefineConfig`."""

    lr: float = param(-1.0, "Adam learning rate (cosine decay to 0); -1 = as released for the "
                      "input side: 0.25, or 0.1 at 33-64 px (Tiny-ImageNet)", unit="1", lo=-1.0,
                      source=SRE2L_RECOVER_CODE)
    r_bn: float = param(-1.0, "weight of the BN-statistics loss; -1 = as released for the input "
                        "side: 0.01, or 1.0 at 33-64 px (Tiny-ImageNet)", unit="1", lo=-1.0,
                        source=SRE2L_RECOVER_CODE)

    def validate(self) -> None:
        """Ranges, plus: ``lr`` is -1 (per resolution) or > 0, ``r_bn`` is -1 or >= 0.

        Raises:
            ConfigError: naming the field.
        """
        super().validate()
        if self.lr != -1.0 and self.lr <= 0:
            raise ConfigError(f"lr={self.lr}: use a positive learning rate, or -1 for the "
                              "released value at the input side")
        if self.r_bn != -1.0 and self.r_bn < 0:
            raise ConfigError(f"r_bn={self.r_bn}: use a weight >= 0, or -1 for the released "
                              "value at the input side")

    def resolved(self, image_size: int) -> "SRe2LConfig":
        """This config with every per-resolution field (value -1 / ``"auto"``) replaced by the
        released value for ``image_size`` px (METHODS.md §2); explicit values are kept.

        Rule: input side <= 32 px (CIFAR script) lr 0.25, r_bn 0.01, roll {0..4}; 33-64 px
        (Tiny-ImageNet script) lr 0.1, r_bn 1.0, roll {-4..4}; larger (ImageNet script) lr 0.25,
        r_bn 0.01, roll {0..32}.
        """
        tiny = 32 < image_size <= 64
        max_roll, symmetric = self.roll_settings(image_size)
        return self.replace(lr=(0.1 if tiny else 0.25) if self.lr == -1.0 else self.lr,
                            r_bn=(1.0 if tiny else 0.01) if self.r_bn == -1.0 else self.r_bn,
                            jitter=max_roll,
                            jitter_mode="symmetric" if symmetric else "nonnegative")


@register_method("sre2l")
class SRe2L(Distiller):
    """SRe2L recover as a step-wise :class:`~nrrdd_core.methods.base.Distiller` (METHODS.md §2).

    Per-resolution defaults (``lr``, ``r_bn``, ``jitter``, ``jitter_mode`` at -1 / ``"auto"``)
    are resolved for the teacher's input side on construction (:meth:`SRe2LConfig.resolved`), so
    :attr:`config` holds the values that run.

    One step = one Adam iteration on the current batch (default: all ``len(classes) * ipc``
    images jointly [ours]; ``batch_size`` > 0 optimises batches of IPC slots mixing classes in
    turn, as the released code). SRe2L needs no real images, so any ``ipc`` is accepted.
    ``images()``: ``(len(classes)*ipc, 3, H, W)`` [0,1] images (the initial noise before the
    first step), labels ordered class by class. Views: ``"initial"`` (the noise in [0,1]),
    ``"change"`` ``(N,H,W)`` mean absolute change over channels in [0,1] pixels.

    Raises: ConfigError (ipc < 1), TeacherMismatchError, NonFiniteLossError (during ``step``;
    the images keep their last good value), ConfigError (the teacher has no BN layer, first step).
    """

    Config: ClassVar = SRe2LConfig

    def __init__(self, config: SRe2LConfig, **kwargs) -> None:
        super().__init__(config, **kwargs)
        size = self.teacher.data_config.image_size
        self.config = config = config.resolved(size)  # what runs (and is saved) is explicit
        n = len(self.classes) * self.ipc
        self.labels = class_labels(self.classes, self.ipc)
        self.x_init = torch.randn(n, 3, size, size, generator=self.generator).to(self.device)
        self.refiner = Refiner(self.teacher, self.x_init, self.labels.to(self.device), config,
                               config.r_bn, slot_batches(len(self.classes), self.ipc,
                                                         config.batch_size))

    @property
    def total_steps(self) -> int:
        return self.refiner.total_steps

    def _step(self) -> StepRecord:
        losses, info = self.refiner.step(self.step_index, self.generator, self.check_finite)
        return StepRecord(0, 0, "recover", losses, info=info)

    def images(self) -> tuple[torch.Tensor, torch.Tensor]:
        return to01(self.teacher, self.refiner.x), self.labels.clone()

    def views(self) -> dict[str, torch.Tensor]:
        init, now = to01(self.teacher, self.x_init), to01(self.teacher, self.refiner.x)
        return {"initial": init, "change": (now - init).abs().mean(1)}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "refiner": self.refiner.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.refiner.load_state_dict(state["refiner"])

    def close(self) -> None:
        self.refiner.close()
