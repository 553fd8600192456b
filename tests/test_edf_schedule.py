"""EDF's start-epoch schedule and DAE's ImageNet class mapping (METHODS.md §5.3, §5.5)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nrrdd_core.data.base import DataConfig
from nrrdd_core.methods import make_distiller
from nrrdd_core.methods.edf import EDFConfig
from nrrdd_core.models import build_model
from nrrdd_core.models.teacher import Teacher

from test_edf import setup  # noqa: F401 (fixture: tiny dataset, 3-epoch buffer, BN teacher)

# the expert buffer has 3 epochs: start epochs 0..1, matched 1 epoch ahead
FAST = dict(iterations=4, syn_steps=1, batch_syn=3, expert_epochs=1, min_start_epoch=0,
            current_max_start_epoch=1, max_start_epoch=2, expansion_iterations=2, lr_img=10.0)


def test_start_epoch_bound_rises_linearly_from_t_to_t_plus():
    cfg = EDFConfig(current_max_start_epoch=4, max_start_epoch=10, expansion_iterations=100)
    # T + floor((T+ - T) * it / E_exp), then T+ from E_exp on (DATM code)
    got = [cfg.upper_bound(it) for it in (0, 1, 16, 17, 50, 99, 100, 5000)]
    assert got == [4, 4, 4, 5, 7, 9, 10, 10]


def test_distiller_draws_start_epochs_below_the_rising_bound(setup):  # noqa: F811
    bundle, teacher, path = setup
    d = make_distiller("edf", {**FAST, "buffer": path}, teacher=teacher, dataset=bundle, ipc=1,
                       device="cpu", seed=0)
    for _ in range(d.total_steps):
        d.step()
    match = [r.info for r in d.history if r.phase == "match"]
    assert [i["upper_bound"] for i in match] == [1, 1, 2, 2]
    assert all(0 <= i["start_epoch"] < i["upper_bound"] for i in match)


def _imagenet_like_teacher(num_classes: int = 1000, size: int = 24) -> Teacher:
    dc = DataConfig(name="imagenet", image_size=size, mean=(0.485, 0.456, 0.406),
                    std=(0.229, 0.224, 0.225), class_names=tuple(f"n{i}" for i in range(num_classes)))
    torch.manual_seed(1)
    return Teacher(build_model("convnet_bn", num_classes, size, depth=2, width=8), "convnet_bn", dc,
                   "features", {"depth": 2, "width": 8})


@pytest.mark.parametrize("target", ["distilled_class", "argmax_y"])
def test_dae_with_the_imagenet_cam_model_maps_labels_to_imagenet_classes(setup, monkeypatch, target):  # noqa: F811
    bundle, teacher, path = setup
    imagenet = [207, 3, 951]                      # ImageNet-1k index of each original label
    bundle = dataclasses.replace(bundle, source={"imagenet_indices": imagenet})
    cam_teacher = _imagenet_like_teacher()
    seen = []

    def fake_cam(model, x_norm, targets):
        seen.append((model, tuple(x_norm.shape), targets.clone()))
        return torch.rand(len(x_norm), 24, 24, generator=torch.Generator().manual_seed(0))

    d = make_distiller("edf", {**FAST, "buffer": path, "dae_beta": 1.0, "dae_interval": 1,
                               "cam_model": "imagenet_resnet18", "dae_target": target},
                       teacher=teacher, dataset=bundle, ipc=2, device="cpu", seed=0, cam_fn=fake_cam)
    monkeypatch.setattr(d, "_imagenet_cam_model", lambda: cam_teacher)
    for _ in range(2):
        d.step()
    model, shape, targets = seen[-1]
    assert model is cam_teacher and shape == (6, 3, 24, 24)   # resized to the CAM model's input
    labels = d.labels if target == "distilled_class" else d.y_logits.detach().argmax(1)
    assert torch.equal(targets.cpu(), torch.tensor(imagenet)[labels.cpu()])
    assert d.views()["mask"].shape == (6, 1, 16, 16)          # back at the dataset's image size


def test_imagenet_targets_follow_the_class_map(setup):  # noqa: F811
    bundle, teacher, path = setup
    # a subset: new label 0 = original label 2, new label 1 = original label 0
    sub = dataclasses.replace(bundle, class_map=(2, 0, 1),
                              source={"imagenet_indices": [207, 3, 951]})
    d = make_distiller("edf", {**FAST, "buffer": path}, teacher=teacher, dataset=sub, ipc=1,
                       device="cpu", seed=0)
    assert d._imagenet_targets().tolist() == [951, 207, 3]
