"""Differentiable, seeded augmentations used by the methods and the student evaluation.

All randomness comes from a ``torch.Generator`` passed in (a CPU generator: parameters are
drawn on the CPU and applied on ``x``'s device); the global RNG is never consumed. Images are
``(N,3,H,W)`` float tensors in any pixel space (normalised or [0,1]) unless said otherwise, and
every function except RandAugment is differentiable w.r.t. ``x``.

Sources: METHODS.md §1.3 (CutMix / Mixup), §1.4 (student augmentation), §2 (SRe2L recover
augmentation); the RandomResizedCrop sampling is torchvision's ``RandomResizedCrop.get_params``
and the crop + resize is torchvision's tensor ``resized_crop`` (bilinear, antialiased) written with
torch alone, so importing this module does not import torchvision (seconds); RandAugment imports
it on use.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError

log = logging.getLogger(__name__)


def _uniform(generator: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
    return torch.empty(1).uniform_(lo, hi, generator=generator).item()


def _randint(generator: torch.Generator, lo: int, hi: int) -> int:
    """Integer in ``[lo, hi)``."""
    return int(torch.randint(lo, hi, (1,), generator=generator).item())


def _beta(generator: torch.Generator, a: float, b: float) -> float:
    """One draw of ``Beta(a, b)`` seeded from ``generator`` (numpy's sampler, torch-seeded)."""
    seed = _randint(generator, 0, 2**62)
    return float(np.random.default_rng(seed).beta(a, b))


def random_resized_crop_params(n: int, size: int | tuple[int, int],
                               scale: tuple[float, float] = (0.08, 1.0),
                               ratio: tuple[float, float] = (3 / 4, 4 / 3),
                               generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample ``n`` RandomResizedCrop boxes with torchvision's algorithm.

    Per box: up to 10 tries of (area fraction ~ U(scale), log aspect ratio ~ U(log ratio)), keep the
    first that fits, with a uniform position; else the centre crop clipped to ``ratio``. With the
    same seed this reproduces ``torchvision.transforms.RandomResizedCrop.get_params``.

    Args:
        n: number of boxes.
        size: image side ``S`` in pixels, or ``(H, W)``.
        scale: range of the crop area as a fraction of the image area.
        ratio: range of the crop aspect ratio (width / height).
        generator: CPU ``torch.Generator`` (required).

    Returns:
        int64 tensor ``(n, 4)`` of boxes ``(i, j, h, w)`` (top row, left column, height, width in
        pixels), each inside the image.
    """
    if generator is None:
        raise ValueError("random_resized_crop_params needs a seeded torch.Generator")
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    boxes = torch.empty(n, 4, dtype=torch.int64)
    for k in range(n):
        for _ in range(10):
            target_area = area * _uniform(generator, scale[0], scale[1])
            aspect = math.exp(_uniform(generator, *log_ratio))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                i = _randint(generator, 0, height - h + 1)
                j = _randint(generator, 0, width - w + 1)
                break
        else:  # centre crop fallback
            in_ratio = width / height
            if in_ratio < min(ratio):
                w, h = width, int(round(width / min(ratio)))
            elif in_ratio > max(ratio):
                h, w = height, int(round(height * max(ratio)))
            else:
                h, w = height, width
            i, j = (height - h) // 2, (width - w) // 2
        boxes[k] = torch.tensor([i, j, h, w])
    return boxes


def _resized_crop(x: torch.Tensor, i: int, j: int, h: int, w: int, size: list[int]) -> torch.Tensor:
    """torchvision's tensor ``resized_crop(x, i, j, h, w, size, antialias=True)`` for a box inside
    the image: crop, then bilinear resize (``align_corners=False``, antialiased; none when the
    crop already has ``size``)."""
    crop = x[..., i:i + h, j:j + w]
    if [h, w] == list(size):
        return crop
    return F.interpolate(crop, size=list(size), mode="bilinear", align_corners=False,
                         antialias=True)


def apply_crops(x: torch.Tensor, boxes: torch.Tensor,
                out_size: int | tuple[int, int]) -> torch.Tensor:
    """Crop box ``k`` out of image ``k`` and resize it bilinearly to ``out_size``.

    Same result as ``torchvision.transforms.v2.functional.resized_crop`` (bilinear, antialias as
    torchvision's RandomResizedCrop); differentiable w.r.t. ``x``.

    Args:
        x: images ``(n,3,H,W)`` on any device, any pixel space.
        boxes: ``(n,4)`` int boxes ``(i, j, h, w)`` (e.g. from :func:`random_resized_crop_params`).
        out_size: output side in pixels, or ``(H_out, W_out)``.

    Returns:
        ``(n,3,H_out,W_out)`` on ``x``'s device.
    """
    if len(boxes) != len(x):
        raise ValueError(f"apply_crops got {len(x)} images but {len(boxes)} boxes")
    size = [out_size, out_size] if isinstance(out_size, int) else list(out_size)
    return torch.cat([_resized_crop(x[k:k + 1], *[int(v) for v in b], size)
                      for k, b in enumerate(boxes.tolist())])


def recover_jitter(image_size: int) -> tuple[int, bool]:
    """SRe2L's released roll jitter for an input side (METHODS.md §2): ``(max_roll, symmetric)``.

    The released recover scripts draw each roll offset with ``random.randint``: ``(0, 4)`` in the
    CIFAR script (``image_size <= 32``), ``(-4, 4)`` in the Tiny-ImageNet script (``<= 64``) and
    ``(0, 32)`` in the ImageNet script (larger). A roll is circular, so the one-sided draws shift
    the content towards the bottom right only. Returns ``(4, False)``, ``(4, True)`` or
    ``(32, False)``.
    """
    if image_size <= 32:
        return 4, False
    if image_size <= 64:
        return 4, True
    return 32, False


def random_roll(x: torch.Tensor, generator: torch.Generator, max_roll: int = 4,
                symmetric: bool = True) -> torch.Tensor:
    """Roll the whole batch by one random shift ``(dy, dx)`` (SRe2L's jitter; the same shift for
    every image): each offset uniform in ``{-max_roll, ..., max_roll}`` when ``symmetric``, else in
    ``{0, ..., max_roll}`` (rows drawn first, then columns)."""
    lo = -max_roll if symmetric else 0
    dy, dx = _randint(generator, lo, max_roll + 1), _randint(generator, lo, max_roll + 1)
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def recover_augment(x: torch.Tensor, image_size: int, generator: torch.Generator,
                    max_roll: int | None = None, symmetric: bool | None = None) -> torch.Tensor:
    """SRe2L's augmentation of the synthetic batch during recovery (METHODS.md §2).

    At ``image_size <= 32``: one random roll shared by the batch. At larger sizes: one
    RandomResizedCrop (scale 0.08-1) shared by the batch, resized back to ``image_size``, then a
    horizontal flip (p = 0.5, shared), then the roll.

    Args:
        x: synthetic images ``(N,3,S,S)`` (normalised pixels), any device.
        image_size: the teacher's input side ``S`` in pixels.
        generator: CPU ``torch.Generator``.
        max_roll: largest roll offset in pixels; None = the released value for ``image_size``
            (:func:`recover_jitter`: 4, 4 or 32).
        symmetric: offsets in ``{-max_roll..max_roll}`` (True) or ``{0..max_roll}`` (False);
            None = the released rule for ``image_size`` (:func:`recover_jitter`).

    Returns:
        augmented images, same shape and device as ``x``; differentiable w.r.t. ``x``.
    """
    auto_roll, auto_sym = recover_jitter(image_size)
    max_roll = auto_roll if max_roll is None else int(max_roll)
    symmetric = auto_sym if symmetric is None else bool(symmetric)
    if image_size > 32:
        box = random_resized_crop_params(1, x.shape[-2:], generator=generator)[0]
        x = _resized_crop(x, *[int(v) for v in box], [image_size, image_size])
        if _uniform(generator) < 0.5:
            x = x.flip(3)
    return random_roll(x, generator, max_roll, symmetric)


def cutmix(x: torch.Tensor, generator: torch.Generator, beta: float = 1.0
           ) -> tuple[torch.Tensor, torch.Tensor, float, tuple[int, int, int, int]]:
    """CutMix of a batch with a random permutation of itself (METHODS.md §1.3; RDED / SRe2L code).

    ``lam ~ Beta(beta, beta)``, partner ``perm = randperm(B)``, box side ratio ``sqrt(1 - lam)`` of
    each side, uniform centre, clipped to the image; the box of image ``b`` is replaced by the same
    box of image ``perm[b]``.

    Args:
        x: images ``(B,3,H,W)``, any device, any pixel space.
        generator: CPU ``torch.Generator``.
        beta: Beta distribution parameter (1.0 = uniform).

    Returns:
        ``(x_mix, perm, lam_true, box)``: ``x_mix`` ``(B,3,H,W)`` (differentiable w.r.t. ``x``),
        ``perm`` int64 ``(B,)`` on CPU, ``lam_true`` in [0,1] = the true fraction of pixels of
        ``x_mix[b]`` taken from ``x[b]`` (``1 - box area / image area``), ``box = (i, j, h, w)``
        in pixels (``h`` or ``w`` may be 0).
    """
    n, _, height, width = x.shape
    lam = _beta(generator, beta, beta)
    perm = torch.randperm(n, generator=generator)
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = _randint(generator, 0, height), _randint(generator, 0, width)
    i0, i1 = min(max(cy - cut_h // 2, 0), height), min(max(cy + cut_h // 2, 0), height)
    j0, j1 = min(max(cx - cut_w // 2, 0), width), min(max(cx + cut_w // 2, 0), width)
    x_mix = x.clone()
    x_mix[:, :, i0:i1, j0:j1] = x[perm.to(x.device), :, i0:i1, j0:j1]
    lam_true = 1.0 - (i1 - i0) * (j1 - j0) / (height * width)
    return x_mix, perm, lam_true, (i0, j0, i1 - i0, j1 - j0)


def mixup(x: torch.Tensor, generator: torch.Generator, alpha: float = 0.8
          ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixup (METHODS.md §1.3): ``x_mix = lam x + (1 - lam) x[perm]``,
    ``lam ~ Beta(alpha, alpha)``.

    Returns:
        ``(x_mix, perm, lam)``: ``x_mix`` like ``x`` (differentiable), ``perm`` int64 ``(B,)`` on
        CPU, ``lam`` in [0,1] (weight of ``x``).
    """
    lam = _beta(generator, alpha, alpha)
    perm = torch.randperm(len(x), generator=generator)
    return lam * x + (1.0 - lam) * x[perm.to(x.device)], perm, lam


def random_flip(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Flip each image horizontally with probability ``p`` (independently per image)."""
    flip = (torch.rand(len(x), generator=generator) < p).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def _randaugment(x01: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """torchvision RandAugment (2 ops, magnitude 9) per image on uint8, seeded from ``generator``.

    torchvision draws from the global RNG; ``fork_rng`` confines that to this call.
    """
    from torchvision.transforms import v2

    ra = v2.RandAugment(num_ops=2)
    u8 = (x01.detach().clamp(0, 1) * 255).round().to(torch.uint8)
    seeds = torch.randint(0, 2**62, (len(x01),), generator=generator).tolist()
    out = []
    devices = [x01.device] if x01.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for img, seed in zip(u8, seeds):
            torch.manual_seed(seed)
            out.append(ra(img))
    return torch.stack(out).to(x01.dtype) / 255.0


@dataclass
class StudentAugParams:
    """The drawn parameters of one student batch's augmentation (METHODS.md §1.4), enough to
    replay it bit for bit (label stores, :mod:`nrrdd_core.labels`).

    Attributes:
        crops: int64 ``(B,4)`` RandomResizedCrop boxes ``(i, j, h, w)`` in source pixels.
        flips: bool ``(B,)``, horizontal flip after the crop.
        ra_seed: seed of the batch's RandAugment draws; ``-1`` when RandAugment is off.
    """

    crops: torch.Tensor
    flips: torch.Tensor
    ra_seed: int = -1


def draw_student_augment(n: int, size: int | tuple[int, int], generator: torch.Generator,
                         factor: float = 1, flip: bool = True,
                         randaugment: bool = False) -> StudentAugParams:
    """Draw the augmentation of a student batch of ``n`` images (METHODS.md §1.4, the RDED
    protocol): RandomResizedCrop boxes with area scale ``(1/factor, 1)``, flips (p = 0.5) when
    ``flip``, and a RandAugment seed when ``randaugment``, in that order from ``generator``.

    Raises:
        ConfigError: ``factor < 1``.
    """
    if factor < 1:
        raise ConfigError(f"student augmentation factor must be >= 1, got {factor}")
    crops = random_resized_crop_params(n, size, scale=(1.0 / factor, 1.0), generator=generator)
    flips = (torch.rand(n, generator=generator) < 0.5) if flip else torch.zeros(n, dtype=torch.bool)
    ra_seed = int(torch.randint(0, 2**62, (1,), generator=generator)) if randaugment else -1
    return StudentAugParams(crops, flips, ra_seed)


def apply_student_augment(x: torch.Tensor, params: StudentAugParams) -> torch.Tensor:
    """Apply drawn parameters to ``x`` ``(B,3,H,W)``: crop and resize back to ``(H,W)``, flip,
    then RandAugment x2 when ``params.ra_seed >= 0`` (on [0,1] pixels; not differentiable, output
    quantised to 1/255). Same shape, dtype and device as ``x``."""
    out = apply_crops(x, params.crops, tuple(x.shape[-2:]))
    out = torch.where(params.flips.to(out.device)[:, None, None, None], out.flip(3), out)
    if params.ra_seed >= 0:
        out = _randaugment(out, torch.Generator(device="cpu").manual_seed(int(params.ra_seed)))
    return out


def student_augment(x: torch.Tensor, generator: torch.Generator, factor: int = 1, flip: bool = True,
                    randaugment: bool = False) -> torch.Tensor:
    """Augmentation of the student's training batch (METHODS.md §1.4, the RDED protocol):
    :func:`draw_student_augment` then :func:`apply_student_augment` (what the KD evaluation's
    batches use, through :func:`nrrdd_core.labels.draw_batch`).

    Per image: RandomResizedCrop with area scale ``(1/factor, 1)`` resized back to the input size,
    a horizontal flip (p = 0.5) when ``flip``, and torchvision RandAugment (2 ops) when
    ``randaugment`` (NRR-DD [paper]).

    Args:
        x: images ``(B,3,H,W)``, any device; **[0,1] pixels when ``randaugment``** (it works on
            uint8), any pixel space otherwise.
        generator: CPU ``torch.Generator``.
        factor: RDED's factor (1 for CIFAR / Tiny, 2 for ImageNet-scale).
        flip: apply the random horizontal flip.
        randaugment: apply RandAugment x2 (not differentiable; output quantised to 1/255).

    Returns:
        augmented images, same shape, dtype and device as ``x``.

    Raises:
        ConfigError: ``factor < 1``.
    """
    params = draw_student_augment(len(x), tuple(x.shape[-2:]), generator, factor, flip, randaugment)
    return apply_student_augment(x, params)
