"""Losses shared by the distillation methods.

:class:`BNStatsLoss` is SRe2L's BN-statistics matching loss (METHODS.md §1.2).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

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
