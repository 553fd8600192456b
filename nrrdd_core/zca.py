"""ZCA whitening (kornia ``ZCAWhitening`` maths, MTT code; METHODS.md §5.1): :class:`ZCA` and
:func:`zca_for` (the ZCA of a dataset's training images, cached)."""

from __future__ import annotations

import logging

import torch

from .data.base import DatasetBundle, dataset_identity
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


def zca_for(bundle: DatasetBundle, eps: float = 0.1) -> ZCA:
    """The ZCA of ``bundle``'s normalised training images, cached under
    ``cache_dir()/zca/<key>.pt``."""
    path = cache_dir() / "zca" / f"{config_key({'data': dataset_identity(bundle), 'eps': eps})}.pt"
    if path.is_file():
        d = safe_torch_load(path)
        return ZCA(d["mean"], d["matrix"], d["inverse"])
    log.info("fitting ZCA (eps %s) on %d images", eps, len(bundle.train))
    zca = ZCA.fit(bundle.config.normalize(bundle.train.float01()), eps)
    atomic_torch_save(zca.state_dict(), path)
    return zca
