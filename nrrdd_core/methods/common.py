"""Pieces shared by the KD-family methods (SRe2L, RDED, NRR-DD), each written once.

- Real-patch selection (RDED METHODS.md §3, NRR-DD's CIDD METHODS.md §4.2): RandomResizedCrop candidate boxes
  (:func:`candidate_boxes`, :func:`crop_patches`), padded-patch scoring by the teacher
  (:func:`pad_center`, :func:`patch_cross_entropy`), stitching of ranked patches into
  ``factor x factor`` grids (:func:`stitch`), and the per-class, chunked step machinery
  (:class:`PatchSelectionDistiller`) whose subclasses only say how a chunk of real images yields
  ranked candidates.
- Image refinement with Adam (SRe2L recover METHODS.md §2, NRR METHODS.md §4.3): :class:`Refiner`, a masked
  Adam loop whose mask multiplies the optimiser's *update* (SRe2L = no mask).

Pixel spaces: real images come in as uint8, are converted to [0,1] and normalised with the
TEACHER's data config (a pretrained teacher may use other mean/std than the dataset entry);
patches, stitched images and refined images live in normalised space.
"""

from __future__ import annotations

import abc
import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..augment import apply_crops, random_resized_crop_params, recover_augment, recover_jitter
from ..cam import cam_ratio
from ..configs import ConfigBase, param
from ..device import class_generator, make_generator
from ..errors import ConfigError
from ..losses import BNStatsLoss
from ..models.teacher import Teacher
from .base import Distiller, StepRecord

log = logging.getLogger(__name__)

#: patches per teacher forward when scoring (memory bound at 224 px; no effect on results)
SCORE_BATCH = 128


