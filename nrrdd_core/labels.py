"""Relabelling for student training: teacher soft labels, DBR distances and hard labels
(METHODS.md §1.3, 0.4, 3.4), per-epoch label stores for replay, and storage accounting.

Label modes:

- ``"soft"``: the teacher's logits on every mixed student batch; the student minimises
  ``KL(softmax(T/tau) || softmax(S/tau))`` (batchmean, no ``tau^2``; METHODS.md §1.4).
- ``"dbr"``: per mixed sample only two numbers, ``d_org = CE(p_T, onehot(y))`` and
  ``d_aug = CE(p_T, onehot(y_pi))`` with ``p_T = softmax(T(x_mix)/tau_d)``; the student minimises
  ``L_sce + alpha_dbr * L_dbr`` (METHODS.md §4.4, Eq. 6-10; hinge form and L1/L2 choice [ours]).
- ``"hard"``: no teacher; cross-entropy against the mixed one-hot target
  ``lam' e_y + (1 - lam') e_{y_pi}``.

Every student batch is built by :func:`draw_batch` (RandomResizedCrop + flip + optional
RandAugment, then CutMix or Mixup) and described by a :class:`BatchAug` holding the drawn
*parameters* (crop boxes, flips, partner permutation, CutMix box / Mixup weight, RandAugment
seed), so :func:`replay_batch` rebuilds the same mixed images bit for bit. A
:class:`SoftLabelStore` writes, per epoch, those parameters plus the teacher values (fp16 logits
for soft labels, 2 fp16 distances per sample for DBR) and replays them: the FKD-style
"relabel once, train many students" workflow. :func:`label_storage_bytes` measures what was
written; :func:`paper_label_bytes` gives the paper's arithmetic (N x epochs x C vs N x epochs x 2).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from . import augment
from .errors import CheckpointError, ConfigError
from .io import atomic_torch_save, atomic_write_bytes, atomic_write_json, safe_torch_load
from .losses import dbr_distances, mixed_ce, soft_kd_loss, student_loss  # noqa: F401 (re-exported)
from .models.teacher import Teacher

log = logging.getLogger(__name__)

LABEL_MODES = ("soft", "dbr", "hard")
MIX_MODES = ("cutmix", "mixup")
#: Soft-label temperature by mixing mode (METHODS.md §1.3, RDED).
DEFAULT_TEMPERATURE = {"cutmix": 20.0, "mixup": 4.0}
#: Values stored per sample and epoch, besides soft labels' C logits.
DBR_VALUES = 2
HARD_LABELS_FILE = "labels_hard.pt"
_VALUES_RE = re.compile(r"^(soft|dbr)_e\d+\.f16$")
_AUG_RE = re.compile(r"^aug_e\d+\.pt$")


@dataclass
class BatchAug:
    """The drawn parameters of one student batch (enough to rebuild it exactly).

    Attributes:
        idx: ``(B,)`` int64 positions of the batch's images in the distilled set.
        crops: ``(B,4)`` int64 RandomResizedCrop boxes ``(i, j, h, w)`` in source pixels.
        flips: ``(B,)`` bool, horizontal flip after the crop.
        perm: ``(B,)`` int64 partner of each sample within the batch (``y_pi = y[idx][perm]``).
        lam: fraction of each mixed image that comes from its own sample (CutMix: the true pixel
            fraction ``lam'``; Mixup: the mixing weight), in [0, 1].
        box: CutMix box ``(i, j, h, w)`` in pixels, or ``None`` for Mixup.
        ra_seed: seed of the batch's RandAugment draws, ``-1`` when RandAugment is off.
    """

    idx: torch.Tensor
    crops: torch.Tensor
    flips: torch.Tensor
    perm: torch.Tensor
    lam: float
    box: tuple[int, int, int, int] | None
    ra_seed: int = -1


@dataclass(frozen=True)
class AugSpec:
    """How student batches are augmented (METHODS.md §1.4).

    Attributes:
        mix: ``"cutmix"`` (``lam ~ Beta(1,1)``) or ``"mixup"`` (``lam ~ Beta(0.8,0.8)``).
        factor: RandomResizedCrop area scale ``(1/factor, 1)`` (RDED's factor).
        flip: random horizontal flip (p = 0.5).
        randaugment: torchvision RandAugment (2 ops) per image (NRR-DD [paper]).
    """

    mix: str = "cutmix"
    factor: float = 1.0
    flip: bool = True
    randaugment: bool = False

    def __post_init__(self) -> None:
        if self.mix not in MIX_MODES:
            raise ConfigError(f"mix={self.mix!r} is not one of {list(MIX_MODES)}")
        if self.factor < 1:
            raise ConfigError(f"factor must be >= 1, got {self.factor}")


def _augment(x01: torch.Tensor, aug: BatchAug, spec: AugSpec) -> torch.Tensor:
    """Crop, flip and RandAugment of ``x01[aug.idx]`` (before mixing)."""
    params = augment.StudentAugParams(aug.crops, aug.flips, aug.ra_seed if spec.randaugment else -1)
    return augment.apply_student_augment(x01[aug.idx.to(x01.device)], params)


def draw_batch(x01: torch.Tensor, idx: torch.Tensor, spec: AugSpec,
               generator: torch.Generator) -> tuple[torch.Tensor, BatchAug]:
    """Draw and apply the augmentation of one student batch (METHODS.md §1.3, 0.4).

    Order of draws from ``generator``: crop boxes, flips, RandAugment seed (when on), then the
    CutMix / Mixup parameters of :func:`nrrdd_core.augment.cutmix` / ``mixup``.

    Args:
        x01: the distilled set ``(N,3,S,S)`` in [0, 1] pixels, any device.
        idx: ``(B,)`` int64 positions of the batch in ``x01``.
        spec: the augmentation.
        generator: CPU ``torch.Generator``.

    Returns:
        ``(x_mix01, aug)``: mixed images ``(B,3,S,S)`` in [0, 1] on ``x01``'s device, and their
        parameters (replay them with :func:`replay_batch`).
    """
    n = len(idx)
    p = augment.draw_student_augment(n, tuple(x01.shape[-2:]), generator, spec.factor, spec.flip,
                                     spec.randaugment)
    aug = BatchAug(idx=idx.cpu(), crops=p.crops, flips=p.flips, perm=torch.empty(0, dtype=torch.long),
                   lam=1.0, box=None, ra_seed=p.ra_seed)
    x = _augment(x01, aug, spec)
    if spec.mix == "cutmix":
        x_mix, aug.perm, aug.lam, aug.box = augment.cutmix(x, generator, beta=1.0)
    else:
        x_mix, aug.perm, aug.lam = augment.mixup(x, generator, alpha=0.8)
    return x_mix, aug


def replay_batch(x01: torch.Tensor, aug: BatchAug, spec: AugSpec) -> torch.Tensor:
    """Rebuild the mixed batch described by ``aug`` (bit-identical to :func:`draw_batch`'s output).

    Args:
        x01: the distilled set ``(N,3,S,S)`` in [0, 1], any device.

    Returns:
        ``(B,3,S,S)`` mixed images in [0, 1] on ``x01``'s device.
    """
    x = _augment(x01, aug, spec)
    perm = aug.perm.to(x.device)
    if aug.box is None:
        return aug.lam * x + (1.0 - aug.lam) * x[perm]
    i, j, h, w = aug.box
    x_mix = x.clone()
    x_mix[:, :, i:i + h, j:j + w] = x[perm, :, i:i + h, j:j + w]
    return x_mix


# ---- teacher values (the student losses are in nrrdd_core.losses) ---------------------------
@dataclass(frozen=True)
class LossSpec:
    """The student's loss (METHODS.md §1.4, 3.4).

    Attributes:
        mode: ``"soft"``, ``"dbr"`` or ``"hard"``.
        temperature: soft-label temperature ``tau`` (> 0).
        alpha_dbr: weight of ``L_dbr`` (METHODS.md §4.4: 1).
        dbr_radius: hinge radius ``r`` of ``L_sce`` in nats (paper: 0.4).
        dbr_norm: ``"l1"`` (``|d^S - d^T|``, default) or ``"l2"`` (``(d^S - d^T)^2``) [ours].
        dbr_temperature: ``tau_d`` of the DBR distances (default 1) [ours].
    """

    mode: str = "soft"
    temperature: float = DEFAULT_TEMPERATURE["cutmix"]
    alpha_dbr: float = 1.0
    dbr_radius: float = 0.4
    dbr_norm: str = "l1"
    dbr_temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in LABEL_MODES:
            raise ConfigError(f"label mode {self.mode!r} is not one of {list(LABEL_MODES)}")
        if self.dbr_norm not in ("l1", "l2"):
            raise ConfigError(f"dbr_norm={self.dbr_norm!r} is not one of ['l1', 'l2']")
        if self.temperature <= 0 or self.dbr_temperature <= 0:
            raise ConfigError("temperatures must be > 0")


@torch.no_grad()
def teacher_values(teacher: Teacher, x_mix01: torch.Tensor, y: torch.Tensor, y_perm: torch.Tensor,
                   spec: LossSpec) -> torch.Tensor | None:
    """What the teacher contributes to one mixed batch (float32, on the teacher's device).

    Args:
        teacher: frozen teacher (normalises with its own data config).
        x_mix01: mixed images ``(B,3,S,S)`` in [0, 1].
        y, y_perm: ``(B,)`` labels of each sample and of its mixing partner.

    Returns:
        soft: logits ``(B,C)``; dbr: distances ``(B,2)`` (:func:`dbr_distances` at
        ``spec.dbr_temperature``); hard: ``None``.
    """
    if spec.mode == "hard":
        return None
    dev = teacher.device
    logits = teacher(teacher.data_config.normalize(x_mix01.to(dev))).float()
    if spec.mode == "soft":
        return logits
    return dbr_distances(logits, y.to(dev), y_perm.to(dev), spec.dbr_temperature)


# ---- per-epoch label store ---------------------------------------------------------------------
class SoftLabelStore:
    """Per-epoch stored teacher labels (soft logits or DBR distances) for replay.

    Layout of ``root`` (normally ``<run>/labels_<mode>/``):

    - ``store.json``: mode, ``values_per_sample`` V, number of images N, a ``key`` identifying
      the distilled set + teacher + augmentation settings, and the list of complete epochs;
    - ``aug_eNNNN.pt``: that epoch's batch parameters (image order, crop boxes, flips, partner
      permutations, CutMix boxes / Mixup weights, RandAugment seeds), ``weights_only`` loadable;
    - ``<mode>_eNNNN.f16``: the teacher values, raw little-endian fp16 ``(N, V)`` with no header,
      so its size is exactly ``N x V x 2`` bytes (the paper's arithmetic, METHODS.md §4.4).

    Files are written atomically and an epoch is listed in ``store.json`` only after both of its
    files exist. Opening a store whose ``key`` differs discards the old epochs (with a warning).

    Raises:
        ConfigError: ``mode`` is not ``"soft"`` or ``"dbr"``.
    """

    def __init__(self, root: str | os.PathLike, mode: str, *, num_values: int, num_images: int,
                 key: str = "") -> None:
        if mode not in ("soft", "dbr"):
            raise ConfigError(f"only soft and dbr labels are stored, not {mode!r}")
        self.root = Path(root)
        self.mode = mode
        self.meta = {"mode": mode, "values_per_sample": int(num_values), "num_images": int(num_images),
                     "key": key, "dtype": "float16", "epochs": []}
        old = self._read_meta()
        if old is not None and all(old.get(k) == self.meta[k] for k in
                                   ("mode", "values_per_sample", "num_images", "key")):
            self.meta["epochs"] = sorted(int(e) for e in old.get("epochs", []))
        elif old is not None:
            log.warning("label store %s was written for other settings; discarding its epochs", self.root)
            for f in self.root.iterdir():
                if _VALUES_RE.match(f.name) or _AUG_RE.match(f.name):
                    f.unlink()
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.root / "store.json", self.meta)

    def _read_meta(self) -> dict | None:
        path = self.root / "store.json"
        if not path.is_file():
            return None
        try:
            meta = json.loads(path.read_text())
            if not isinstance(meta, dict) or not isinstance(meta.get("epochs", []), list) or \
                    not all(isinstance(e, int) for e in meta.get("epochs", [])):
                raise ValueError("not a label store description")
            return meta
        except (OSError, ValueError):
            log.warning("unreadable %s; starting the label store again", path)
            return None

    def values_path(self, epoch: int) -> Path:
        return self.root / f"{self.mode}_e{epoch:04d}.f16"

    def aug_path(self, epoch: int) -> Path:
        return self.root / f"aug_e{epoch:04d}.pt"

    def has_epoch(self, epoch: int) -> bool:
        return epoch in self.meta["epochs"]

    def write_epoch(self, epoch: int, augs: list[BatchAug], values: torch.Tensor) -> None:
        """Store one epoch: the batches' parameters (in order) and the teacher values ``(N,V)``
        (rows in batch order, i.e. the concatenation of the batches), rounded to fp16."""
        n, v = self.meta["num_images"], self.meta["values_per_sample"]
        if tuple(values.shape) != (n, v):
            raise ValueError(f"label store expects values ({n},{v}), got {tuple(values.shape)}")
        params = {
            "idx": torch.cat([a.idx for a in augs]),
            "sizes": torch.tensor([len(a.idx) for a in augs], dtype=torch.long),
            "crops": torch.cat([a.crops for a in augs]).to(torch.int32),
            "flips": torch.cat([a.flips for a in augs]),
            "perm": torch.cat([a.perm for a in augs]),
            "lam": torch.tensor([a.lam for a in augs], dtype=torch.float64),
            "box": torch.tensor([a.box if a.box is not None else (-1, -1, -1, -1) for a in augs],
                                dtype=torch.int32).view(-1, 4),
            "ra_seed": torch.tensor([a.ra_seed for a in augs], dtype=torch.long),
        }
        atomic_torch_save(params, self.aug_path(epoch))
        atomic_write_bytes(self.values_path(epoch),
                           values.detach().to("cpu", torch.float16).contiguous().numpy().tobytes())
        self.meta["epochs"] = sorted(set(self.meta["epochs"]) | {int(epoch)})
        atomic_write_json(self.root / "store.json", self.meta)

    def read_epoch(self, epoch: int) -> tuple[list[BatchAug], torch.Tensor]:
        """Load one stored epoch: ``(augs, values)`` with values float32 ``(N,V)`` on CPU.

        Raises:
            CheckpointError: the epoch is not stored, or its files are missing or truncated.
        """
        if not self.has_epoch(epoch):
            raise CheckpointError(f"epoch {epoch} is not in the label store {self.root}")
        p = safe_torch_load(self.aug_path(epoch))
        raw = self.values_path(epoch).read_bytes() if self.values_path(epoch).is_file() else b""
        n, v = self.meta["num_images"], self.meta["values_per_sample"]
        if len(raw) != n * v * 2:
            raise CheckpointError(f"{self.values_path(epoch)} has {len(raw)} bytes, expected {n * v * 2}")
        values = torch.frombuffer(bytearray(raw), dtype=torch.float16).view(n, v).float()
        augs, start = [], 0
        try:
            for b, size in enumerate(p["sizes"].tolist()):
                sl = slice(start, start + size)
                box = tuple(int(t) for t in p["box"][b])
                augs.append(BatchAug(idx=p["idx"][sl], crops=p["crops"][sl].long(),
                                     flips=p["flips"][sl], perm=p["perm"][sl],
                                     lam=float(p["lam"][b]), box=None if box[0] < 0 else box,
                                     ra_seed=int(p["ra_seed"][b])))
                start += size
            if start != n or (n and int(torch.cat([a.idx for a in augs]).max()) >= n) or \
                    any(len(a.idx) != len(a.perm) or len(a.crops) != len(a.idx) for a in augs):
                raise ValueError("batch parameters do not cover the images")
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as exc:
            raise CheckpointError(f"{self.aug_path(epoch)} is not a label-store epoch of {n} "
                                  f"images ({type(exc).__name__}: {exc})") from None
        return augs, values

    def try_read_epoch(self, epoch: int) -> tuple[list[BatchAug], torch.Tensor] | None:
        """:meth:`read_epoch`, or None when the epoch is not stored or its files are damaged; a
        damaged epoch is dropped from the store (with a warning) so that it is labelled again."""
        if not self.has_epoch(epoch):
            return None
        try:
            return self.read_epoch(epoch)
        except CheckpointError as exc:
            log.warning("%s; labelling epoch %d again", exc, epoch)
            self.meta["epochs"] = [e for e in self.meta["epochs"] if e != epoch]
            atomic_write_json(self.root / "store.json", self.meta)
            return None

    def files(self) -> list[Path]:
        """The files of the stored epochs (parameters and values) plus ``store.json``."""
        out = [self.root / "store.json"]
        for e in self.meta["epochs"]:
            out += [self.aug_path(e), self.values_path(e)]
        return out


@dataclass
class MixedBatch:
    """One student batch ready for the loss.

    Attributes:
        x_mix01: ``(B,3,S,S)`` mixed images in [0, 1] on the training device.
        y, y_perm: ``(B,)`` int64 labels of each sample and its partner (training device).
        lam: own-sample fraction (see :class:`BatchAug`).
        values: teacher values (:func:`teacher_values`), or ``None`` for hard labels.
    """

    x_mix01: torch.Tensor
    y: torch.Tensor
    y_perm: torch.Tensor
    lam: float
    values: torch.Tensor | None


def epoch_batches(x01: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator,
                  aug_spec: AugSpec, loss_spec: LossSpec, teacher: Teacher | None,
                  store: SoftLabelStore | None = None, epoch: int = 0) -> Iterator[MixedBatch]:
    """The mixed batches of one student epoch with their labels, online or through a store.

    Online (``store`` None): the image order (``randperm``) and each batch's augmentation are drawn
    from ``generator``; the teacher labels each batch (float32). With a store: a stored epoch is
    replayed (``generator`` untouched); otherwise the epoch is drawn exactly as online (same
    draws), labelled, written, and then replayed from the written fp16 values. So a replayed
    epoch shows the same mixed images as the online run with the same generator state, with
    teacher values rounded to fp16.

    Args:
        x01: distilled images ``(N,3,S,S)`` in [0, 1] on the training device.
        y: ``(N,)`` int64 labels (teacher label space) on the same device.
        batch_size: images per batch (the last batch may be smaller).
        teacher: required for soft / dbr labels.
    """
    n = len(x01)
    if store is not None and loss_spec.mode != "hard":
        stored = store.try_read_epoch(epoch)  # None: not stored yet, or damaged (relabelled)
        if stored is None:
            augs, vals = [], []
            order = torch.randperm(n, generator=generator)
            for s in range(0, n, batch_size):
                x_mix, aug = draw_batch(x01, order[s:s + batch_size], aug_spec, generator)
                yb = y[aug.idx.to(y.device)]
                vals.append(teacher_values(teacher, x_mix, yb, yb[aug.perm.to(y.device)], loss_spec).cpu())
                augs.append(aug)
            store.write_epoch(epoch, augs, torch.cat(vals))
            stored = store.read_epoch(epoch)
        augs, values = stored
        start = 0
        for aug in augs:
            yb = y[aug.idx.to(y.device)]
            v = values[start:start + len(aug.idx)].to(x01.device)
            start += len(aug.idx)
            yield MixedBatch(replay_batch(x01, aug, aug_spec), yb, yb[aug.perm.to(y.device)], aug.lam, v)
        return
    order = torch.randperm(n, generator=generator)
    for s in range(0, n, batch_size):
        x_mix, aug = draw_batch(x01, order[s:s + batch_size], aug_spec, generator)
        yb = y[aug.idx.to(y.device)]
        yp = yb[aug.perm.to(y.device)]
        v = None if loss_spec.mode == "hard" else teacher_values(teacher, x_mix, yb, yp, loss_spec).to(x01.device)
        yield MixedBatch(x_mix, yb, yp, aug.lam, v)


# ---- storage accounting ------------------------------------------------------------------------
def _classify(path: Path) -> str | None:
    m = _VALUES_RE.match(path.name)
    if m:
        return m.group(1)
    if _AUG_RE.match(path.name):
        return "aug_params"
    if path.name == HARD_LABELS_FILE:
        return "hard"
    return None


def label_storage_bytes(source: str | os.PathLike | Iterable[str | os.PathLike]) -> dict:
    """Bytes of the label files actually written (``os.path.getsize``).

    Args:
        source: a run folder / label-store folder (searched recursively), or an iterable of files.

    Returns:
        ``{"soft", "dbr", "hard", "aug_params": bytes, "soft_over_dbr": ratio or None,
        "files": {path: bytes}}``: ``soft`` / ``dbr`` count the stored teacher values
        (``<mode>_eNNNN.f16``), ``hard`` the ``labels_hard.pt`` file, ``aug_params`` the stored
        crop/mix parameters that soft and DBR replay both need (not counted in either).
    """
    if isinstance(source, (str, os.PathLike)):
        root = Path(source)
        paths = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    else:
        paths = [Path(p) for p in source]
    out = {"soft": 0, "dbr": 0, "hard": 0, "aug_params": 0, "files": {}}
    for p in paths:
        kind = _classify(p)
        if kind is not None and p.is_file():
            size = os.path.getsize(p)
            out[kind] += size
            out["files"][str(p)] = size
    out["soft_over_dbr"] = out["soft"] / out["dbr"] if out["dbr"] else None
    return out


def paper_label_bytes(num_images: int, epochs: int, num_classes: int, bytes_per_value: int = 2) -> dict:
    """The paper's storage arithmetic (METHODS.md §4.4): soft labels ``N x epochs x C`` values, DBR
    ``N x epochs x 2`` values, ``bytes_per_value`` each (2 = fp16).

    Returns:
        ``{"soft": bytes, "dbr": bytes, "soft_over_dbr": C / 2}``; e.g. ImageNet-1k IPC200
        (N = 200,000, 300 epochs, C = 1000): 120 GB vs 0.24 GB.
    """
    soft = int(num_images) * int(epochs) * int(num_classes) * bytes_per_value
    dbr = int(num_images) * int(epochs) * DBR_VALUES * bytes_per_value
    return {"soft": soft, "dbr": dbr, "soft_over_dbr": soft / dbr if dbr else None}
