"""CAM, Grad-CAM, the grad-cam package wrapper, masks and scores (METHODS.md §4.1, 3.2, 3.3, 4.5, 6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from nrrdd_core.cam import (CAM, CAM_METHODS, CAMS, COLORMAPS, ClassicCAM, GradCAM, cam_ratio,
                            complexity_score, dae_weight, draw_boxes, find_classifier, get_cam,
                            layer_outputs, noncritical_mask, noncritical_share, overlay)
from nrrdd_core.errors import ConfigError


def classic_cam(net, x, y, layer):
    return ClassicCAM(net, layer).attribute(x, y)


def grad_cam(net, x, y, layer):
    return GradCAM(net, layer).attribute(x, y)


def explore_cam(method, net, x, y, layer):
    return get_cam(method)(net, layer).attribute(x, y)


def _gap_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()


def _flat_net() -> nn.Module:
    """ConvNet-like: conv-BN-ReLU-pool x2, flatten, linear."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AvgPool2d(2),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AvgPool2d(2),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 5)).eval()


def _x(n: int = 3, size: int = 16) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(5))


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules())


def _state(model: nn.Module):
    return ([m.training for m in model.modules()],
            [(p.requires_grad, None if p.grad is None else p.grad.clone()) for p in model.parameters()])


def _assert_state(model: nn.Module, state) -> None:
    modes, params = state
    assert [m.training for m in model.modules()] == modes
    for p, (rg, g) in zip(model.parameters(), params):
        assert p.requires_grad == rg
        if g is None:
            assert p.grad is None
        else:
            assert torch.equal(p.grad, g)
    assert _hooks(model) == 0


def _in_range(cam: torch.Tensor) -> bool:
    return bool(torch.isfinite(cam).all() and cam.min() >= 0 and cam.max() <= 1)


def test_classic_cam_equals_grad_cam_on_gap_net():
    net, x, y = _gap_net(), _x(), torch.tensor([0, 3, 4])
    cam = classic_cam(net, x, y, net[5])
    assert cam.shape == (3, 16, 16) and _in_range(cam)
    torch.testing.assert_close(cam, grad_cam(net, x, y, net[5]), atol=1e-5, rtol=0)
    assert find_classifier(net) is net[8]


def test_flatten_net_cam_and_constant_map():
    net, x, y = _flat_net(), _x(2), torch.tensor([1, 2])
    cam = classic_cam(net, x, y, net[7])
    assert cam.shape == (2, 16, 16) and _in_range(cam)
    assert cam.flatten(1).max(1).values.min() > 0.99  # normalised per image
    with pytest.raises(ConfigError, match="pick the layer"):
        classic_cam(net, x, y, net[6])  # 8x8 map does not fit the 128-input classifier
    # a constant feature map (all-zero conv) gives zeros, never NaN
    dead = _gap_net()
    nn.init.zeros_(dead[3].weight)
    nn.init.zeros_(dead[3].bias)
    for fn in (classic_cam, grad_cam):
        out = fn(dead, x, y, dead[5])
        assert torch.equal(out, torch.zeros_like(out))


def test_grad_cam_matches_pytorch_grad_cam():
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    for net, layer in ((_gap_net(), 5), (_flat_net(), 6)):
        x, y = _x(3), torch.tensor([2, 0, 4])
        ours = grad_cam(net, x, y, net[layer])
        with GradCAM(model=net, target_layers=[net[layer]]) as ref_cam:
            ref = ref_cam(input_tensor=x.clone().requires_grad_(True),
                          targets=[ClassifierOutputTarget(int(c)) for c in y])
        np.testing.assert_allclose(ours.numpy(), ref, atol=1e-4)


def test_no_side_effects_frozen_no_grad_and_trainable():
    net = _gap_net()
    net.train()
    net[1].eval()  # mixed modes must be restored module by module
    net[0].requires_grad_(False)
    for p in net[3].parameters():
        p.grad = torch.full_like(p, 0.25)
    x = _x(2).requires_grad_(True)
    y = torch.tensor([1, 1])
    state = _state(net)
    running = net[1].running_mean.clone()
    for method in ("cam", "gradcam_torch", "gradcam", "layercam"):
        explore_cam(method, net, x, y, net[5])
        _assert_state(net, state)
    with torch.no_grad():
        grad_cam(net, x, y, net[5])
    classic_cam(net, x, y, net[5])
    _assert_state(net, state)
    assert x.grad is None and torch.equal(net[1].running_mean, running)
    # a frozen teacher
    teacher = _gap_net().requires_grad_(False)
    with torch.no_grad():
        out = explore_cam("gradcam", teacher, _x(2), y, teacher[5])
    assert _in_range(out) and all(p.grad is None and not p.requires_grad for p in teacher.parameters())


class _Boom(nn.Module):
    def forward(self, x):
        raise ZeroDivisionError("boom")


