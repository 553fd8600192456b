"""Constant-memory EDF unroll (METHODS.md §5.7): same gradients as the plain unroll, a graph that
does not grow with syn_steps, and the EDF distiller driven by it."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from nrrdd_core.dsa import DSA_STRATEGIES
from nrrdd_core.experts import ParamLayout, seeded_model
from nrrdd_core.methods.edf import estimate_unroll_bytes, matching_loss, unroll_student
from nrrdd_core.unroll import unroll_recompute

from test_edf import make, run, setup  # noqa: F401  (setup is a fixture)


def _net(dtype=torch.float64):
    net = seeded_model(3, 16, {"depth": 2, "width": 8}, torch.Generator().manual_seed(0)).to(dtype)
    layout = ParamLayout(net)
    return net, layout, layout.flatten(net).to(dtype)


def _grads(fn, strategies, alpha, dtype=torch.float64, steps=7, batch=4):
    net, layout, theta0 = _net(dtype)
    target = theta0 + 0.01 * torch.randn(layout.numel, generator=torch.Generator().manual_seed(5),
                                         dtype=dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 3, 16, 16, generator=g, dtype=dtype).requires_grad_()
    y = torch.randn(10, 3, generator=g, dtype=dtype).requires_grad_()
    lr = torch.tensor(0.05, dtype=dtype, requires_grad=True)
    gen = torch.Generator().manual_seed(2)
    theta_n = fn(net, layout, theta0, x, y, lr, steps, batch, gen, strategies)
    loss, _ = matching_loss(theta_n, theta0, target, alpha)
    loss.backward()
    return theta_n.detach(), x.grad, y.grad, lr.grad, gen.get_state()


@pytest.mark.parametrize("strategies,alpha", [(DSA_STRATEGIES, 0.25), (None, 0.0), (("crop",), 0.0)])
def test_recompute_gradients_equal_the_plain_unroll(strategies, alpha):
    plain = _grads(unroll_student, strategies, alpha)
    rec = _grads(unroll_recompute, strategies, alpha)
    assert torch.allclose(plain[0], rec[0], rtol=0, atol=1e-12)          # theta_N
    assert torch.equal(plain[4], rec[4])                                  # same random draws
    for a, b in zip(plain[1:4], rec[1:4]):                                # d/dx~, d/dY, d/deta
        assert a.abs().max() > 0
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12 * float(a.abs().max()))


def test_recompute_float32_within_float_tolerance():
    plain = _grads(unroll_student, DSA_STRATEGIES, 0.0, torch.float32)
    rec = _grads(unroll_recompute, DSA_STRATEGIES, 0.0, torch.float32)
    for a, b in zip(plain[1:4], rec[1:4]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max()))


def _saved_bytes(fn, steps):
    """Bytes the autograd graph still holds after the unroll (unique storages saved for backward
    by graph nodes that are alive)."""
    live = weakref.WeakSet()

    class Box:
        __slots__ = ("t", "__weakref__")

        def __init__(self, t):
            self.t = t

    def pack(t):
        box = Box(t)
        live.add(box)
        return box

    net, layout, theta0 = _net(torch.float32)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 3, 16, 16, generator=g).requires_grad_()
    y = torch.randn(40, 3, generator=g).requires_grad_()
    lr = torch.tensor(0.05, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.t):
        theta_n = fn(net, layout, theta0, x, y, lr, steps, 8, torch.Generator().manual_seed(2),
                     DSA_STRATEGIES)
    gc.collect()
    held = {b.t.untyped_storage().data_ptr(): b.t.untyped_storage().nbytes() for b in live}
    del theta_n
    return sum(held.values()), layout.numel


def test_recompute_graph_does_not_grow_with_syn_steps():
    p2, numel = _saved_bytes(unroll_student, 2)
    p8, _ = _saved_bytes(unroll_student, 8)
    r2, _ = _saved_bytes(unroll_recompute, 2)
    r8, _ = _saved_bytes(unroll_recompute, 8)
    assert p8 - p2 > 6 * 8 * 3 * 16 * 16 * 4           # plain: at least the 6 extra batches
    assert r8 - r2 == 6 * numel * 4                     # recompute: only the 6 extra iterates
    assert r8 < p8 / 3


def test_memory_estimate_of_the_recompute_unroll(setup):  # noqa: F811
    net, layout, _ = _net(torch.float32)
    plain = [estimate_unroll_bytes(net, layout, 16, 3, s, 10)["bytes"] for s in (8, 80)]
    rec = [estimate_unroll_bytes(net, layout, 16, 3, s, 10, "recompute", 20)["bytes"] for s in (8, 80)]
    assert plain[1] > 8 * plain[0]
    assert rec[1] - rec[0] == 72 * 5 * layout.numel
    assert rec[1] < plain[1] / 5
    est = {}
    for unroll in ("plain", "recompute"):
        d = make(setup, syn_steps=40, batch_syn=6, unroll=unroll)
        d._make_net()
        est[unroll] = d.memory_estimate()["bytes"]
    assert est["recompute"] < est["plain"] / 3


def test_edf_with_the_recompute_unroll_matches_plain(setup):  # noqa: F811
    a = run(make(setup, iterations=3, syn_steps=3))
    b = run(make(setup, iterations=3, syn_steps=3, unroll="recompute"))
    assert torch.allclose(a.images()[0], b.images()[0], atol=1e-4)
    assert torch.allclose(a.y_logits, b.y_logits, atol=1e-4)
    assert abs(float(a.syn_lr.detach()) - float(b.syn_lr.detach())) < 1e-7
    assert [r.info["expert"] for r in a.history] == [r.info["expert"] for r in b.history]
