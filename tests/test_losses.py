"""BN-statistics loss (METHODS.md §1.2)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nrrdd_core.errors import ConfigError
from nrrdd_core.losses import BNStatsLoss


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def _two_bn_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    for bn in (net[1], net[4]):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


def test_zero_when_batch_stats_equal_running_stats():
    net = nn.Sequential(nn.BatchNorm2d(3), nn.Flatten()).eval()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 + 0.3
    net[0].running_mean.copy_(x.mean((0, 2, 3)))
    net[0].running_var.copy_(x.var((0, 2, 3), unbiased=False))
    with BNStatsLoss(net) as bn:
        net(x)
        assert bn.value().item() == pytest.approx(0.0, abs=1e-6)


def test_matches_hand_computation_with_first_scale():
    net = _two_bn_net()
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2), requires_grad=True)
    a1 = net[0](x)
    a2 = net[3](net[2](net[1](a1)))

    def r(a, bn):
        mu, var = a.mean((0, 2, 3)), a.var((0, 2, 3), unbiased=False)
        return ((var - bn.running_var) ** 2).sum().sqrt() + ((mu - bn.running_mean) ** 2).sum().sqrt()

    expected = 3.0 * r(a1, net[1]) + r(a2, net[4])
    with BNStatsLoss(net, first_scale=3.0) as bn:
        net(x)
        got = bn.value()
        assert bn.num_layers == 2
        torch.testing.assert_close(got, expected)
        got.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert _hooks(net) == 0


def test_value_covers_last_forward_and_needs_one():
    net = _two_bn_net()
    g = torch.Generator().manual_seed(3)
    x1, x2 = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g) * 3
    with BNStatsLoss(net) as bn:
        with pytest.raises(RuntimeError, match="forward"):
            bn.value()
        net(x1)
        net(x2)
        v2 = bn.value()
        bn.reset()
        with pytest.raises(RuntimeError):
            bn.value()
        net(x2)
        torch.testing.assert_close(bn.value(), v2)


def test_hooks_removed_after_exception_and_close_idempotent():
    net = _two_bn_net()
    with pytest.raises(ZeroDivisionError):
        with BNStatsLoss(net):
            assert _hooks(net) == 2
            raise ZeroDivisionError
    assert _hooks(net) == 0
    bn = BNStatsLoss(net)
    bn.close()
    bn.close()
    assert _hooks(net) == 0


def test_rejects_model_without_bn():
    with pytest.raises(ConfigError):
        BNStatsLoss(nn.Sequential(nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4)))