def test_hooks_removed_and_state_restored_after_exceptions():
    net = _gap_net()
    net.train()
    state = _state(net)
    x = _x(2)
    for method in CAM_METHODS:
        with pytest.raises(ConfigError, match="one target"):
            explore_cam(method, net, x, torch.tensor(1), net[5])
        _assert_state(net, state)
    children = list(net.children())
    broken = nn.Sequential(*children[:6], _Boom(), *children[6:])
    state = _state(broken)
    for method in ("cam", "gradcam_torch", "gradcam", "eigencam"):
        with pytest.raises(ZeroDivisionError):
            explore_cam(method, broken, x, torch.tensor([0, 1]), broken[5])
        _assert_state(broken, state)
    with pytest.raises(ConfigError, match="unknown CAM method"):
        explore_cam("nope", net, x, torch.tensor([0, 1]), net[5])


def test_explore_cam_every_method():
    net, x, y = _gap_net(), _x(2), torch.tensor([0, 4])
    for method in CAM_METHODS:
        out = explore_cam(method, net, x, y, net[5])
        assert isinstance(out, torch.Tensor) and out.device.type == "cpu"
        assert out.dtype == torch.float32 and not out.requires_grad
        assert out.shape == (2, 16, 16), method
        assert _in_range(out), method
    torch.testing.assert_close(explore_cam("gradcam", net, x, y, net[5]),
                               explore_cam("gradcam_torch", net, x, y, net[5]), atol=1e-4, rtol=0)


def test_teacher_cam_uses_teacher_layer():
    from nrrdd_core.data.base import DataConfig
    from nrrdd_core.models.teacher import Teacher

    net = _gap_net()
    dc = DataConfig(name="toy", image_size=16, mean=(0.5,) * 3, std=(0.5,) * 3,
                    class_names=tuple("abcde"))
    teacher = Teacher(model=net, arch="toy", data_config=dc, cam_layer="5")
    x, y = _x(2), torch.tensor([1, 2])
    torch.testing.assert_close(ClassicCAM(teacher).attribute(x, y), classic_cam(net, x, y, net[5]))
    torch.testing.assert_close(get_cam("gradcam")(teacher, "2").attribute(x, y),
                               grad_cam(net, x, y, net[2]), atol=1e-4, rtol=0)
    assert ClassicCAM(teacher).layer is net[5] and GradCAM(teacher, "2").layer_name == "2"
    assert ClassicCAM.supported_layers(teacher) == ["5"]          # the teacher's image size
    with pytest.raises(ConfigError, match="no layer 'nope'.*supported layers"):
        GradCAM(teacher, "nope")
    with pytest.raises(ConfigError, match="needs a layer"):
        GradCAM(net)


