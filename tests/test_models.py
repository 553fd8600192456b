"""Tests of nrrdd_core.models: builders, CAM layers, CIFAR ResNet checkpoints, Teacher I/O,
teacher training (determinism, progress, cache), pretrained weights offline, shipped teacher."""

from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from nrrdd_core.data.base import DataConfig, DatasetBundle, ImageSplit
from nrrdd_core.errors import CheckpointError, ConfigError, StoppedError, TeacherMismatchError
from nrrdd_core.models import (Teacher, TeacherTrainConfig, akamaster_data_config, build_model,
                               default_cam_layer, evaluate_accuracy, get_classifier, list_models,
                               load_resnet_cifar_checkpoint, pretrained_teacher, shipped_teacher,
                               train_teacher, weights_path)
from nrrdd_core.models.convnet import default_depth
from nrrdd_core.models.resnet_cifar import ShortcutA
from nrrdd_core.models.train import SHIPPED_TEACHER_PATH, random_crop_flip, teacher_cache_path

# (name, image size, kwargs): small but valid inputs for every registered builder
BUILDS = [("convnet_bn", 8, {"width": 8}), ("convnet_in", 16, {"width": 8, "depth": 2}),
          ("resnet18_small", 8, {}), ("resnet20_cifar", 8, {}), ("resnet32_cifar", 8, {}),
          ("resnet44_cifar", 8, {}), ("resnet56_cifar", 8, {}), ("resnet18", 32, {}),
          ("resnet50", 32, {}), ("mobilenet_v2", 32, {})]


def test_every_registered_model_is_covered():
    assert sorted(b[0] for b in BUILDS) == list_models()


@pytest.mark.parametrize("name,size,kw", BUILDS, ids=[b[0] for b in BUILDS])
def test_builder_logits_cam_layer_and_classifier(name, size, kw):
    torch.manual_seed(0)
    model = build_model(name, num_classes=5, image_size=size, **kw).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 5)
    cam = dict(model.named_modules())[default_cam_layer(name)]
    feats = []
    h = cam.register_forward_hook(lambda m, i, o: feats.append(o))
    with torch.no_grad():
        model(torch.randn(2, 3, size, size))
    h.remove()
    assert feats[0].ndim == 4 and feats[0].shape[0] == 2
    fc = get_classifier(model)
    assert isinstance(fc, nn.Linear) and fc.out_features == 5


def test_registry_errors():
    with pytest.raises(ConfigError, match="unknown model"):
        build_model("vgg11", 10, 32)
    with pytest.raises(ConfigError, match="unknown model"):
        default_cam_layer("nope")
    with pytest.raises(ConfigError, match="depth"):
        build_model("resnet20_cifar", 10, 32, depth=3)
    with pytest.raises(ConfigError, match="too deep"):
        build_model("convnet_bn", 10, 8, depth=4, width=8)
    with pytest.raises(ConfigError):
        get_classifier(nn.Conv2d(3, 3, 1))


def test_convnet_default_depth_and_feature_maps():
    assert [default_depth(s) for s in (8, 16, 32, 64, 128)] == [1, 2, 3, 4, 5]
    for depth in (1, 2, 3):
        m = build_model("convnet_bn", 10, 32, depth=depth, width=8)
        assert m.features(torch.zeros(1, 3, 32, 32)).shape == (1, 8, 32 >> depth, 32 >> depth)
        assert m.classifier.in_features == 8 * (32 >> depth) ** 2
        assert sum(isinstance(x, nn.BatchNorm2d) for x in m.features) == depth
    for size in (32, 64):  # default depth leaves a 4x4 map
        m = build_model("convnet_in", 3, size, width=8)
        assert m.features(torch.zeros(1, 3, size, size)).shape == (1, 8, 4, 4)
        gns = [x for x in m.features if isinstance(x, nn.GroupNorm)]
        assert gns and all(g.num_groups == 8 and g.affine for g in gns)
        assert not any(isinstance(x, nn.BatchNorm2d) for x in m.modules())


def test_resnet18_small_stem():
    m = build_model("resnet18_small", 10, 32)
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1) and m.conv1.bias is None
    assert isinstance(m.maxpool, nn.Identity)
    stem = m.relu(m.bn1(m.conv1(torch.zeros(1, 3, 32, 32))))
    feats = m.layer4(m.layer3(m.layer2(m.layer1(stem))))
    assert feats.shape == (1, 512, 4, 4)


