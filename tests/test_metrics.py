"""Set metrics (nrrdd_core.metrics) and CIDD candidates (methods.common.cidd_candidates)."""

from __future__ import annotations

import math

import torch
from torch import nn

from nrrdd_core.cam import cam_ratio
from nrrdd_core.data.base import DataConfig
from nrrdd_core.methods.common import cidd_candidates
from nrrdd_core.metrics import cam_area, feature_diversity, set_metrics
from nrrdd_core.models.teacher import Teacher

NAMES = ("a", "b")


def _teacher() -> Teacher:
    """A GAP net whose logits are (mean red, mean green) of the image (no BN, exact)."""
    conv = nn.Conv2d(3, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0] = conv.weight[1, 1] = 10.0
    model = nn.Sequential()
    model.add_module("features", conv)
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    model.add_module("flat", nn.Flatten())
    model.add_module("fc", nn.Linear(2, 2))
    with torch.no_grad():
        model.fc.weight.copy_(torch.eye(2))
        model.fc.bias.zero_()
    dc = DataConfig("toy", 8, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), NAMES)
    return Teacher(model.eval(), "toy", dc, "features", {})


def _solid(r: float, g: float) -> torch.Tensor:
    x = torch.zeros(3, 8, 8)
    x[0], x[1] = r, g
    return x


def test_feature_diversity_hand_computed():
    f = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])
    # one class: pairwise distances 5, 10, 5 -> mean 20/3
    assert math.isclose(feature_diversity(f, torch.tensor([0, 0, 0])), 20 / 3, rel_tol=1e-6)
    # class 0 has {0, 1} (distance 5), class 1 a single image (ignored)
    assert math.isclose(feature_diversity(f, torch.tensor([0, 0, 1])), 5.0, rel_tol=1e-6)
    # one image per class: over all images
    assert math.isclose(feature_diversity(f[:2], torch.tensor([0, 1])), 5.0, rel_tol=1e-6)
    assert math.isnan(feature_diversity(f[:1], torch.tensor([0])))


def test_cam_area_known_map():
    cam = torch.zeros(2, 4, 4)
    cam[0, :2] = 1.0           # 8 of 16 pixels covered
    cam[1, 0, 0] = 0.5         # 1 of 16 (>= threshold counts)
    assert math.isclose(cam_area(cam), (8 / 16 + 1 / 16) / 2, rel_tol=1e-6)
    assert cam_area(cam, threshold=1.1) == 0.0


def test_set_metrics_on_a_tiny_teacher():
    t = _teacher()
    x = torch.stack([_solid(1, 0), _solid(0, 1), _solid(1, 0.2), _solid(0.2, 1)])
    y = torch.tensor([0, 1, 1, 1])  # the third image is misclassified
    m = set_metrics(t, x, y)
    assert math.isclose(m["teacher_acc"], 0.75)
    logits = torch.tensor([[10.0, 0], [0, 10], [10, 2], [2, 10]])
    conf = torch.softmax(logits, 1)[torch.arange(4), y].mean()
    assert math.isclose(m["teacher_conf"], float(conf), rel_tol=1e-5)
    assert 0.0 <= m["cam_area"] <= 1.0
    # class 1 features (pooled conv output): (0,10), (10,2), (2,10) -> mean pairwise distance
    f = torch.tensor([[0.0, 10], [10, 2], [2, 10]])
    assert math.isclose(m["diversity"], float(torch.pdist(f).mean()), rel_tol=1e-5)
    assert all(math.isnan(v) for v in set_metrics(t, x[:0], y[:0]).values())
    assert not any(mod._forward_hooks for mod in t.model.modules())


def test_cidd_candidates_sorted_and_consistent():
    t = _teacher()
    x = _solid(1, 0)
    x[1, :4] = 1.0  # green top half
    cam = torch.zeros(8, 8)
    cam[:4] = 1.0
    c = cidd_candidates(t, x, cam, label=0, m=6, top_t=3, seed=0)
    assert c.boxes.shape == (6, 4) and c.crops01.shape == (6, 3, 8, 8)
    assert torch.all(c.ratio[:-1] >= c.ratio[1:])
    torch.testing.assert_close(c.ratio, cam_ratio(cam, c.boxes))
    assert c.kept.tolist() == [True] * 3 + [False] * 3
    assert ((c.confidence >= 0) & (c.confidence <= 1)).all()
    kc = c.confidence[:3]
    assert kc[c.lowest] == kc.min() and kc[c.highest] == kc.max()
    again = cidd_candidates(t, x, cam, label=0, m=6, top_t=3, seed=0)
    assert torch.equal(again.boxes, c.boxes)
