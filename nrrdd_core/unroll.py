"""Constant-memory unrolling of the EDF / DATM student (METHODS.md §5.7; TESLA, Cui et al. 2023).

The plain unroll (:func:`nrrdd_core.methods.edf.unroll_student`) keeps the autograd graph of
all ``syn_steps`` student steps until the matching loss is backpropagated, so its memory is
linear in ``syn_steps x batch_syn``. :func:`unroll_recompute` computes the same ``theta_N`` and
the same gradients with respect to the synthetic images ``x~``, the label logits ``Y`` and the
student lr ``eta``, but keeps no graph between steps:

- forward: the ``syn_steps`` SGD steps are taken without a graph (first-order gradients only);
  each step's parameter iterate ``theta_k`` ``(P,)``, its mini-batch indices and the state of
  the generator before its DSA draw are stored (``4 P`` bytes + a few KiB per step: 1.2 MiB for
  ConvNet-3 at 32 px, against about 2.9 MiB per *image*-step for the plain graph);
- backward: given the adjoint ``a_N = dL/dtheta_N``, the steps are walked in reverse. Step
  ``k`` is recomputed with ``create_graph=True`` (same images, same DSA parameters),
  ``g_k = grad_theta CE(f(theta_k; DSA(x~[I_k])), softmax(Y[I_k]))``, and the vector-Jacobian
  products of ``theta_{k+1} = theta_k - eta g_k`` give::

      dL/dx~[I_k] += -eta d(g_k . a_{k+1})/dx~[I_k]      dL/dY[I_k] += -eta d(g_k . a_{k+1})/dY[I_k]
      dL/deta     += -(g_k . a_{k+1})                     a_k = a_{k+1} - eta d(g_k . a_{k+1})/dtheta_k

  so the peak memory is the graph of ONE step (plus the stored iterates): it does not grow with
  ``syn_steps`` the way the plain graph does. The price is one more forward and backward per step.

The result is exact (not TESLA's approximation that drops the dependence of later iterates on
earlier images): gradients equal the plain unroll's up to floating-point summation order.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.func import functional_call

from .dsa import dsa
from .losses import soft_cross_entropy
from .models.flat import ParamLayout

#: the unroll choices of :class:`~nrrdd_core.methods.edf.EDFConfig` ``unroll``
UNROLLS = ("plain", "recompute")


def _draw_batches(n: int, b: int, syn_steps: int, generator: torch.Generator):
    """Yield each step's indices exactly as the plain unroll draws them: the next ``b`` indices of
    a random permutation of the ``n`` images, refilled when used up (MTT code)."""
    chunks: list[torch.Tensor] = []
    for _ in range(syn_steps):
        if not chunks:
            chunks = list(torch.randperm(n, generator=generator).split(b))
        yield chunks.pop(0)


def _student_grad(net: nn.Module, layout: ParamLayout, theta: torch.Tensor, xb: torch.Tensor,
                  yb: torch.Tensor, generator: torch.Generator | None,
                  strategies: Sequence[str] | None, create_graph: bool) -> torch.Tensor:
    """``grad_theta`` of the soft cross-entropy of one student step on ``DSA(xb)``."""
    if strategies:
        xb = dsa(xb, generator, strategies)
    out = functional_call(net, layout.unflatten(theta), (xb,))
    return torch.autograd.grad(soft_cross_entropy(out, yb), theta, create_graph=create_graph)[0]


class _RecomputeUnroll(torch.autograd.Function):
    """``theta_N = unroll(theta0, x~, Y, eta)`` with the reverse walk of the module docstring."""

    @staticmethod
    def forward(ctx, theta0, x_syn, y_logits, lr, net, layout, syn_steps, batch_syn, generator,
                strategies):
        n = len(x_syn)
        b = min(batch_syn, n)
        x, y, eta = x_syn.detach(), y_logits.detach(), lr.detach()
        iterates, indices, states = [], [], []
        theta = theta0.detach()
        with torch.enable_grad():
            for idx in _draw_batches(n, b, syn_steps, generator):
                idx = idx.to(x.device)
                iterates.append(theta)
                indices.append(idx)
                states.append(generator.get_state() if strategies else None)
                t = theta.detach().requires_grad_(True)
                g = _student_grad(net, layout, t, x[idx], y[idx], generator, strategies, False)
                theta = (t - eta * g).detach()
        ctx.net, ctx.layout, ctx.strategies = net, layout, strategies
        ctx.gen_device = generator.device
        ctx.indices, ctx.states = indices, states
        ctx.save_for_backward(x, y, eta, *iterates)
        return theta

    @staticmethod
    def backward(ctx, grad_theta_n):
        x, y, eta, *iterates = ctx.saved_tensors
        gx, gy = torch.zeros_like(x), torch.zeros_like(y)
        glr = torch.zeros_like(eta)
        a = grad_theta_n.detach()
        replay = torch.Generator(device=ctx.gen_device)
        for k in range(len(iterates) - 1, -1, -1):
            idx = ctx.indices[k]
            if ctx.states[k] is not None:
                replay.set_state(ctx.states[k])
            with torch.enable_grad():
                t = iterates[k].detach().requires_grad_(True)
                xb = x[idx].requires_grad_(True)
                yb = y[idx].requires_grad_(True)
                g = _student_grad(ctx.net, ctx.layout, t, xb, yb, replay, ctx.strategies, True)
                ga = (g * a).sum()
                dt, dx, dy = torch.autograd.grad(ga, (t, xb, yb), allow_unused=True)
            glr -= ga.detach()
            if dx is not None:
                gx.index_add_(0, idx, -eta * dx)
            if dy is not None:
                gy.index_add_(0, idx, -eta * dy)
            a = a - eta * dt if dt is not None else a
        need = ctx.needs_input_grad
        return (a if need[0] else None, gx if need[1] else None, gy if need[2] else None,
                glr if need[3] else None, None, None, None, None, None, None)


def unroll_recompute(net: nn.Module, layout: ParamLayout, theta0: torch.Tensor,
                     x_syn: torch.Tensor, y_logits: torch.Tensor, lr: torch.Tensor,
                     syn_steps: int, batch_syn: int, generator: torch.Generator,
                     strategies: Sequence[str] | None) -> torch.Tensor:
    """The student unroll of METHODS.md §5.3 step 2 in constant graph memory (METHODS.md §5.7).

    Same arguments, same random draws (the generator ends in the same state), same ``theta_N``
    and same gradients as :func:`nrrdd_core.methods.edf.unroll_student` (up to float summation
    order); see the module docstring for the reverse walk. Source: ours, after TESLA (Cui et al.
    2023, "Scaling up dataset distillation to ImageNet-1K with constant memory"), exact.

    Args:
        net: the student architecture (its own parameters are not used).
        layout: the :class:`ParamLayout` of ``net``.
        theta0: ``(P,)`` start parameters (treated as a constant, as in the plain unroll).
        x_syn: ``(N,3,H,W)`` synthetic images (normalised), usually requiring grad.
        y_logits: ``(N,C)`` label logits, usually requiring grad.
        lr: scalar learnable student lr.
        syn_steps, batch_syn: N_syn and the mini-batch size (capped at N).
        generator: generator of the permutations and DSA (its state per step is replayed).
        strategies: DSA strategies, or None for no augmentation.

    Returns:
        ``theta_N`` ``(P,)``, differentiable with respect to ``x_syn``, ``y_logits`` and ``lr``
        (its backward recomputes each step).
    """
    strategies = tuple(strategies) if strategies else None
    return _RecomputeUnroll.apply(theta0.detach(), x_syn, y_logits, lr, net, layout, int(syn_steps),
                                  int(batch_syn), generator, strategies)


def recompute_bytes(per_step: int, per_image: int, batch: int, syn_steps: int, numel: int,
                    num_images: int, image_numel: int, num_classes: int) -> int:
    """Peak bytes of one outer iteration with :func:`unroll_recompute` (METHODS.md §5.7): the graph
    of ONE step, built with ``create_graph`` and walked once more by the vector-Jacobian product
    (counted three times: graph, its backward's temporaries, allocator slack), the ``syn_steps``
    stored parameter iterates ``(P,)`` float32 (plus 25 % allocator slack), the adjoint and the
    gradient accumulators of ``x~ (N,3,H,W)`` and ``Y (N,C)``. Calibrated against
    ``bench/memory.py`` (measured peak RSS on the CPU: 93, 116, 208 MiB at syn_steps 8, 20, 80 for
    ConvNet-3 at 32 px, batch_syn 10).

    Args:
        per_step, per_image: bytes of one plain step's graph that do not / do scale with the batch
            (:func:`nrrdd_core.methods.edf.unroll_bytes_per_step` differences).
        batch: images per step. syn_steps: N_syn. numel: P. num_images: N.
        image_numel: ``3 H W``. num_classes: C.
    """
    graph = 3 * (per_step + per_image * batch)
    return int(graph + 5 * numel * (syn_steps + 4) + 4 * num_images * (image_numel + num_classes))
