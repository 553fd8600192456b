"""Teacher references: one grammar for "where does this teacher come from".

The app, the ``nrrdd`` command and the run manifest (``manifest["teacher"]["ref"]``) all write and
read a teacher as one short text, parsed here and nowhere else (timm's model names are the
model: ``urlsplit(name)`` with a few schemes)::

    shipped                  the built-in ``shapes`` teacher (package data, METHODS.md §1.1)
    file:PATH  or  PATH      a checkpoint of ours (:meth:`Teacher.save`)
    resnet20_cifar:PATH      a public CIFAR ResNet checkpoint (akamaster format; resnet20/32/44/56)
    pretrained:ARCH          torchvision ImageNet weights (resnet18, resnet50, mobilenet_v2)
    train:KEY                a teacher trained by :func:`train_teacher`, cached as
                             ``cache_dir()/teachers/KEY.pt`` (KEY hashes its recipe and dataset)
    upload:KEY               a checkpoint uploaded in the app, stored as
                             ``cache_dir()/uploads/KEY.pt`` (KEY: first 16 hex digits of its SHA-256)

``TeacherRef.parse(text)`` gives a :class:`TeacherRef`; ``str(ref)`` gives the text back
(``parse(str(ref)) == ref`` for every kind). ``ref.load(device)`` loads the teacher.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch

from ..errors import CheckpointError, ConfigError
from ..io import cache_dir, write_if_changed
from .teacher import Teacher

#: Every kind of reference, in the order the app offers them.
KINDS = ("shipped", "train", "file", "upload", "resnet_cifar", "pretrained")
#: Kinds whose text is ``SCHEME:VALUE`` with a fixed scheme (resnet_cifar's scheme is its arch).
_SCHEMES = ("file", "pretrained", "train", "upload")
_CIFAR_ARCH = re.compile(r"resnet\d+_cifar")
_KEY = re.compile(r"[0-9A-Za-z_.-]+")
GRAMMAR = ("shipped, file:PATH (or a bare PATH), resnet20_cifar:PATH, pretrained:ARCH, "
           "train:KEY or upload:KEY")


@dataclass(frozen=True)
class TeacherRef:
    """Where a teacher comes from (see the module docstring for the text form).

    Attributes:
        kind: one of :data:`KINDS`.
        arch: architecture of ``resnet_cifar`` (``"resnet20_cifar"`` ...) and ``pretrained``
            (``"resnet18"`` ...) references; ``""`` otherwise.
        path: checkpoint path of ``file`` and ``resnet_cifar`` references; ``""`` otherwise.
        key: cache key of ``train`` and ``upload`` references; ``""`` otherwise.

    Raises:
        ConfigError: an unknown kind, or a field missing or not allowed for the kind.
    """

    kind: str
    arch: str = ""
    path: str = ""
    key: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"unknown teacher kind {self.kind!r}; choose from {KINDS}")
        need = {"shipped": (), "file": ("path",), "resnet_cifar": ("arch", "path"),
                "pretrained": ("arch",), "train": ("key",), "upload": ("key",)}[self.kind]
        for name in ("arch", "path", "key"):
            if bool(getattr(self, name)) != (name in need):
                raise ConfigError(f"a {self.kind} teacher reference "
                                  f"{'needs' if name in need else 'takes no'} {name}")
        if self.kind == "resnet_cifar" and not _CIFAR_ARCH.fullmatch(self.arch):
            raise ConfigError(f"{self.arch!r} is not a CIFAR ResNet (resnet20_cifar ... "
                              "resnet56_cifar)")
        if self.key and not _KEY.fullmatch(self.key):
            raise ConfigError(f"bad {self.kind} key {self.key!r} (letters, digits, '_.-' only)")

    # ---- text form ---------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str) -> "TeacherRef":
        """The reference written as ``text`` (grammar in the module docstring). A text without a
        known scheme is a path to a checkpoint of ours; ``train:PATH`` / ``upload:PATH`` (a path
        instead of a key, as older app versions wrote) is read as ``file:PATH``.

        Raises:
            ConfigError: empty text, an unknown ``SCHEME:`` prefix, or an empty value.
        """
        text = str(text).strip()
        if not text:
            raise ConfigError(f"no teacher given; write one of: {GRAMMAR}")
        if text == "shipped":
            return cls("shipped")
        scheme, sep, value = text.partition(":")
        if not sep or len(scheme) == 1 or "/" in scheme or "\\" in scheme:
            return cls("file", path=text)  # a bare path (a drive letter is no scheme)
        if not value:
            raise ConfigError(f"teacher reference {text!r} has nothing after {scheme!r}:")
        if _CIFAR_ARCH.fullmatch(scheme):
            return cls("resnet_cifar", arch=scheme, path=value)
        if scheme == "file":
            return cls("file", path=value)
        if scheme == "pretrained":
            return cls("pretrained", arch=value)
        if scheme in ("train", "upload"):
            if "/" in value or "\\" in value or value.endswith((".pt", ".pth", ".th")):
                return cls("file", path=value)
            return cls(scheme, key=value)
        raise ConfigError(f"unknown teacher reference {text!r}; write one of: {GRAMMAR}")

    def __str__(self) -> str:
        if self.kind == "shipped":
            return "shipped"
        if self.kind == "resnet_cifar":
            return f"{self.arch}:{self.path}"
        value = self.arch or self.path or self.key
        return f"{self.kind}:{value}"

    # ---- constructors ------------------------------------------------------------------------
    @classmethod
    def trained(cls, cfg, bundle) -> "TeacherRef":
        """The ``train:KEY`` reference of the teacher that ``train_teacher(cfg, bundle)`` caches
        (``cfg``: a :class:`~nrrdd_core.models.train.TeacherTrainConfig`)."""
        from .train import teacher_cache_path

        return cls("train", key=teacher_cache_path(cfg, bundle).stem)

    @classmethod
    def store_upload(cls, data: bytes) -> "TeacherRef":
        """Store an uploaded checkpoint (its bytes) as ``cache_dir()/uploads/KEY.pt`` (atomic
        write, once per content) and return its ``upload:KEY`` reference. Nothing is unpickled
        here; :meth:`load` reads it with ``weights_only=True``."""
        ref = cls("upload", key=hashlib.sha256(data).hexdigest()[:16])
        write_if_changed(ref.checkpoint_path(), data)  # a damaged copy is replaced
        return ref

    # ---- resolution --------------------------------------------------------------------------
    def resolved(self) -> "TeacherRef":
        """The same reference with its path made absolute (``~`` expanded): what a run records,
        so that it loads from any working folder."""
        if not self.path:
            return self
        return replace(self, path=str(Path(self.path).expanduser().resolve()))

    def checkpoint_path(self) -> Path | None:
        """The file this reference loads: the shipped teacher's package file, the path, or the
        cache file of a ``train``/``upload`` key; None for ``pretrained`` (torchvision's cache)."""
        if self.kind == "shipped":
            from .train import SHIPPED_TEACHER_PATH

            return SHIPPED_TEACHER_PATH
        if self.path:
            return Path(self.path).expanduser()
        if self.kind in ("train", "upload"):
            return cache_dir() / ("teachers" if self.kind == "train" else "uploads") / \
                f"{self.key}.pt"
        return None

    @property
    def takes_class_names(self) -> bool:
        """True for public CIFAR checkpoints, which carry no class names: :meth:`load` takes the
        dataset's (so build the dataset first)."""
        return self.kind == "resnet_cifar"

    def load(self, device: torch.device | str = "cpu",
             class_names: Sequence[str] | None = None) -> Teacher:
        """Load the teacher on ``device``. ``class_names`` name the logits of a ``resnet_cifar``
        checkpoint (default: the CIFAR-10 names); other kinds carry their own and ignore it.

        Raises:
            CheckpointError: a missing or unreadable checkpoint (for ``train``/``upload``, one no
                longer in the cache folder), or weights that do not fit.
            ConfigError: an unknown architecture.
        """
        from ..device import resolve_device

        device = resolve_device(device)
        if self.kind == "shipped":
            from .train import shipped_teacher

            return shipped_teacher(device)
        if self.kind == "pretrained":
            from .torchvision_models import pretrained_teacher

            return pretrained_teacher(self.arch, device)
        path = self.checkpoint_path()
        if self.kind == "resnet_cifar":
            from .resnet_cifar import (akamaster_data_config, load_resnet_cifar_checkpoint,
                                       public_checkpoint_data_config)

            dc = public_checkpoint_data_config(class_names) if class_names else \
                akamaster_data_config()
            return load_resnet_cifar_checkpoint(path, self.arch, dc, device=device)
        if self.kind in ("train", "upload") and not path.is_file():
            how = ("train it again (Setup page or `nrrdd teacher train`)" if self.kind == "train"
                   else "upload it again")
            raise CheckpointError(f"teacher {self} is not in the cache folder {path.parent}; "
                                  f"{how}, or pass --teacher PATH")
        return Teacher.load(path, device=device)

    @classmethod
    def of_manifest(cls, manifest: dict) -> "TeacherRef":
        """The teacher reference a saved run recorded (``manifest["teacher"]["ref"]``);
        ``shipped`` when it recorded none (runs written before references existed)."""
        return cls.parse((manifest.get("teacher") or {}).get("ref") or "shipped")