def test_noncritical_mask_modes():
    cam = torch.tensor([[[0.0, 0.2], [0.5, 1.0]]])
    soft = noncritical_mask(cam, 0.5)
    assert soft.shape == (1, 1, 2, 2)
    torch.testing.assert_close(soft[0, 0], torch.tensor([[0.5, 0.3], [0.0, 0.0]]))
    torch.testing.assert_close(noncritical_mask(cam, 0.5, "binary")[0, 0], torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    torch.testing.assert_close(noncritical_mask(cam, 0.5, "scaled")[0, 0], torch.tensor([[1.0, 0.6], [0.0, 0.0]]))
    for mode in ("soft", "binary", "scaled"):
        assert torch.equal(noncritical_mask(cam, 0.0, mode), torch.zeros(1, 1, 2, 2))
    torch.testing.assert_close(noncritical_mask(cam, 1.0, "binary")[0, 0], torch.tensor([[1.0, 1.0], [1.0, 0.0]]))
    with pytest.raises(ConfigError):
        noncritical_mask(cam, 1.5)
    with pytest.raises(ConfigError):
        noncritical_mask(cam, 0.5, "hard")


def test_dae_weight_complexity_and_cam_ratio():
    cam = torch.tensor([[[0.0, 0.2], [0.6, 1.0]], [[0.5, 0.5], [0.5, 0.5]]])
    w = dae_weight(cam, beta=1.0)
    assert w.shape == (2, 1, 2, 2)  # means 0.45 and 0.5
    torch.testing.assert_close(w[:, 0], torch.tensor([[[1.0, 1.0], [1.6, 2.0]], [[1.5, 1.5], [1.5, 1.5]]]))
    torch.testing.assert_close(complexity_score(cam), torch.tensor([0.5, 0.0]))
    c = torch.zeros(4, 4)
    c[0, 0], c[3, 3], c[1, 2] = 1.0, 0.5, 0.5
    boxes = torch.tensor([[0, 0, 2, 2], [0, 0, 4, 4], [2, 2, 2, 2], [1, 1, 1, 1]])
    torch.testing.assert_close(cam_ratio(c, boxes), torch.tensor([0.5, 1.0, 0.25, 0.0]))
    assert torch.equal(cam_ratio(torch.zeros(4, 4), boxes), torch.zeros(4))


def test_overlay():
    img = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    cam = torch.linspace(0, 1, 64).view(8, 8)
    out = overlay(img, cam, alpha=0.4, colormap="viridis")
    assert out.dtype == np.uint8 and out.shape == (8, 8, 3)
    np.testing.assert_array_equal(overlay(img.permute(1, 2, 0).numpy(), cam.numpy()), overlay(img, cam))
    from pytorch_grad_cam.utils.image import show_cam_on_image  # overlay's reference
    for a, cmap in [(0.4, "viridis"), (0.5, "jet"), (0.0, "hot"), (1.0, "turbo")]:
        ref = show_cam_on_image(img.permute(1, 2, 0).numpy(), cam.numpy(), use_rgb=True,
                                colormap=COLORMAPS[cmap], image_weight=1.0 - a)
        np.testing.assert_array_equal(overlay(img, cam, alpha=a, colormap=cmap), ref)
    with pytest.raises(ConfigError):
        overlay(img, cam, colormap="rainbow")
    with pytest.raises(ConfigError):
        overlay(img, cam[:4], alpha=0.5)


def test_registry_and_one_verb():
    assert tuple(CAMS) == CAM_METHODS and len(CAM_METHODS) == 8
    for name, cls in CAMS.items():
        assert issubclass(cls, CAM) and cls.name == name and cls.title and get_cam(name) is cls
    assert not CAMS["eigencam"].uses_target and CAMS["gradcam"].uses_target
    with pytest.raises(ConfigError, match="unknown CAM method 'nope'"):
        get_cam("nope")


def test_supported_layers():
    gap, flat = _gap_net(), _flat_net()
    # GAP net: 0-2 give 16x16 maps, 3-5 8x8; 6 (AdaptiveAvgPool) is 1x1: no spatial extent
    assert layer_outputs(gap, 16) == {**{str(i): (8, 16, 16) for i in range(3)},
                                      **{str(i): (8, 8, 8) for i in range(3, 6)}, "6": (8, 1, 1)}
    assert GradCAM.supported_layers(gap, 16) == ["0", "1", "2", "3", "4", "5"]
    assert get_cam("layercam").supported_layers(gap, 16) == ["0", "1", "2", "3", "4", "5"]
    # classic CAM: only the layer whose pooled output is what the classifier receives
    # (ReLU 5; BN 4 has negative values, so its pooled output differs; the pool 6 is 1x1)
    assert ClassicCAM.supported_layers(gap, 16) == ["5"]
    # flatten net: the last pooled map (8x4x4 = 128 classifier inputs) only
    assert ClassicCAM.supported_layers(flat, 16) == ["7"]
    assert "7" in GradCAM.supported_layers(flat, 16) and "6" in GradCAM.supported_layers(flat, 16)
    with pytest.raises(ConfigError, match="image_size"):
        GradCAM.supported_layers(gap)
    assert all(m.training is False for m in gap.modules()) and _hooks(gap) == 0
    # each supported layer works; classic CAM refuses an unsupported one
    x, y = _x(2), torch.tensor([0, 1])
    for name in ClassicCAM.supported_layers(flat, 16):
        assert _in_range(ClassicCAM(flat, dict(flat.named_modules())[name]).attribute(x, y))
    with pytest.raises(ConfigError, match="pick the layer"):
        ClassicCAM(flat, flat[6]).attribute(x, y)


def test_noncritical_share_is_where_the_mask_is_nonzero():
    cam = torch.tensor([[[0.0, 0.2], [0.5, 1.0]], [[0.4, 0.4], [0.4, 0.4]]])
    torch.testing.assert_close(noncritical_share(cam, 0.5), torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(noncritical_share(cam, 0.0), torch.tensor([0.0, 0.0]))
    np.testing.assert_allclose(noncritical_share(cam.numpy(), 0.3), [0.5, 0.0])
    for tau in (0.0, 0.3, 0.5, 1.0):
        want = (noncritical_mask(cam, tau, "soft") > 0).float().mean((1, 2, 3))
        torch.testing.assert_close(noncritical_share(cam, tau), want)
    with pytest.raises(ConfigError):
        noncritical_share(cam, 1.5)


def test_draw_boxes_outlines_only():
    img = np.zeros((6, 7, 3), np.uint8)
    out = draw_boxes(img, torch.tensor([[1, 2, 3, 4]]), color=(9, 8, 7))
    assert img.sum() == 0 and out.dtype == np.uint8                 # input untouched
    drawn = (out == (9, 8, 7)).all(-1)
    want = np.zeros((6, 7), bool)
    want[1, 2:6] = want[3, 2:6] = want[1:4, 2] = want[1:4, 5] = True  # rows 1..3, cols 2..5
    np.testing.assert_array_equal(drawn, want)
    thick = (draw_boxes(img, [[0, 0, 6, 7]], width=2) != 0).any(-1)
    assert thick[:2].all() and thick[:, :2].all() and not thick[2:4, 2:5].any()
