"""Every loss of the library, in one place.

- :class:`BNStatsLoss`: SRe2L's BN-statistics matching loss (METHODS.md §1.2; SRe2L recover,
  NRR-DD refinement).
- Student losses of the KD protocol (METHODS.md §1.4, §4.4): :func:`soft_kd_loss`,
  :func:`dbr_distances`, :func:`mixed_ce` and :func:`student_loss` (one mixed batch, by label
  mode; the settings are a :class:`~nrrdd_core.labels.LossSpec`).
- Trajectory matching (METHODS.md §5.3): :func:`matching_loss` (with Common Pattern Dropout) and
  :func:`soft_cross_entropy` (the EDF student against learnable label logits).
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

if TYPE_CHECKING:
    from .labels import LossSpec

log = logging.getLogger(__name__)


class BNStatsLoss:
    """BN-statistics loss of SRe2L (METHODS.md §1.2): match batch statistics to running statistics.

    Registers a forward hook on every :class:`torch.nn.BatchNorm2d` of ``model`` (module order).
    For BN layer ``l`` with input ``a_l`` of shape ``(B, C_l, H_l, W_l)`` it records
    ``R_l = ||var_l - running_var_l||_2 + ||mu_l - running_mean_l||_2`` where ``mu_l`` is the mean
    and ``var_l`` the biased variance over ``(B, H, W)`` (plain L2 norms, not squared).
    :meth:`value` returns ``L_bn = sum_l s_l R_l`` with ``s_1 = first_scale`` (first BN layer) and
    ``s_l = 1`` otherwise, over the most recent forward pass. The terms keep the autograd graph,
    so ``value()`` is differentiable w.r.t. the input images.

    Use as a context manager (hooks are removed on exit, also after an exception) or call
    :meth:`close` (idempotent)::

        with BNStatsLoss(teacher.model) as bn:
            logits = teacher.model(x)
            loss = ce(logits, y) + r_bn * bn.value()

    Args:
        model: network containing ``BatchNorm2d`` layers with running statistics (eval mode so that
            the forward does not update them).
        first_scale: weight ``s_1`` of the first BN layer (SRe2L: 10).

    Raises:
        ConfigError: ``model`` has no ``BatchNorm2d`` layer with running statistics.
    """

    def __init__(self, model: nn.Module, first_scale: float = 10.0):
        self.first_scale = float(first_scale)
        self._layers = [m for m in model.modules()
                        if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None]
        if not self._layers:
            raise ConfigError("BNStatsLoss needs a model with BatchNorm2d layers that track "
                             "running statistics: use a BN teacher (convnet_bn or a ResNet)")
        self._terms: list[torch.Tensor | None] = [None] * len(self._layers)
        self._handles = [m.register_forward_hook(self._make_hook(i))
                         for i, m in enumerate(self._layers)]

    def _make_hook(self, idx: int):
        def hook(module: nn.BatchNorm2d, inputs, output) -> None:
            # one fused pass for both statistics (biased variance, as BN itself uses)
            var, mu = torch.var_mean(inputs[0], dim=(0, 2, 3), correction=0)
            self._terms[idx] = (torch.linalg.vector_norm(var - module.running_var)
                                + torch.linalg.vector_norm(mu - module.running_mean))
        return hook

    @property
    def num_layers(self) -> int:
        """Number of hooked BN layers."""
        return len(self._layers)

    def layer_terms(self) -> list[torch.Tensor]:
        """Unweighted ``R_l`` of each BN layer (scalar tensors) from the most recent forward.

        Raises:
            RuntimeError: no forward pass reached every BN layer since construction/:meth:`reset`.
        """
        if any(t is None for t in self._terms):
            raise RuntimeError("BNStatsLoss.value() called before a forward pass of the model "
                               "(or after reset()): run the model on a batch first")
        return list(self._terms)

    def value(self) -> torch.Tensor:
        """``L_bn = sum_l s_l R_l`` (scalar tensor, differentiable) of the most recent forward.

        Raises:
            RuntimeError: no forward pass since construction or the last :meth:`reset`.
        """
        terms = self.layer_terms()
        return self.first_scale * terms[0] + sum(terms[1:], torch.zeros_like(terms[0]))

    def reset(self) -> None:
        """Forget the recorded terms (releases their autograd graph)."""
        self._terms = [None] * len(self._layers)

    def close(self) -> None:
        """Remove the hooks and forget the terms; safe to call twice."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.reset()

    def __enter__(self) -> "BNStatsLoss":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def soft_cross_entropy(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum_c softmax(target)_c log softmax(logits)_c`` (METHODS.md §5.3:
    EDF's student loss against learnable label logits); both ``(B, C)``, result in nats."""
    return -(F.softmax(target_logits, 1) * F.log_softmax(logits, 1)).sum(1).mean()


# ---- student losses of the KD protocol (METHODS.md §1.4, §4.4) -------------------------------
def dbr_distances(logits: torch.Tensor, y: torch.Tensor, y_perm: torch.Tensor,
                  temperature: float = 1.0) -> torch.Tensor:
    """DBR distances (METHODS.md §4.4): ``(B,2)`` = ``[CE(p, onehot(y)), CE(p, onehot(y_pi))]`` with
    ``p = softmax(logits / temperature)``, in nats (>= 0). Differentiable w.r.t. ``logits``."""
    logp = F.log_softmax(logits / temperature, dim=1)
    return -torch.stack([logp.gather(1, y[:, None])[:, 0], logp.gather(1, y_perm[:, None])[:, 0]], 1)


def mixed_ce(logits: torch.Tensor, y: torch.Tensor, y_perm: torch.Tensor, lam: float) -> torch.Tensor:
    """Per-sample soft cross-entropy ``(B,)`` against ``y_mix = lam e_y + (1 - lam) e_{y_pi}``
    (temperature 1), in nats."""
    logp = F.log_softmax(logits, dim=1)
    return -(lam * logp.gather(1, y[:, None])[:, 0] + (1.0 - lam) * logp.gather(1, y_perm[:, None])[:, 0])


def soft_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    """``KL(softmax(T/tau) || softmax(S/tau))``, batchmean, no ``tau^2`` (METHODS.md §1.4)."""
    return F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                    F.log_softmax(teacher_logits.float() / temperature, dim=1),
                    reduction="batchmean", log_target=True)


def student_loss(student_logits: torch.Tensor, values: torch.Tensor | None, y: torch.Tensor,
                 y_perm: torch.Tensor, lam: float, spec: LossSpec) -> tuple[torch.Tensor, dict]:
    """The student's loss on one mixed batch and its terms (floats, for display).

    - soft: :func:`soft_kd_loss` against teacher logits ``values`` ``(B,C)``.
    - dbr: ``L_S = L_sce + alpha_dbr * L_dbr`` with ``L_sce = mean(relu(mixed_ce - r))`` and
      ``L_dbr = mean(|d^S_org - d^T_org| + |d^S_aug - d^T_aug|)`` (squares with ``"l2"``),
      ``values`` = teacher distances ``(B,2)`` (METHODS.md §4.4).
    - hard: ``mean(mixed_ce)`` (one-hot targets mixed with the true fraction ``lam``).
    """
    if spec.mode == "soft":
        loss = soft_kd_loss(student_logits, values, spec.temperature)
        return loss, {"kd": float(loss.detach())}
    if spec.mode == "hard":
        loss = mixed_ce(student_logits, y, y_perm, lam).mean()
        return loss, {"ce": float(loss.detach())}
    sce = F.relu(mixed_ce(student_logits, y, y_perm, lam) - spec.dbr_radius).mean()
    diff = dbr_distances(student_logits, y, y_perm, spec.dbr_temperature) - values.float()
    dbr = (diff.abs() if spec.dbr_norm == "l1" else diff.pow(2)).sum(1).mean()
    loss = sce + spec.alpha_dbr * dbr
    return loss, {"sce": float(sce.detach()), "dbr": float(dbr.detach())}


# ---- trajectory matching (METHODS.md §5.3) ---------------------------------------------------
def matching_loss(theta_n: torch.Tensor, theta0: torch.Tensor, target: torch.Tensor,
                  alpha: float = 0.0) -> tuple[torch.Tensor, int]:
    """Normalised parameter-matching loss with Common Pattern Dropout (METHODS.md §5.3, §5.4).

    ``e = (theta_N - target)^2``, ``d = (theta0 - target)^2`` per scalar (``(P,)``); the
    ``floor(alpha P)`` smallest ``e`` are dropped and ``L = sum_keep e / sum_keep d``. With
    ``alpha = 0`` this is ``||theta_N - target||^2 / ||theta0 - target||^2``.

    Args:
        theta_n: ``(P,)`` unrolled student parameters (differentiable).
        theta0, target: ``(P,)`` expert snapshots at ``t`` and ``t+M``.
        alpha: CPD fraction in [0, 1).

    Returns:
        ``(L, dropped)``: scalar loss and the number of dropped entries.

    Raises:
        ConfigError: alpha outside [0, 1).
    """
    if not 0.0 <= alpha < 1.0:
        raise ConfigError(f"CPD alpha must be in [0, 1), got {alpha}")
    e = (theta_n - target) ** 2
    d = (theta0 - target) ** 2
    drop = math.floor(alpha * e.numel())
    if drop == 0:
        return e.sum() / d.sum(), 0
    keep = torch.topk(e.detach(), e.numel() - drop, sorted=False).indices
    return e[keep].sum() / d[keep].sum(), drop
