"""NRR-DD's CIDD ranking (METHODS.md §4.2) and mask recomputation (METHODS.md §4.3)."""

from __future__ import annotations

import pytest
import torch

from nrrdd_core import cam as cam_mod
from nrrdd_core.cam import ClassicCAM, cam_ratio, noncritical_mask
from nrrdd_core.methods.common import cidd_candidates, cidd_rank

from test_methods import SIZE, _make, bundle, teacher  # noqa: F401 (fixtures)


def _corner_cam(n: int) -> torch.Tensor:
    """All CAM mass in the top-left 4x4 corner, rising towards (0, 0)."""
    cam = torch.zeros(n, SIZE, SIZE)
    cam[:, :4, :4] = torch.linspace(1, 0.25, 4)[:, None] * torch.linspace(1, 0.25, 4)[None]
    return cam


def test_cidd_rank_orders_boxes_by_cam_ratio_highest_first():
    cam = _corner_cam(2)
    boxes = torch.tensor([[[8, 8, 8, 8], [0, 0, 4, 4], [0, 0, 2, 2], [0, 0, 16, 16]],
                          [[0, 0, 1, 1], [12, 0, 4, 4], [0, 0, 3, 3], [0, 0, 2, 2]]])
    ratio, order = cidd_rank(cam, boxes)
    # image 0: the full image and the 4x4 corner hold all the mass (a stable tie), then 2x2, then none
    assert order[0].tolist() == [1, 3, 2, 0]
    assert order[1].tolist() == [2, 3, 0, 1]
    torch.testing.assert_close(ratio[0], torch.stack([cam_ratio(cam[0], boxes[0])])[0])
    assert ratio[0, 0] == 0 and ratio[0, 1] == ratio[0, 3] == 1
    r, o = cidd_rank(cam[:0], boxes[:0])
    assert r.shape == o.shape == (0, 4)


def test_distiller_keeps_the_highest_cam_ratio_boxes(teacher, bundle, monkeypatch):  # noqa: F811
    """CIDD scores only the top_t boxes of each real image by CAM ratio (not the lowest)."""
    monkeypatch.setattr(cam_mod.CAM, "attribute", lambda self, x, t: _corner_cam(len(x)))
    d = _make("nrrdd", teacher, bundle, num_crops=5, top_t=2, images_per_step=20)
    seen = []
    rank = d._rank_chunk

    def spy(c, x_norm, boxes):
        out = rank(c, x_norm, boxes)
        seen.append((boxes, out))
        return out

    d._rank_chunk = spy
    d.step()
    boxes, (image, kept, key, _) = seen[0]
    n = len(boxes)
    assert image.tolist() == [a for a in range(n) for _ in range(2)]
    corner = _corner_cam(1)[0]
    informative = 0
    for a in range(n):
        ratio = cam_ratio(corner, boxes[a])
        got = cam_ratio(corner, kept[2 * a:2 * a + 2])
        want = torch.sort(ratio, descending=True).values[:2]
        torch.testing.assert_close(got, want)
        informative += bool(want[-1] > torch.sort(ratio).values[0])
    assert informative > n // 2          # the boxes differ, so keeping the lowest would show
    d.close()


def test_explorer_candidates_use_the_same_ranking(teacher, bundle):  # noqa: F811
    x01 = bundle.train.float01([0])[0]
    cam = _corner_cam(1)[0]
    c = cidd_candidates(teacher, x01, cam, label=0, m=6, top_t=2, seed=0)
    assert torch.equal(c.ratio, torch.sort(cam_ratio(cam, c.boxes), descending=True).values)
    assert c.kept.tolist() == [True, True, False, False, False, False]


@pytest.mark.parametrize("k", [0, 2])
def test_mask_recomputed_every_k_refinement_steps(teacher, bundle, k):  # noqa: F811
    """mask_recompute_every=k: before refinement step i (i > 0, i % k == 0) the mask becomes
    noncritical_mask(CAM(current images)); k=0 keeps the mask of x~0."""
    d = _make("nrrdd", teacher, bundle, iterations=5, lr=0.5, mask_recompute_every=k)
    while d.step_index < d.select_steps:
        d.step()
    mask0 = d.refiner.mask.clone()
    masks, xs = [], []
    for _ in range(5):
        xs.append(d.refiner.x.clone())
        d.step()
        masks.append(d.refiner.mask.clone())
    if k == 0:
        assert all(torch.equal(m, mask0) for m in masks)
        return
    cam = ClassicCAM(teacher)
    for i in range(5):
        if i > 0 and i % k == 0:
            want = noncritical_mask(cam.attribute(xs[i], d.labels), d.config.tau, d.config.mask_mode)
            assert torch.equal(masks[i], want), i
            assert not torch.equal(masks[i], masks[i - 1]), i
        else:
            assert torch.equal(masks[i], mask0 if i < k else masks[i - 1]), i
    d.close()
