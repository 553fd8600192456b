"""Seeded augmentations (METHODS.md §1.3, §1.4, §2)."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import RandomResizedCrop

from nrrdd_core.augment import (apply_crops, cutmix, mixup, random_resized_crop_params,
                                recover_augment, student_augment)
from nrrdd_core.errors import ConfigError


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(n: int = 4, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=_gen(123))


def test_rrc_boxes_inside_image_and_match_torchvision():
    for size, scale in ((16, (0.08, 1.0)), (20, (0.5, 1.0)), (12, (1.0, 1.0))):
        boxes = random_resized_crop_params(200, size, scale=scale, generator=_gen(1))
        i, j, h, w = boxes.T
        assert boxes.dtype == torch.int64
        assert (h > 0).all() and (w > 0).all() and (i >= 0).all() and (j >= 0).all()
        assert (i + h <= size).all() and (j + w <= size).all()
    # same stream of numbers as torchvision's get_params on the (seeded) global RNG
    ours = random_resized_crop_params(5, 24, generator=_gen(7))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        img = torch.zeros(3, 24, 24)
        ref = [RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(5)]
    assert ours.tolist() == [list(r) for r in ref]


def test_apply_crops_shape_and_content():
    x = _images(2, 16)
    boxes = torch.tensor([[0, 0, 16, 16], [4, 2, 8, 8]])
    out = apply_crops(x, boxes, 8)
    assert out.shape == (2, 3, 8, 8)
    torch.testing.assert_close(apply_crops(x[:1], boxes[:1], 16), x[:1])
    torch.testing.assert_close(apply_crops(x[1:], torch.tensor([[4, 2, 8, 8]]), 8), x[1:, :, 4:12, 2:10])


def test_cutmix_lam_true_is_pixel_fraction_and_seeded():
    x = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1).expand(6, 3, 16, 16).clone()
    for seed in range(20):
        x_mix, perm, lam, (i, j, h, w) = cutmix(x, _gen(seed))
        assert 0 <= i and 0 <= j and i + h <= 16 and j + w <= 16
        for b in range(6):
            if perm[b] == b:
                continue
            own = (x_mix[b] == b).float().mean().item()
            assert own == pytest.approx(lam)
        assert lam == pytest.approx(1 - h * w / 256)
    a, b = cutmix(x, _gen(5)), cutmix(x, _gen(5))
    torch.testing.assert_close(a[0], b[0])
    assert a[1].tolist() == b[1].tolist() and a[2:] == b[2:]


def test_mixup_and_gradients_flow():
    x = _images(4, 16).requires_grad_(True)
    x_mix, perm, lam = mixup(x, _gen(2))
    assert 0 <= lam <= 1
    torch.testing.assert_close(x_mix, lam * x + (1 - lam) * x[perm])
    g = _gen(3)
    total = (x_mix.sum() + cutmix(x, g)[0].sum() + recover_augment(x, 16, g).sum()
             + recover_augment(x, 48, g).sum() + student_augment(x, g, factor=2).sum())
    total.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_recover_augment_roll_and_large_size():
    x = _images(3, 16)
    out = recover_augment(x, 16, _gen(4), max_roll=4)
    assert out.shape == x.shape
    # a pure roll: some shift (dy, dx) in [-4, 4]^2, the same for the whole batch
    assert any(torch.equal(out, torch.roll(x, (dy, dx), (2, 3)))
               for dy in range(-4, 5) for dx in range(-4, 5))
    big = torch.rand(2, 3, 48, 48, generator=_gen(5))
    out = recover_augment(big, 48, _gen(6))
    assert out.shape == big.shape
    torch.testing.assert_close(out, recover_augment(big, 48, _gen(6)))


def test_student_augment_shape_seed_and_randaugment():
    x = _images(4, 16)
    a = student_augment(x, _gen(8), factor=2)
    assert a.shape == x.shape and a.dtype == x.dtype
    torch.testing.assert_close(a, student_augment(x, _gen(8), factor=2))
    state = torch.random.get_rng_state()
    r1 = student_augment(x, _gen(9), randaugment=True)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    torch.testing.assert_close(r1, student_augment(x, _gen(9), randaugment=True))
    assert r1.shape == x.shape and float(r1.min()) >= 0 and float(r1.max()) <= 1
    with pytest.raises(ConfigError):
        student_augment(x, _gen(0), factor=0)


@pytest.mark.parametrize("spec_kw", [{}, {"mix": "mixup", "factor": 2, "randaugment": True},
                                     {"flip": False}])
def test_student_batches_use_the_public_student_augment(spec_kw):
    """The KD protocol's batches (labels.draw_batch) are student_augment, then CutMix / Mixup."""
    from nrrdd_core.labels import AugSpec, draw_batch

    x = _images(6, 16)
    spec = AugSpec(**spec_kw)
    idx = torch.tensor([5, 0, 3, 1])
    got, aug = draw_batch(x, idx, spec, _gen(11))
    g = _gen(11)
    pre = student_augment(x[idx], g, factor=spec.factor, flip=spec.flip,
                          randaugment=spec.randaugment)
    want = cutmix(pre, g)[0] if spec.mix == "cutmix" else mixup(pre, g)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    if spec.flip:
        assert not torch.equal(pre, x[idx])   # some flipped or cropped
    else:
        assert not aug.flips.any()