def test_option_a_shortcut():
    x = torch.randn(2, 16, 8, 8)
    y = ShortcutA(16, 32)(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert y[:, :8].abs().sum() == 0 and y[:, 24:].abs().sum() == 0
    m = build_model("resnet20_cifar", 10, 32)
    assert isinstance(m.layer2[0].shortcut, ShortcutA)
    assert isinstance(m.layer1[0].shortcut, nn.Identity)
    assert sum(p.numel() for p in m.parameters()) == 269722  # ResNet-20: 0.27 M (akamaster count)


def _cifar_prefix(shared_data):
    d = np.load(shared_data / "cifar10_exact_test_prefix.npz")
    x = torch.from_numpy(d["x"]).permute(0, 3, 1, 2).contiguous()
    return ImageSplit(x, torch.from_numpy(d["y"]))


def test_akamaster_checkpoint_accuracy(shared_data):
    names = tuple(json.loads((shared_data / "cifar10_classes.json").read_text()))
    dc = akamaster_data_config(names)
    assert dc.mean == (0.485, 0.456, 0.406) and dc.std == (0.229, 0.224, 0.225)
    path = shared_data / "cifar10_resnet20_akamaster.th"
    t = load_resnet_cifar_checkpoint(path, "resnet20_cifar", dc)
    assert t.cam_layer == "layer3" and not t.model.training
    split = _cifar_prefix(shared_data)
    assert len(split) == 1017
    acc = evaluate_accuracy(t, split, dc, "cpu")
    assert abs(acc - 0.916) <= 0.006


def test_resnet_cifar_checkpoint_variants_and_errors(shared_data, tmp_path):
    src = shared_data / "cifar10_resnet20_akamaster.th"
    dc = akamaster_data_config()
    bare = torch.load(src, map_location="cpu", weights_only=True)["state_dict"]
    torch.save({k.removeprefix("module."): v for k, v in bare.items()}, tmp_path / "bare.pt")
    a = load_resnet_cifar_checkpoint(src, "resnet20_cifar", dc)
    b = load_resnet_cifar_checkpoint(tmp_path / "bare.pt", "resnet20_cifar", dc)
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(a(x), b(x))
    with pytest.raises(CheckpointError, match="missing"):
        load_resnet_cifar_checkpoint(src, "resnet32_cifar", dc)
    five = DataConfig("c5", 32, dc.mean, dc.std, tuple("abcde"))
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_resnet_cifar_checkpoint(src, "resnet20_cifar", five)
    with pytest.raises(CheckpointError, match="not found"):
        load_resnet_cifar_checkpoint(tmp_path / "absent.th", "resnet20_cifar", dc)
    with pytest.raises(ConfigError):
        load_resnet_cifar_checkpoint(src, "convnet_bn", dc)


def _dc(n=2, size=8, name="rand"):
    names = tuple(f"c{i}" for i in range(n))
    return DataConfig(name, size, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), names)


def test_teacher_save_load_round_trip_and_compat(tmp_path):
    torch.manual_seed(0)
    dc = _dc(3)
    model = build_model("convnet_bn", 3, 8, width=8)
    model.train()(torch.randn(4, 3, 8, 8))  # move the BN running statistics off their defaults
    t = Teacher(model, "convnet_bn", dc, "features", arch_kwargs={"width": 8}, test_acc=0.5)
    path = t.save(tmp_path / "t.pt")
    u = Teacher.load(path)
    x = torch.randn(5, 3, 8, 8)
    assert torch.equal(t(x), u(x))
    assert (u.arch, u.arch_kwargs, u.test_acc, u.cam_layer, u.data_config) == \
        ("convnet_bn", {"width": 8}, 0.5, "features", dc)
    u.check_compatible(dc)
    with pytest.raises(TeacherMismatchError, match="3 classes"):
        u.check_compatible(_dc(2))
    with pytest.raises(TeacherMismatchError, match="index 1"):
        u.check_compatible(DataConfig("rand", 8, dc.mean, dc.std, ("c0", "c2", "c1")))
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an NRR-DD"):
        Teacher.load(tmp_path / "other.pt")


def _bundle(seed=0, n_train=24, n_test=10, size=8):
    g = torch.Generator().manual_seed(seed)
    def split(n):
        y = torch.arange(n) % 2
        x = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
        x[y == 1, 0] = 255  # class 1 is red-ish: learnable
        return ImageSplit(x, y)
    return DatasetBundle(split(n_train), split(n_test), _dc(2, size),
                         source={"kind": "random", "seed": seed})


TINY = TeacherTrainConfig(arch="convnet_bn", width=8, depth=1, epochs=2, batch_size=8, seed=3)


def test_train_teacher_deterministic_and_leaves_global_rng():
    b = _bundle()
    calls = []
    rng = torch.get_rng_state()
    t1 = train_teacher(TINY, b, "cpu", progress=lambda *a: calls.append(a), cache=False)
    assert torch.equal(rng, torch.get_rng_state())
    t2 = train_teacher(TINY, b, "cpu", cache=False)
    t3 = train_teacher(TINY.replace(seed=4), b, "cpu", cache=False)
    s1, s2, s3 = (t.model.state_dict() for t in (t1, t2, t3))
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not all(torch.equal(s1[k], s3[k]) for k in s1)
    assert [c[:2] for c in calls] == [(1, 2), (2, 2)]
    assert {"train_loss", "train_acc", "lr", "seconds"} <= set(calls[0][2])
    assert "test_acc" not in calls[0][2]
    assert calls[-1][2]["test_acc"] == t1.test_acc
    assert t1.test_acc == evaluate_accuracy(t1, b.test, b.config, "cpu")
    assert t1.arch_kwargs == {"width": 8, "depth": 1} and t1.cam_layer == "features"
    assert not t1.model.training and not any(p.requires_grad for p in t1.model.parameters())


