"""Differentiable Siamese Augmentation (DSA) of trajectory matching (METHODS.md §5.2; DC/DSA, MTT, DATM
code).

Each call picks ONE strategy per mini-batch from the configured list and draws its parameters per
sample. Every operation is differentiable with respect to the images, so gradients flow back to
synthetic images through the augmentation. Random numbers come from the ``torch.Generator``
passed in (a CPU generator: parameters are drawn on the CPU and then moved to the images'
device), so the same generator state gives the same output on every device.

Images are ``(N,3,H,W)`` float tensors in *normalised* pixel space (the DSA code works there too).

Strategies (DSA code constants):
    ``color``: brightness ``x + (u - 0.5)``, then saturation ``(x - mean_c) * 2u + mean_c``
        (mean over channels, per pixel), then contrast ``(x - mean) * (u + 0.5) + mean`` (mean
        over C,H,W per image), each with its own ``u ~ U(0,1)`` per sample.
    ``crop``: translate by integer shifts in ``[-round(0.125 H), round(0.125 H)]`` per axis,
        zero fill.
    ``cutout``: zero a square of side ``round(H/2)`` at a random centre (clipped at the border).
    ``flip``: horizontal flip with probability 0.5.
    ``scale``: scale each axis by ``U(1/1.2, 1.2)`` (bilinear, zero padding).
    ``rotate``: rotate by ``U(-15, 15)`` degrees (bilinear, zero padding).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .errors import ConfigError

#: Strategy names in the DSA code's order (``"color_crop_cutout_flip_scale_rotate"``).
DSA_STRATEGIES: tuple[str, ...] = ("color", "crop", "cutout", "flip", "scale", "rotate")

_SCALE = 1.2
_ROTATE_DEG = 15.0
_CROP_PAD = 0.125
_CUTOUT = 0.5


def _rand(n: int, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """``(n,1,1,1)`` uniform numbers drawn on CPU with ``generator``, moved to ``like``."""
    return torch.rand(n, 1, 1, 1, generator=generator).to(device=like.device, dtype=like.dtype)


def _color(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    x = x + (_rand(n, g, x) - 0.5)
    m = x.mean(dim=1, keepdim=True)
    x = (x - m) * (_rand(n, g, x) * 2.0) + m
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - m) * (_rand(n, g, x) + 0.5) + m


def _shift_grid(n: int, h: int, w: int, dy: torch.Tensor, dx: torch.Tensor, device) -> tuple:
    rows = torch.arange(h, device=device).view(1, h, 1) + dy.view(n, 1, 1)
    cols = torch.arange(w, device=device).view(1, 1, w) + dx.view(n, 1, 1)
    return rows, cols


def _crop(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n, _, h, w = x.shape
    sh, sw = int(h * _CROP_PAD + 0.5), int(w * _CROP_PAD + 0.5)
    dy = torch.randint(-sh, sh + 1, (n,), generator=g).to(x.device)
    dx = torch.randint(-sw, sw + 1, (n,), generator=g).to(x.device)
    rows, cols = _shift_grid(n, h, w, dy, dx, x.device)
    valid = ((rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)).unsqueeze(1)
    r, c = rows.clamp(0, h - 1).expand(n, h, w), cols.clamp(0, w - 1).expand(n, h, w)
    b = torch.arange(n, device=x.device).view(n, 1, 1).expand(n, h, w)
    out = x.permute(0, 2, 3, 1)[b, r, c].permute(0, 3, 1, 2)
    return out * valid.to(x.dtype)


def _cutout(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n, _, h, w = x.shape
    ch, cw = int(h * _CUTOUT + 0.5), int(w * _CUTOUT + 0.5)
    cy = torch.randint(0, h + (1 - ch % 2), (n,), generator=g).to(x.device)
    cx = torch.randint(0, w + (1 - cw % 2), (n,), generator=g).to(x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1) - (cy.view(n, 1, 1) - ch // 2)
    cols = torch.arange(w, device=x.device).view(1, 1, w) - (cx.view(n, 1, 1) - cw // 2)
    inside = (rows >= 0) & (rows < ch) & (cols >= 0) & (cols < cw)
    return x * (~inside).unsqueeze(1).to(x.dtype)


def _flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return torch.where(_rand(x.shape[0], g, x) < 0.5, x.flip(3), x)


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta.to(device=x.device, dtype=x.dtype), list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


def _scale(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    lo = 1.0 / _SCALE
    sx = torch.rand(n, generator=g) * (_SCALE - lo) + lo
    sy = torch.rand(n, generator=g) * (_SCALE - lo) + lo
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = sx, sy
    return _affine(x, theta)


def _rotate(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    a = (torch.rand(n, generator=g) - 0.5) * 2 * _ROTATE_DEG / 180 * math.pi
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = a.cos(), -a.sin()
    theta[:, 1, 0], theta[:, 1, 1] = a.sin(), a.cos()
    return _affine(x, theta)


_FNS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "color": _color, "crop": _crop, "cutout": _cutout, "flip": _flip, "scale": _scale,
    "rotate": _rotate}


def check_strategies(strategies: Sequence[str]) -> tuple[str, ...]:
    """Validate a strategy list (names from :data:`DSA_STRATEGIES`).

    Raises:
        ConfigError: empty list or an unknown name.
    """
    out = tuple(str(s).strip() for s in strategies if str(s).strip())
    bad = [s for s in out if s not in _FNS]
    if not out or bad:
        raise ConfigError(f"DSA strategies must be a non-empty subset of {list(DSA_STRATEGIES)}; "
                          f"got {list(strategies)}")
    return out


def dsa_apply(x: torch.Tensor, strategy: str, generator: torch.Generator) -> torch.Tensor:
    """Apply one named DSA strategy with per-sample parameters.

    Args:
        x: ``(N,3,H,W)`` float images (normalised pixels), any device; may require grad.
        strategy: one of :data:`DSA_STRATEGIES`.
        generator: CPU ``torch.Generator`` the parameters are drawn from.

    Returns:
        ``(N,3,H,W)`` augmented images, differentiable with respect to ``x``.
    """
    return _FNS[check_strategies([strategy])[0]](x, generator).contiguous()


def dsa(x: torch.Tensor, generator: torch.Generator,
        strategies: Sequence[str] = DSA_STRATEGIES) -> torch.Tensor:
    """DSA of one mini-batch: one strategy drawn uniformly from ``strategies`` (with
    ``generator``), parameters drawn per sample (METHODS.md §5.2).

    Args:
        x: ``(N,3,H,W)`` float images (normalised pixels); may require grad.
        generator: CPU ``torch.Generator``; same state -> same output.
        strategies: subset of :data:`DSA_STRATEGIES`.

    Returns:
        ``(N,3,H,W)`` augmented images on ``x``'s device.

    Raises:
        ConfigError: invalid strategy list.
    """
    names = check_strategies(strategies)
    k = int(torch.randint(len(names), (1,), generator=generator))
    return _FNS[names[k]](x, generator).contiguous()
