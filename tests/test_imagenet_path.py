"""The ImageNet-size path: an ImageNette-style folder at 128 and 224 px, RDED and NRR-DD at factor 2,
a torchvision ResNet-18 teacher whose weights come from a local file (no download)."""

from __future__ import annotations

import pytest
import torch
import torchvision

from nrrdd_core.data import load_dataset
from nrrdd_core.data.imagefolder import IMAGENET_SUBSETS
from nrrdd_core.errors import CheckpointError, ConfigError
from nrrdd_core.methods import make_distiller, run_distiller
from nrrdd_core.models.local_weights import local_imagenet_teacher

from test_stream import make_folder

NETTE = IMAGENET_SUBSETS["imagenette"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "resnet18_imagenet.pth"
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def nette(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("nette"), 4, 240, classes=10)


def test_the_subset_teacher_is_the_imagenet_logits_of_its_classes(weights):
    bundle_cfg = load_dataset("shapes", train_per_class=2, test_per_class=1).config
    cfg = bundle_cfg.__class__(bundle_cfg.name, 64, bundle_cfg.mean, bundle_cfg.std,
                               bundle_cfg.class_names)
    t = local_imagenet_teacher(weights, cfg, NETTE)
    full = torchvision.models.resnet18(num_classes=1000)
    full.load_state_dict(torch.load(weights, weights_only=True))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(t(x), full.eval()(x)[:, list(NETTE)])
    assert t.data_config.mean == (0.485, 0.456, 0.406) and t.num_classes == 10
    assert t.layer() is t.model.net.layer4
    with pytest.raises(ConfigError, match="imagenet_indices"):
        local_imagenet_teacher(weights, cfg)


def test_bad_weight_files_are_refused(tmp_path):
    cfg = load_dataset("shapes", train_per_class=2, test_per_class=1).config
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(7, 512)}, bad)
    with pytest.raises(CheckpointError, match="7 outputs"):
        local_imagenet_teacher(bad, cfg)
    with pytest.raises(CheckpointError):
        local_imagenet_teacher(tmp_path / "missing.pth", cfg)


@pytest.mark.slow
@pytest.mark.parametrize("size", [128, 224])
@pytest.mark.parametrize("method", ["rded", "nrrdd"])
def test_imagenette_style_folder_at_factor_2(weights, nette, size, method):
    bundle = load_dataset("imagefolder_stream", root=nette, image_size=size, test_fraction=0.0,
                          workers=0, classes=["class0", "class1"])
    teacher = local_imagenet_teacher(weights, bundle.config, [NETTE[0], NETTE[1]])
    cfg = {"mipc": 4, "images_per_step": 4, "num_crops": 2, "factor": 2}
    if method == "nrrdd":
        cfg["iterations"] = 1
    d = make_distiller(method, cfg, teacher=teacher, dataset=bundle, ipc=1, device="cpu", seed=0)
    x, y = run_distiller(d).images()
    assert x.shape == (2, 3, size, size) and y.tolist() == [0, 1]
    assert torch.isfinite(x).all() and x.std() > 0
    h = size // 2   # four stitched patches: the quadrants are different crops
    assert not torch.equal(x[0, :, :h, :h], x[0, :, h:, h:])
