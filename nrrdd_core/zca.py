"""ZCA whitening (kornia ``ZCAWhitening`` maths, MTT code; METHODS.md §5.1): :class:`ZCA` and
:func:`zca_for` (the ZCA of a dataset's training images, cached)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .data.base import DatasetBundle, dataset_identity
from .errors import CheckpointError
from .io import atomic_torch_save, cache_dir, config_key, safe_torch_load

log = logging.getLogger(__name__)


class ZCA:
    """ZCA whitening of flattened normalised images (kornia ``ZCAWhitening`` maths, MTT code):
    ``W = U diag(1/sqrt(S + eps)) U^T`` from the unbiased covariance of the training images.

    Attributes:
        mean: ``(D,)`` with ``D = 3 H W``; matrix: ``(D, D)`` whitening; inverse: ``(D, D)``.
    """

    def __init__(self, mean: torch.Tensor, matrix: torch.Tensor, inverse: torch.Tensor):
        self.mean, self.matrix, self.inv = mean, matrix, inverse

    @classmethod
    def fit(cls, x: torch.Tensor, eps: float = 0.1) -> "ZCA":
        """Fit on ``(N,3,H,W)`` normalised images (float64 internally)."""
        flat = x.reshape(len(x), -1).double()
        mean = flat.mean(0)
        xc = flat - mean
        cov = xc.T @ xc / max(len(x) - 1, 1)
        u, s, _ = torch.linalg.svd(cov)
        w = u @ torch.diag((s + eps).rsqrt()) @ u.T
        winv = u @ torch.diag((s + eps).sqrt()) @ u.T
        return cls(mean.float(), w.float(), winv.float())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Whiten ``(N,3,H,W)`` normalised images (same shape)."""
        m, w = self.mean.to(x.device), self.matrix.to(x.device)
        return ((x.reshape(len(x), -1) - m) @ w).view_as(x)

    def invert(self, z: torch.Tensor) -> torch.Tensor:
        """Whitened ``(N,3,H,W)`` -> normalised images (same shape)."""
        m, wi = self.mean.to(z.device), self.inv.to(z.device)
        return (z.reshape(len(z), -1) @ wi + m).view_as(z)

    def state_dict(self) -> dict:
        return {"mean": self.mean, "matrix": self.matrix, "inverse": self.inv}

    @classmethod
    def from_state(cls, d, where: str | Path = "ZCA state", dim: int | None = None) -> "ZCA":
        """A ZCA from :meth:`state_dict` content, checked: ``mean`` ``(D,)``, ``matrix`` and
        ``inverse`` ``(D, D)`` finite tensors, ``D == dim`` when given.

        Raises:
            CheckpointError: naming ``where`` and what is wrong.
        """
        keys = ("mean", "matrix", "inverse")
        if not isinstance(d, dict) or not all(isinstance(d.get(k), torch.Tensor) for k in keys):
            raise CheckpointError(f"{where} is not a ZCA file (tensors {', '.join(keys)})")
        n = d["mean"].numel()
        if tuple(d["mean"].shape) != (n,) or any(tuple(d[k].shape) != (n, n) for k in keys[1:]) \
                or (dim is not None and n != dim):
            shapes = [tuple(d[k].shape) for k in keys]
            raise CheckpointError(f"{where}: ZCA tensors of shapes {shapes} do not fit images of "
                                  f"{dim or 'D'} values")
        if not all(bool(torch.isfinite(d[k]).all()) for k in keys):
            raise CheckpointError(f"{where}: ZCA tensors hold NaN or inf")
        return cls(d["mean"].float(), d["matrix"].float(), d["inverse"].float())


def zca_for(bundle: DatasetBundle, eps: float = 0.1) -> ZCA:
    """The ZCA of ``bundle``'s normalised training images, cached under
    ``cache_dir()/zca/<key>.pt`` (a truncated or damaged cache file is fitted and written again)."""
    path = cache_dir() / "zca" / f"{config_key({'data': dataset_identity(bundle), 'eps': eps})}.pt"
    if path.is_file():
        try:
            return ZCA.from_state(safe_torch_load(path), path, 3 * bundle.config.image_size ** 2)
        except CheckpointError as exc:  # a damaged cache entry is rebuilt
            log.warning("%s; fitting the ZCA again", exc)
    log.info("fitting ZCA (eps %s) on %d images", eps, len(bundle.train))
    zca = ZCA.fit(bundle.config.normalize(bundle.train.float01()), eps)
    atomic_torch_save(zca.state_dict(), path)
    return zca
