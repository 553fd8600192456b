"""The :class:`Teacher`: a frozen classifier plus its data config and CAM layer."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..data.base import DataConfig
from ..errors import CheckpointError, TeacherMismatchError
from ..io import atomic_torch_save, safe_torch_load

log = logging.getLogger(__name__)

CHECKPOINT_KIND = "nrrdd-teacher-v1"


@dataclass
class Teacher:
    """A frozen (eval mode, ``requires_grad=False``) classifier with what it needs to be used.

    Attributes:
        model: the network; input normalised pixels ``(N,3,S,S)`` with ``S = data_config.image_size``,
            output logits ``(N, num_classes)``.
        arch: registry name of the architecture (``"convnet_bn"``, ``"resnet18_small"``...).
        arch_kwargs: keyword arguments of the builder (depth, width...), for rebuilding.
        data_config: input size, mean/std and class names (order = logit order).
        cam_layer: dotted module name of the default CAM layer (e.g. ``"layer4"``).
        test_acc: top-1 accuracy in [0, 1] on the dataset's test split, when known.
        source: provenance (checkpoint path, training config key...).
    """

    model: nn.Module
    arch: str
    data_config: DataConfig
    cam_layer: str
    arch_kwargs: dict = field(default_factory=dict)
    test_acc: float | None = None
    source: str = ""
    bf16: bool = False
    channels_last: bool = False

    def __post_init__(self) -> None:
        self.model.eval()
        self.model.requires_grad_(False)

    @property
    def num_classes(self) -> int:
        return self.data_config.num_classes

    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def to(self, device: torch.device | str) -> "Teacher":
        """Move the model to ``device`` (``"auto"`` allowed; in place) and return self."""
        from ..device import resolve_device

        self.model.to(resolve_device(device))
        return self

    def layer(self, name: str | None = None) -> nn.Module:
        """The module named ``name`` (default: :attr:`cam_layer`).

        Raises:
            KeyError: no such module (the message lists candidate names).
        """
        name = name or self.cam_layer
        modules = dict(self.model.named_modules())
        if name not in modules:
            convs = [n for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Sequential)) and n]
            raise KeyError(f"no layer {name!r} in {self.arch}; candidates: {convs[-8:]}")
        return modules[name]

    def __call__(self, x_norm: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, C)`` float32 of normalised images ``(N,3,S,S)``; on CUDA optionally under
        bf16 autocast and in channels_last layout (:meth:`with_pass_options`)."""
        if x_norm.device.type != "cuda" or not (self.bf16 or self.channels_last):
            return self.model(x_norm)
        if self.channels_last:
            x_norm = x_norm.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16):
            return self.model(x_norm).float()

    def with_pass_options(self, bf16: bool = False, channels_last: bool = False) -> "Teacher":
        """This teacher (same network) whose forward passes on CUDA run under bf16 autocast and/or
        in channels_last memory layout (faster on tensor-core GPUs; logits differ from float32 by
        bf16 rounding). No-ops on the CPU. Source: ours (GPU readiness)."""
        from dataclasses import replace

        if channels_last and self.device.type == "cuda":
            self.model.to(memory_format=torch.channels_last)
        return replace(self, bf16=bool(bf16), channels_last=bool(channels_last))

    @torch.no_grad()
    def predict01(self, x01: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Softmax probabilities ``(N, C)`` of [0, 1] images ``(N,3,S,S)`` (any device)."""
        out = []
        for i in range(0, len(x01), batch_size):
            xb = x01[i:i + batch_size].to(self.device)
            out.append(torch.softmax(self.model(self.data_config.normalize(xb)), 1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.num_classes)

    def check_compatible(self, data_config: DataConfig) -> None:
        """Refuse a dataset whose class count or class order disagrees with the teacher.

        Raises:
            TeacherMismatchError: with the reason (counts, or the first differing class name).
        """
        mine, theirs = self.data_config.class_names, data_config.class_names
        if len(mine) != len(theirs):
            raise TeacherMismatchError(
                f"teacher has {len(mine)} classes but dataset {data_config.name} has {len(theirs)}: "
                "train a teacher on this dataset or pick the matching classes")
        for i, (a, b) in enumerate(zip(mine, theirs)):
            if a != b and set(mine) == set(theirs):
                raise TeacherMismatchError(
                    f"class order differs at index {i}: teacher {a!r} vs dataset {b!r}; "
                    "a teacher trained with another class order gives wrong labels")
            if a != b:
                raise TeacherMismatchError(
                    f"class names differ at index {i}: teacher {a!r} vs dataset {b!r}; the "
                    f"teacher was trained on other classes ({data_config.name} has "
                    f"{', '.join(theirs[:3])}...): use a teacher of this dataset")
        if self.data_config.image_size != data_config.image_size:
            raise TeacherMismatchError(
                f"teacher expects {self.data_config.image_size}px images, dataset has "
                f"{data_config.image_size}px")

    def save(self, path: str | Path, extra: dict | None = None) -> Path:
        """Save as a ``weights_only``-loadable checkpoint (atomic write)."""
        obj = {"kind": CHECKPOINT_KIND, "arch": self.arch, "arch_kwargs": dict(self.arch_kwargs),
               "data_config": self.data_config.to_dict(), "cam_layer": self.cam_layer,
               "test_acc": self.test_acc, "source": self.source, "extra": dict(extra or {}),
               "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()}}
        return atomic_torch_save(obj, path)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> "Teacher":
        """Load a checkpoint written by :meth:`save` (``weights_only=True``).

        Raises:
            CheckpointError: missing/corrupt/unsafe file, not a teacher checkpoint, bad content
                (``arch``, ``arch_kwargs``, ``data_config`` or ``state_dict`` missing or of the
                wrong kind), or weights that do not fit the recorded architecture; the message
                names the file and what to do.
        """
        from .registry import build_model, default_cam_layer

        obj = safe_torch_load(path)
        if not isinstance(obj, dict) or obj.get("kind") != CHECKPOINT_KIND:
            raise CheckpointError(f"{path} is not an NRR-DD Studio teacher checkpoint "
                                  "(use the matching loader for third-party checkpoints)")
        redo = "train the teacher again (`nrrdd teacher train`) or re-save it with Teacher.save"
        arch, kwargs = obj.get("arch"), obj.get("arch_kwargs") or {}
        if not isinstance(arch, str) or not isinstance(kwargs, dict) or \
                not all(isinstance(k, str) for k in kwargs):
            raise CheckpointError(f"{path}: 'arch' must be a model name and 'arch_kwargs' a dict "
                                  f"of keyword arguments; {redo}")
        if not isinstance(obj.get("state_dict"), dict):
            raise CheckpointError(f"{path} has no 'state_dict' of weights; {redo}")
        try:
            dc = DataConfig.from_dict(obj["data_config"])
            if len(dc.mean) != 3 or len(dc.std) != 3 or not dc.class_names or dc.image_size < 1:
                raise ValueError("mean/std need 3 values, class_names at least one name")
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: missing or bad 'data_config' (image size, mean/std, "
                                  f"class names): {type(exc).__name__}: {exc}; {redo}") from None
        try:
            model = build_model(arch, num_classes=dc.num_classes, image_size=dc.image_size,
                                **kwargs)
        except TypeError as exc:
            raise CheckpointError(f"{path}: arch_kwargs {kwargs} do not fit {arch}: {exc}; "
                                  f"{redo}") from None
        except (ValueError, KeyError, RuntimeError) as exc:  # ConfigError: unknown arch, bad value
            raise CheckpointError(f"{path}: cannot build {arch!r}: "
                                  f"{' '.join(str(exc).split())}; {redo}") from None
        try:
            model.load_state_dict(obj["state_dict"])
        except (RuntimeError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"weights in {path} do not fit {arch}: "
                                  f"{' '.join(str(exc).split())[:300]}") from exc
        cam_layer = obj.get("cam_layer")
        if not isinstance(cam_layer, str) or cam_layer not in dict(model.named_modules()):
            cam_layer = default_cam_layer(arch)
        t = cls(model=model, arch=arch, data_config=dc, cam_layer=cam_layer,
                arch_kwargs=dict(kwargs), test_acc=obj.get("test_acc") if isinstance(
                    obj.get("test_acc"), (int, float)) else None, source=str(path))
        return t.to(device)