def cpu_copy(obj):
    """Deep copy of nested dicts/lists/tuples with every tensor detached, cloned and on the CPU
    (so a saved state does not change when the run goes on)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


def class_labels(classes: list[int], ipc: int) -> torch.Tensor:
    """Labels ``(len(classes) * ipc,)`` int64 ordered class by class, ``ipc`` each."""
    return torch.tensor(classes, dtype=torch.long).repeat_interleave(ipc)


def to01(teacher: Teacher, x_norm: torch.Tensor) -> torch.Tensor:
    """Normalised images ``(N,3,H,W)`` (teacher's mean/std) -> [0,1] float32 on the CPU, clipped."""
    return teacher.data_config.denormalize(x_norm.detach()).clamp(0, 1).float().cpu()


# ---- real-patch candidates, scoring, stitching -----------------------------------------------
def candidate_boxes(n: int, m: int, image_size: int, generator: torch.Generator,
                    min_scale: float = 0.08) -> torch.Tensor:
    """``m`` square RandomResizedCrop boxes per real image (METHODS.md §3: scale ``(min_scale, 1)``,
    ratio 1), drawn with ``generator``.

    Returns:
        int64 ``(n, m, 4)`` boxes ``(i, j, h, w)`` in pixels of the ``image_size`` image.
    """
    boxes = random_resized_crop_params(n * m, image_size, (min_scale, 1.0), (1.0, 1.0), generator)
    return boxes.view(n, m, 4)


def crop_patches(x: torch.Tensor, boxes: torch.Tensor, side: int) -> torch.Tensor:
    """Crop boxes out of their images and resize them to ``side`` (bilinear, antialiased).

    Args:
        x: images ``(n,3,H,W)``, any pixel space and device.
        boxes: ``(n, k, 4)`` boxes ``(i, j, h, w)``; box ``[a, b]`` belongs to image ``a``.
        side: patch side in pixels (``H // factor``).

    Returns:
        patches ``(n*k, 3, side, side)`` ordered image-major (patch ``a*k + b`` = box ``[a, b]``).
    """
    n, k = boxes.shape[:2]
    if n == 0:
        return x.new_zeros(0, 3, side, side)
    per_slot = [apply_crops(x, boxes[:, b], side) for b in range(k)]  # k x (n,3,s,s)
    return torch.stack(per_slot, 1).reshape(n * k, 3, side, side)


def pad_center(patches: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad ``(P,3,s,s)`` patches, centred, to ``(P,3,size,size)`` (METHODS.md §3 ``pad_H``).

    Zero is taken in normalised space (the dataset's mean colour), as in the released RDED code,
    which normalises before padding. A no-op when ``s == size`` (factor 1).
    """
    pad = size - patches.shape[-1]
    if pad <= 0:
        return patches
    return F.pad(patches, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))


@torch.no_grad()
def patch_cross_entropy(teacher: Teacher, patches_norm: torch.Tensor, target: int) -> torch.Tensor:
    """``CE(T(pad_H(p)), target)`` of each normalised patch (METHODS.md §3 score; CIDD's confidence is
    ``exp(-CE)``), in batches of :data:`SCORE_BATCH` under ``no_grad``.

    Args:
        teacher: frozen teacher (input side ``H = teacher.data_config.image_size``).
        patches_norm: ``(P,3,s,s)`` normalised patches on the teacher's device.
        target: class index (teacher logit order).

    Returns:
        float32 ``(P,)`` cross-entropies in nats on the CPU (NaN/inf if the teacher gives them).
    """
    size = teacher.data_config.image_size
    out = []
    for k in range(0, len(patches_norm), SCORE_BATCH):
        logits = teacher(pad_center(patches_norm[k:k + SCORE_BATCH], size)).float()
        tgt = torch.full((len(logits),), int(target), dtype=torch.long, device=logits.device)
        out.append(F.cross_entropy(logits, tgt, reduction="none").cpu())
    return torch.cat(out) if out else torch.zeros(0)


#: CIDD confidence readings (METHODS.md §4.2): the teacher's probability of the patch's own class,
#: or its highest probability over all classes (the paper's "highest prediction probability").
CONFIDENCES = ("true_class", "max_prob")


@torch.no_grad()
def patch_log_confidence(teacher: Teacher, patches_norm: torch.Tensor, target: int,
                         confidence: str = "true_class") -> torch.Tensor:
    """CIDD's confidence of each normalised patch, as a log-probability (METHODS.md §4.2 step 3).

    ``"true_class"``: ``log softmax(T(pad_H(p)))_target`` (equal to ``-CE``, the RDED score
    negated); ``"max_prob"``: ``max_k log softmax(T(pad_H(p)))_k``, the paper's "highest
    prediction probability". Batches of :data:`SCORE_BATCH` under ``no_grad``.

    Args:
        teacher: frozen teacher. patches_norm: ``(P,3,s,s)`` normalised patches on its device.
        target: class index (teacher logit order). confidence: one of :data:`CONFIDENCES`.

    Returns:
        float32 ``(P,)`` log-probabilities (<= 0) on the CPU.

    Raises:
        ConfigError: unknown ``confidence``.
    """
    if confidence not in CONFIDENCES:
        raise ConfigError(f"confidence must be one of {CONFIDENCES}, got {confidence!r}")
    size = teacher.data_config.image_size
    out = []
    for k in range(0, len(patches_norm), SCORE_BATCH):
        logp = F.log_softmax(teacher(pad_center(patches_norm[k:k + SCORE_BATCH], size)).float(), 1)
        out.append((logp[:, int(target)] if confidence == "true_class" else logp.max(1).values).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def float64_model(teacher: Teacher) -> torch.nn.Module:
    """A float64 copy of the teacher's network (eval mode, no grad) for float64 patch scoring
    (:func:`patch_scores`); the teacher itself is not changed."""
    import copy

    model = copy.deepcopy(teacher.model).double().eval()
    return model.requires_grad_(False)


@torch.no_grad()
def patch_scores(teacher: Teacher, patches_norm: torch.Tensor, target: int,
                 precision: str = "float32", model64: torch.nn.Module | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """RDED's patch score ``CE(T(pad_H(p)), target)`` and the teacher's logit margin of each
    normalised patch (METHODS.md §3), in batches of :data:`SCORE_BATCH`.

    With a confident teacher many float32 scores are exactly 0.0 (the class probability rounds to
    1), so their order is a tie; ``precision="float64"`` runs the teacher in float64 on the
    float32 patches (as the golden float64 run of the released code), and the margin
    ``logit_target - max_{k != target} logit_k`` can break the ties (METHODS.md §3, ties).

    Args:
        teacher: frozen teacher (input side ``H = teacher.data_config.image_size``).
        patches_norm: ``(P,3,s,s)`` normalised patches on the teacher's device.
        target: class index (teacher logit order).
        precision: ``"float32"`` (the released code) or ``"float64"``.
        model64: the float64 network for ``precision="float64"`` (:func:`float64_model`; made
            here when None).

    Returns:
        ``(ce, margin)``: ``(P,)`` cross-entropies in nats and logit margins, float64 when
        ``precision="float64"`` else float32, on the CPU (NaN/inf if the teacher gives them).

    Raises:
        ValueError: unknown ``precision``.
    """
    if precision not in ("float32", "float64"):
        raise ValueError(f"precision must be 'float32' or 'float64', got {precision!r}")
    if precision == "float64" and model64 is None:
        model64 = float64_model(teacher)
    size = teacher.data_config.image_size
    ces, margins = [], []
    for k in range(0, len(patches_norm), SCORE_BATCH):
        x = pad_center(patches_norm[k:k + SCORE_BATCH], size)
        logits = model64(x.double()) if precision == "float64" else teacher(x).float()
        tgt = torch.full((len(logits),), int(target), dtype=torch.long, device=logits.device)
        ces.append(F.cross_entropy(logits, tgt, reduction="none").cpu())
        others = logits.clone()
        others[:, int(target)] = -torch.inf
        margins.append((logits[:, int(target)] - others.max(1).values).cpu())
    if not ces:
        dtype = torch.float64 if precision == "float64" else torch.float32
        return torch.zeros(0, dtype=dtype), torch.zeros(0, dtype=dtype)
    return torch.cat(ces), torch.cat(margins)


def rank(key: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """Indices that sort ``key`` ascending along the last dimension (lower = better; METHODS.md
    §3): a stable sort, so exact ties keep index order (the released code's ``argsort`` leaves
    them undefined); with ``margin`` (same shape), exact ties go to the larger margin first.

    Returns:
        int64 indices, same shape as ``key``.
    """
    if margin is None:
        return torch.sort(key, dim=-1, stable=True).indices
    by_margin = torch.sort(-margin, dim=-1, stable=True).indices
    then_key = torch.sort(torch.gather(key, -1, by_margin), dim=-1, stable=True).indices
    return torch.gather(by_margin, -1, then_key)


def count_ties(key: torch.Tensor) -> int:
    """Number of entries of ``key`` (1-D) whose value equals another entry's exactly."""
    if len(key) < 2:
        return 0
    _, counts = torch.unique(key, return_counts=True)
    return int(counts[counts > 1].sum())


def stitch(patches: torch.Tensor, ipc: int, factor: int, size: int) -> torch.Tensor:
    """Stitch ranked patches into ``ipc`` images of ``factor x factor`` grids (METHODS.md §3).

    Output image ``j`` holds the patches ranked ``j, j+ipc, j+2*ipc, ...`` in row-major slots
    (the released RDED code's ``mix_images``); when ``size`` is not a multiple of ``factor`` the
    first ``size % factor`` rows / columns are one pixel larger and the patch is resized to fit.

    Args:
        patches: ``(ipc * factor**2, 3, s, s)`` patches in rank order, any pixel space.
        ipc: images per class.
        factor: grid side.
        size: output image side in pixels.

    Returns:
        ``(ipc, 3, size, size)`` images (same pixel space and device as ``patches``).
    """
    if len(patches) != ipc * factor * factor:
        raise ValueError(f"stitch needs {ipc * factor * factor} patches, got {len(patches)}")
    base, extra = divmod(size, factor)
    sides = [base + 1 if r < extra else base for r in range(factor)]
    starts = [sum(sides[:r]) for r in range(factor)]
    out = patches.new_zeros(ipc, 3, size, size)
    slot = 0
    for r in range(factor):
        for c in range(factor):
            part = patches[slot * ipc:(slot + 1) * ipc]
            if part.shape[-2:] != (sides[r], sides[c]):
                part = F.interpolate(part, size=(sides[r], sides[c]), mode="bilinear",
                                     align_corners=False)
            out[:, :, starts[r]:starts[r] + sides[r], starts[c]:starts[c] + sides[c]] = part
            slot += 1
    return out


def cidd_rank(cam: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CIDD step 2 (METHODS.md §4.2): each candidate box's CAM ratio ``sum_box C / sum C`` and the
    candidates of each image ordered by it, HIGHEST first (stable); CIDD keeps the first ``top_t``.
    The one ranking used by the distiller (:class:`~nrrdd_core.methods.nrrdd.NRRDD`) and the
    explorer (:func:`cidd_candidates`).

    Args:
        cam: CAMs ``(n,H,W)`` in [0,1], one per real image (for its class).
        boxes: int64 ``(n,m,4)`` candidate boxes ``(i, j, h, w)`` in pixels.

    Returns:
        ``(ratio, order)``: ``(n,m)`` float ratios in [0,1] (CPU) and ``(n,m)`` int64 positions
        along ``boxes``' ``m`` axis, highest ratio first.
    """
    n, m = boxes.shape[:2]
    if n == 0:
        return torch.zeros(0, m), torch.zeros(0, m, dtype=torch.long)
    cam = torch.as_tensor(cam).float().cpu()
    ratio = torch.stack([cam_ratio(cam[a], boxes[a].cpu()) for a in range(n)])
    return ratio, torch.sort(ratio, dim=1, descending=True, stable=True).indices


@dataclass
class CIDDCandidates:
    """CIDD candidates of one real image (METHODS.md §4.2), ``m`` of them, sorted by CAM ratio
    (highest first; see :func:`cidd_candidates`).

    Attributes:
        boxes: int64 ``(m,4)`` boxes ``(i, j, h, w)`` in pixels.
        crops01: ``(m,3,H,W)`` [0,1] crops on the CPU, resized to the image side (factor 1).
        ratio: ``(m,)`` CAM ratio ``sum_box C / sum C`` in [0,1].
        confidence: ``(m,)`` teacher probability of the class on each crop, in [0,1].
        kept: ``(m,)`` bool, True for the ``top_t`` boxes by CAM ratio (the ones CIDD scores).
        lowest, highest: position of the candidate that CIDD keeps for this image under
            ``select="lowest"`` / ``"highest"`` (among the kept ones).
    """

    boxes: torch.Tensor
    crops01: torch.Tensor
    ratio: torch.Tensor
    confidence: torch.Tensor
    kept: torch.Tensor
    lowest: int
    highest: int


@torch.no_grad()
def cidd_candidates(teacher: Teacher, x01: torch.Tensor, cam: torch.Tensor, label: int, m: int,
                    top_t: int, seed: int, min_scale: float = 0.08) -> CIDDCandidates:
    """CIDD's candidate crops of one real image, for display (METHODS.md §4.2 steps 1-3).

    ``m`` RandomResizedCrop boxes (:func:`candidate_boxes`, seeded with ``seed``), their CAM
    ratio (:func:`nrrdd_core.cam.cam_ratio`), and the teacher's confidence ``exp(-CE)`` on each
    crop (:func:`crop_patches` at the image side, :func:`patch_cross_entropy`).

    Args:
        teacher: frozen teacher (its data config normalises the image).
        x01: image ``(3,H,W)`` in [0,1]. cam: its CAM ``(H,W)`` in [0,1] for ``label``.
        label: class index (teacher logit order). m: candidates. top_t: kept by CAM ratio.
        seed: seed of the box sampler. min_scale: smallest crop area fraction.

    Returns:
        :class:`CIDDCandidates` sorted by CAM ratio, highest first.
    """
    size = x01.shape[-1]
    boxes = candidate_boxes(1, m, size, make_generator(seed), min_scale)
    ratio, order = cidd_rank(torch.as_tensor(cam)[None], boxes)
    boxes, ratio = boxes[:, order[0]], ratio[0, order[0]]
    x_norm = teacher.data_config.normalize(x01[None].to(teacher.device))
    crops = crop_patches(x_norm, boxes.to(teacher.device), size)
    conf = torch.exp(-patch_cross_entropy(teacher, crops, label))
    kc = conf[:top_t]
    return CIDDCandidates(boxes[0], to01(teacher, crops), ratio, conf, torch.arange(m) < top_t,
                          int(kc.argmin()), int(kc.argmax()))


@dataclass(frozen=True)
class PatchSelectionConfig(ConfigBase):
    """Fields shared by RDED (METHODS.md §3) and NRR-DD's CIDD (METHODS.md §4.2)."""

    mipc: int = param(300, "real images per class scored (fewer if the class has fewer)",
                      unit="images", lo=1, source="code (RDED argument.py, synthesize/main.py)")
    num_crops: int = param(5, "m: RandomResizedCrop candidates per real image", unit="crops",
                           lo=1,
                           source="code (RDED argument.py, synthesize/utils.py MultiRandomCrop)")
    factor: int = param(1, "patches per side of a stitched image (1 for CIFAR/Tiny, 2 for "
                        "ImageNet-scale)", unit="patches", lo=1, hi=8,
                        source="code (RDED argument.py, synthesize/utils.py mix_images)")
    min_scale: float = param(0.08, "smallest candidate crop area as a fraction of the image",
                             unit="1", lo=0.0, hi=1.0, lo_open=True,
                             source="code (RDED synthesize/utils.py MultiRandomCrop)")
    images_per_step: int = param(50, "real images scored per step (bounds a step's time; "
                                 "does not change the result)", unit="images", lo=1,
                                 source="ours", ui=False)


class PatchSelectionDistiller(Distiller):
    """Per-class real-patch selection as a sequence of bounded steps (RDED METHODS.md §3, CIDD METHODS.md §4.2).

    For class ``c`` the first step draws ``n_c = min(mipc, #images of c)`` real images
    (:meth:`Distiller.real_indices`) and ``num_crops`` candidate boxes for each
    (:func:`candidate_boxes`), all with the class's own generator
    (:func:`~nrrdd_core.device.class_generator` of the run's seed and ``c``), so the result does
    not depend on ``images_per_step`` nor on the other classes (:meth:`shard`). Each step scores ``images_per_step`` of those images through
    :meth:`_rank_chunk` (subclass), which returns the candidates it keeps and a rank key (lower =
    better). When the class is complete the ``ipc * factor**2`` best candidates (stable order) are
    cropped again, stitched (:func:`stitch`) and written to :attr:`x0` (normalised,
    ``(N,3,H,W)``; slots of classes not selected yet hold black images).

    Each step's record carries ``"ties"`` (in ``losses`` as a float, for charts and the CLI, and
    in ``info``): how many candidates of the class scored so far share their rank key exactly with
    another (float32 teacher scores of 0.0 are common), and on the class's last step
    ``info["tie_at_cut"]``: whether the kept set was decided by the tie-break.

    Subclasses set :attr:`per_image` (candidates kept per real image) and implement
    :meth:`_rank_chunk`; they call :meth:`_select_step` from ``_step`` for the first
    :attr:`select_steps` steps.

    Raises (constructor):
        DataError: a class has fewer real images than ``ipc * factor**2`` candidates need.
        ConfigError: ``mipc`` is too small for ``ipc * factor**2`` candidates.
    Raises (step):
        NonFiniteLossError: term ``score``, the teacher gave a NaN/inf score (``x0`` unchanged).
    """

    per_image: int = 1
    #: crop and resize the [0,1] images, then normalise the patches (the released RDED order;
    #: in float64 scoring the other order differs by ~1e-5): ``_rank_chunk`` then gets [0,1]
    #: images. False: ``_rank_chunk`` gets normalised images and crops them.
    crop_01: bool = False

    def __init__(self, config: PatchSelectionConfig, **kwargs) -> None:
        super().__init__(config, **kwargs)
        cfg = self.config
        self.size = self.teacher.data_config.image_size
        self.side = self.size // cfg.factor
        if self.side < 1:
            raise ConfigError(f"factor={cfg.factor} is larger than the image side {self.size}px")
        self.n_keep = self.ipc * cfg.factor ** 2
        need = math.ceil(self.n_keep / self.per_image)
        for c in self.classes:
            self.require_images(c, need)
        if cfg.mipc < need:
            raise ConfigError(f"mipc={cfg.mipc} real images give fewer than ipc*factor^2="
                              f"{self.n_keep} candidates: raise mipc to at least {need}")
        counts = self.dataset.train.counts(self.dataset.num_classes)
        self._plan: list[tuple[int, int, int]] = []  # (class position, first image, end image)
        for pos, c in enumerate(self.classes):
            n_c = min(cfg.mipc, int(counts[c]))
            for a in range(0, n_c, cfg.images_per_step):
                self._plan.append((pos, a, min(a + cfg.images_per_step, n_c)))
        lo, _ = self.teacher.data_config.pixel_bounds(self.device)
        self.x0 = lo.expand(len(self.classes) * self.ipc, 3, self.size, self.size).clone()
        self.labels = class_labels(self.classes, self.ipc)
        self._cand: dict | None = None  # candidates of the class in progress
        self._gather: Callable[[torch.Tensor], torch.Tensor] | None = None

    def shard(self, rank: int, world: int, gather: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Select only the classes at positions ``p`` with ``p mod world == rank``
        (:mod:`nrrdd_core.distributed`); after this rank's last selection step :attr:`x0` is
        replaced by ``gather(x0)`` (every rank's classes). Call before the first step."""
        self._plan = [s for s in self._plan if s[0] % world == rank]
        self._gather = gather

    @property
    def select_steps(self) -> int:
        """Number of selection steps (chunks of real images over all classes)."""
        return len(self._plan)

    def _real_norm(self, idx: torch.Tensor) -> torch.Tensor:
        """Training images ``idx`` as normalised ``(n,3,H,W)`` on the device (teacher's
        mean/std)."""
        x01 = self.dataset.train.float01(idx).to(self.device)
        return self.teacher.data_config.normalize(x01)

    @abc.abstractmethod
    def _rank_chunk(self, c: int, x_norm: torch.Tensor, boxes: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """Rank the candidates of a chunk of real images of class ``c``.

        Args:
            c: class index. x_norm: ``(n,3,H,W)`` normalised real images on the device.
            boxes: ``(n, num_crops, 4)`` candidate boxes.

        Returns:
            ``(image, box, key, losses)``: kept candidates' image index in the chunk ``(P,)``
            int64, their boxes ``(P,4)``, rank keys ``(P,)`` (lower = better; finite) or
            ``(P, 2)`` (primary key, then a secondary key for exact ties, lower = better), and
            loss terms for the StepRecord.
        """

    def _select_step(self) -> StepRecord:
        """One chunk of the current class; finishes the class on its last chunk."""
        pos, a, b = self._plan[self.step_index]
        c = self.classes[pos]
        if a == 0:
            gen = class_generator(self.seed, c)
            idx = self.real_indices(c, self.config.mipc, gen)
            self._cand = {"index": idx, "boxes": candidate_boxes(
                len(idx), self.config.num_crops, self.size, gen, self.config.min_scale),
                "image": [], "box": [], "key": []}
        cand = self._cand
        chunk = cand["index"][a:b]
        x = self.dataset.train.float01(chunk).to(self.device) if self.crop_01 else \
            self._real_norm(chunk)
        img, box, key, losses = self._rank_chunk(c, x,
                                                 cand["boxes"][a:b])
        self.check_finite({"score": key.abs().max() if len(key) else 0.0})
        cand["image"].append(img + a)
        cand["box"].append(box)
        cand["key"].append(key)
        keys = torch.cat(cand["key"])
        ties = count_ties(keys[:, 0] if keys.dim() == 2 else keys)
        info = {"class": c, "images": f"{b}/{len(cand['index'])}", "ties": ties}
        finished = b == len(cand["index"])
        if finished:
            info["tie_at_cut"] = self._finish_class(pos)
        if self._gather is not None and self.step_index == len(self._plan) - 1:
            self.x0 = self._gather(self.x0)
        return StepRecord(0, 0, "select", {**losses, "ties": float(ties)},
                          info={**info, "class_done": finished})

    def _finish_class(self, pos: int) -> bool:
        """Stitch the class's best candidates into :attr:`x0`; True when the selection's last
        kept candidate ties (same primary key) with the first dropped one, i.e. the tie-break
        decided which patch was kept."""
        cand, self._cand = self._cand, None
        key = torch.cat(cand["key"])
        # a (P, 2) key is (primary, secondary): exact primary ties go to the lower secondary
        full = rank(key[:, 0], -key[:, 1]) if key.dim() == 2 else rank(key)
        key = key[:, 0] if key.dim() == 2 else key
        order = full[: self.n_keep]
        tie_at_cut = len(full) > self.n_keep and bool(key[full[self.n_keep - 1]]
                                                      == key[full[self.n_keep]])
        image, box = torch.cat(cand["image"])[order], torch.cat(cand["box"])[order]
        if self.crop_01:
            x = self.dataset.train.float01(cand["index"][image]).to(self.device)
            patches = self.teacher.data_config.normalize(crop_patches(x, box.unsqueeze(1),
                                                                      self.side))
        else:
            patches = crop_patches(self._real_norm(cand["index"][image]), box.unsqueeze(1),
                                   self.side)
        sl = slice(pos * self.ipc, (pos + 1) * self.ipc)
        lo, hi = self.teacher.data_config.pixel_bounds(self.device)
        x = stitch(patches, self.ipc, self.config.factor, self.size)
        self.x0[sl] = torch.maximum(torch.minimum(x, hi), lo)
        log.debug("%s: class %d stitched from %d of %d candidates (keys %.4g..%.4g)", self.name,
                  self.classes[pos], self.n_keep, len(key), float(key[order[0]]),
                  float(key[order[-1]]))
        return tie_at_cut

    def _selection_state(self) -> dict:
        return {"x0": cpu_copy(self.x0), "cand": cpu_copy(self._cand)}

    def _load_selection_state(self, state: dict) -> None:
        self.x0 = state["x0"].to(self.device)
        self._cand = state["cand"]



# ---- masked Adam refinement --------------------------------------------------------------------
#: source of the per-resolution recover settings: the released CIFAR, Tiny-ImageNet and ImageNet
#: recover scripts
SRE2L_RECOVER_CODE = "code (SRe2L recover_cifar.py, recover_tiny.py, data_synthesis.py)"

@dataclass(frozen=True)
class RefineConfig(ConfigBase):
    """Adam refinement fields shared by SRe2L recover (METHODS.md §2) and NRR (METHODS.md §4.3); defaults are
    SRe2L's (NRR-DD redeclares lr and iterations)."""

    iterations: int = param(1000, "optimisation iterations (one step each)", unit="steps", lo=1,
                            source="code (SRe2L recover_cifar.py)")
    lr: float = param(0.25, "Adam learning rate (cosine decay to 0)", unit="1", lo=0.0,
                      lo_open=True, source="code (SRe2L recover_cifar.py get_images)")
    beta1: float = param(0.5, "Adam beta1", unit="1", lo=0.0, hi=1.0, hi_open=True,
                         source="code (SRe2L recover_cifar.py get_images)")
    beta2: float = param(0.9, "Adam beta2", unit="1", lo=0.0, hi=1.0, hi_open=True,
                         source="code (SRe2L recover_cifar.py get_images)")
    first_bn_scale: float = param(10.0, "weight of the first BN layer in L_bn", unit="1", lo=0.0,
                                  source="code (SRe2L recover_cifar.py first_bn_multiplier)")
    batch_size: int = param(0, "images optimised together (0 = all jointly; otherwise batches of "
                            "IPC slots mixing classes, each optimised for all iterations in turn)",
                            unit="images", lo=0, source="ours")
    jitter: int = param(-1, "largest roll offset of the recover augmentation; -1 = as released "
                        "for the input side: 4 px up to 64 px, 32 px above", unit="px", lo=-1,
                        source=SRE2L_RECOVER_CODE)
    jitter_mode: str = param("auto", "roll offsets drawn in {0..jitter} (nonnegative) or "
                             "{-jitter..jitter} (symmetric); auto = as released for the input "
                             "side: symmetric at 33-64 px (Tiny-ImageNet), nonnegative otherwise",
                             choices=("auto", "nonnegative", "symmetric"),
                             source=SRE2L_RECOVER_CODE)

    def roll_settings(self, image_size: int) -> tuple[int, bool]:
        """``(max_roll, symmetric)`` of the recover augmentation at ``image_size`` px: the
        explicit :attr:`jitter` / :attr:`jitter_mode`, else the released rule
        (:func:`nrrdd_core.augment.recover_jitter`; METHODS.md §2)."""
        auto_roll, auto_sym = recover_jitter(image_size)
        max_roll = auto_roll if self.jitter < 0 else self.jitter
        symmetric = auto_sym if self.jitter_mode == "auto" else self.jitter_mode == "symmetric"
        return max_roll, symmetric


def slot_batches(num_classes: int, ipc: int, batch_size: int) -> list[torch.Tensor]:
    """Index batches for refinement: images (ordered class by class) taken IPC slot by IPC slot,
    so a batch mixes classes (SRe2L), cut into ``batch_size`` pieces (0 = one batch of all)."""
    order = torch.arange(num_classes * ipc).view(num_classes, ipc).t().reshape(-1)
    return list(order.split(batch_size)) if batch_size > 0 else [order]


class Refiner:
    """Adam refinement of synthetic images with a per-pixel update mask (METHODS.md §2, METHODS.md §4.3 Eq. 5).

    Each :meth:`step` is one iteration on the current batch: ``A = recover_augment``,
    ``L = CE(T(A(x)), y) + bn_weight * L_bn``; the loss is checked finite BEFORE the update; then
    Adam steps, the mask scales the optimiser's update (``x = x_before + M * (x_adam - x_before)``,
    pixels with ``M == 0`` restored exactly: Adam is invariant to a per-pixel gradient scale, so the
    mask cannot go on the gradient), and each channel is clipped to the normalised image of
    [0,1]. The learning rate follows ``lr * 0.5 * (1 + cos(pi * t / iterations))``. Batches
    (:func:`slot_batches`) are optimised one after another, each with a fresh Adam.

    Args:
        teacher: frozen BN teacher (eval mode).
        x: initial images ``(N,3,H,W)`` normalised, on the teacher's device.
        labels: ``(N,)`` int64 targets (teacher logit order).
        cfg: a :class:`RefineConfig`.
        bn_weight: weight of ``L_bn`` (SRe2L ``r_bn``, NRR ``alpha_bn``).
        batches: index batches from :func:`slot_batches`.
        mask: ``(N,1,H,W)`` update weights in [0,1], or None (no mask: plain Adam, SRe2L).
        augment: ``augment(x, generator) -> x_aug`` replacing the recover augmentation (e.g.
            fixed roll offsets in a test); None = :func:`~nrrdd_core.augment.recover_augment`
            with :meth:`RefineConfig.roll_settings`.
        extra_loss: ``extra_loss(x_batch, y_batch, generator) -> (weighted scalar, terms)`` added
            to ``L`` after ``L_bn`` is read (NRR-DD's label refinement, METHODS.md §4.5); its
            float ``terms`` join the step's losses. None = no extra term.

    Attributes:
        x: current images (normalised, detached). mask: may be replaced between steps.
    """

    def __init__(self, teacher: Teacher, x: torch.Tensor, labels: torch.Tensor, cfg: RefineConfig,
                 bn_weight: float, batches: list[torch.Tensor], mask: torch.Tensor | None = None,
                 augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
                 extra_loss: Callable[..., tuple[torch.Tensor, dict]] | None = None):
        self.teacher, self.cfg, self.bn_weight = teacher, cfg, float(bn_weight)
        self.extra_loss = extra_loss
        self.x = x.detach().clone()
        self.labels = labels.to(x.device)
        self.batches = batches
        self.mask = mask
        self.lo, self.hi = teacher.data_config.pixel_bounds(x.device, x.dtype)
        if augment is None:
            size = teacher.data_config.image_size
            max_roll, symmetric = cfg.roll_settings(size)

            def augment(x_: torch.Tensor, g: torch.Generator) -> torch.Tensor:
                return recover_augment(x_, size, g, max_roll, symmetric)
        self.augment = augment
        self._bn: BNStatsLoss | None = None
        self._batch: int | None = None
        self._param = self._opt = self._sched = None

    @property
    def total_steps(self) -> int:
        return len(self.batches) * self.cfg.iterations

    def _start_batch(self, b: int) -> None:
        cfg = self.cfg
        self._batch = b
        self._param = self.x[self.batches[b]].clone().requires_grad_(True)
        self._opt = torch.optim.Adam([self._param], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        self._sched = torch.optim.lr_scheduler.LambdaLR(
            self._opt, lambda t: 0.5 * (1.0 + math.cos(math.pi * t / cfg.iterations)))

    def step(self, i: int, generator: torch.Generator,
             check: Callable[[dict], dict[str, float]]) -> tuple[dict[str, float], dict]:
        """Iteration ``i`` (0-based over :attr:`total_steps`).

        Args:
            generator: CPU generator for the augmentation.
            check: the distiller's ``check_finite`` (raises NonFiniteLossError).

        Returns:
            ``(losses, info)``: ``{"loss", "ce", "bn"}`` floats and ``{"lr", "batch"}``.

        Raises:
            NonFiniteLossError: the loss (term ``loss``/``ce``/``bn``) or Adam's new iterate
                (term ``update``, e.g. an infinite lr) is not finite; the images keep their
                previous values (Adam's moments are not rolled back).
        """
        b, it = divmod(i, self.cfg.iterations)
        if self._batch != b:
            self._start_batch(b)
        if self._bn is None:
            self._bn = BNStatsLoss(self.teacher.model, self.cfg.first_bn_scale)
        idx, p = self.batches[b], self._param
        lr = self._opt.param_groups[0]["lr"]
        x_before = p.detach().clone()
        try:
            x_aug = self.augment(p, generator)
            logits = self.teacher(x_aug)
            ce = F.cross_entropy(logits, self.labels[idx])
            bn = self._bn.value()
            loss = ce + self.bn_weight * bn
            terms = {}
            if self.extra_loss is not None:  # after bn.value(): its forward re-runs the BN hooks
                extra, terms = self.extra_loss(p, self.labels[idx], generator)
                loss = loss + extra
            losses = check({"loss": loss, "ce": ce, "bn": bn, **terms})
            self._opt.zero_grad(set_to_none=True)
            loss.backward()
        finally:
            self._bn.reset()
        self._opt.step()
        self._sched.step()
        with torch.no_grad():
            if not bool(torch.isfinite(p).all()):  # e.g. an infinite learning rate
                p.copy_(x_before)
                check({"update": float("nan")})
            new = p.detach()
            if self.mask is not None:
                m = self.mask[idx]
                new = torch.where(m == 0, x_before, x_before + m * (new - x_before))
            p.copy_(torch.maximum(torch.minimum(new, self.hi), self.lo))
            self.x[idx] = p.detach()
        return losses, {"lr": lr, "batch": b}

    def state_dict(self) -> dict:
        """Images, mask, current batch and its optimiser + scheduler state (CPU copies)."""
        return cpu_copy({"x": self.x, "mask": self.mask, "batch": self._batch,
                         "opt": self._opt.state_dict() if self._opt is not None else None,
                         "sched": self._sched.state_dict() if self._sched is not None else None})

    def load_state_dict(self, state: dict) -> None:
        dev = self.x.device
        self.x = state["x"].to(dev)
        self.mask = state["mask"].to(dev) if state["mask"] is not None else None
        self._batch = self._param = self._opt = self._sched = None
        if state["batch"] is not None:
            self._start_batch(int(state["batch"]))
            self._opt.load_state_dict(state["opt"])
            self._sched.load_state_dict(state["sched"])

    def close(self) -> None:
        """Remove the BN hooks (safe to call twice)."""
        if self._bn is not None:
            self._bn.close()
            self._bn = None