def test_train_teacher_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NRRDD_CACHE", str(tmp_path))
    b = _bundle(seed=1)
    calls = []
    t1 = train_teacher(TINY, b, "cpu", progress=lambda *a: calls.append(a))
    path = teacher_cache_path(TINY, b)
    assert path.is_file() and path.parent == tmp_path / "teachers"
    assert os.listdir(path.parent) == [path.name]  # atomic write: no temp file left behind
    t2 = train_teacher(TINY, b, "cpu", progress=lambda *a: calls.append(a))
    assert len(calls) == 2  # second call: cache hit, no training
    x = torch.randn(3, 3, 8, 8)
    assert torch.equal(t1(x), t2(x)) and t2.test_acc == t1.test_acc
    # a different dataset (same shapes, other pixels) or config gets another key
    assert teacher_cache_path(TINY, _bundle(seed=2)) != path
    assert teacher_cache_path(TINY.replace(epochs=3), b) != path


def test_train_teacher_stop_and_config_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("NRRDD_CACHE", str(tmp_path))
    b = _bundle()
    with pytest.raises(StoppedError):
        train_teacher(TINY, b, "cpu", should_stop=lambda: True)
    assert not teacher_cache_path(TINY, b).exists()
    with pytest.raises(ConfigError, match="arch"):
        TeacherTrainConfig(arch="vgg")
    with pytest.raises(ConfigError):
        train_teacher(TeacherTrainConfig(arch="resnet20_cifar", depth=3, epochs=1), b, "cpu")
    assert any(r["name"] == "lr" and r["default"] == 0.1 for r in TeacherTrainConfig.describe())


def test_random_crop_flip_matches_a_crop_of_the_padded_image():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 8, 8), generator=g, dtype=torch.uint8)
    out = random_crop_flip(x, 2, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    xp = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for k in range(6):
        cands = [xp[k, :, i:i + 8, j:j + 8] for i, j in itertools.product(range(5), range(5))]
        assert any(torch.equal(out[k], c) or torch.equal(out[k], c.flip(2)) for c in cands)
    same = random_crop_flip(x, 2, torch.Generator().manual_seed(1))
    assert torch.equal(out, same)
    flips = random_crop_flip(x, 0, torch.Generator().manual_seed(5))
    assert all(torch.equal(flips[k], x[k]) or torch.equal(flips[k], x[k].flip(2)) for k in range(6))


def test_evaluate_accuracy_restores_mode():
    b = _bundle()

    class Const(nn.Module):
        def forward(self, x):
            return torch.tensor([[0.0, 1.0]]).expand(len(x), 2)

    m = Const().train()
    assert evaluate_accuracy(m, b.test, b.config, "cpu", batch_size=3) == 0.5
    assert m.training


def test_pretrained_without_cached_file_raises_naming_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    tried = []

    def no_network(url, dst, *a, **k):
        tried.append(url)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert weights_path("resnet18") == expected
    with pytest.raises(CheckpointError, match="resnet18-f37072fd.pth") as err:
        build_model("resnet18", 1000, 224, pretrained=True)
    assert str(expected) in str(err.value)
    assert tried and not expected.exists()


def test_pretrained_teacher_from_cached_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("download"))
    torch.manual_seed(0)
    ref = build_model("mobilenet_v2", 1000, 224)
    path = weights_path("mobilenet_v2")
    path.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), path)
    t = pretrained_teacher("mobilenet_v2")
    dc = t.data_config
    assert (dc.name, dc.image_size, dc.num_classes) == ("imagenet", 224, 1000)
    assert dc.mean == (0.485, 0.456, 0.406)
    assert dc.class_names[0] == "tench" and t.cam_layer == "features"
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(t(x), ref.eval()(x))
    head = build_model("mobilenet_v2", 7, 224, pretrained=True)  # ImageNet features, new head
    assert get_classifier(head).out_features == 7
    assert torch.equal(head.features[0][0].weight, ref.features[0][0].weight)
    with pytest.raises(ConfigError):
        pretrained_teacher("resnet20_cifar")


def test_shipped_teacher():
    if not SHIPPED_TEACHER_PATH.is_file():
        pytest.fail(f"{SHIPPED_TEACHER_PATH} missing: python -m nrrdd_core.models.train --shipped")
    assert SHIPPED_TEACHER_PATH.stat().st_size <= 5 * 2**20
    t = shipped_teacher()
    assert t.arch == "resnet20_cifar" and t.cam_layer == "layer3"
    from nrrdd_core.data import shapes

    dc = t.data_config
    assert (dc.name, dc.image_size, dc.class_names) == ("shapes", 32, shapes.CLASS_NAMES)
    assert (dc.mean, dc.std) == (shapes.MEAN, shapes.STD)
    assert t.test_acc >= 0.9
    assert t(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
