"""Expert trajectories (METHODS.md §5.1), DSA (METHODS.md §5.2) and ZCA."""

from __future__ import annotations

import pytest
import torch

from nrrdd_core.data.base import DataConfig, DatasetBundle, ImageSplit
from nrrdd_core.dsa import DSA_STRATEGIES, dsa, dsa_apply
from nrrdd_core.errors import CheckpointError, ConfigError
from nrrdd_core.experts import train as ex_train
from nrrdd_core.experts import (ExpertConfig, ExpertTrainer, ParamLayout, ZCA, load_buffer,
                                seeded_model, train_experts)


def tiny_bundle(size: int = 16, per_class: int = 12, classes: int = 3, seed: int = 0) -> DatasetBundle:
    g = torch.Generator().manual_seed(seed)

    def split(n):
        y = torch.arange(n * classes) % classes
        x = torch.randint(0, 256, (n * classes, 3, size, size), generator=g, dtype=torch.uint8)
        for c in range(classes):  # a learnable signal: class-coloured square
            x[y == c, c % 3, 4:12, 4:12] = 255
        return ImageSplit(x, y)

    cfg = DataConfig("tiny", size, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25),
                     tuple(f"c{i}" for i in range(classes)))
    return DatasetBundle(split(per_class), split(4), cfg)


TINY = dict(num_experts=2, epochs=3, width=8, depth=2, batch_size=16)


def test_dsa_deterministic_and_differentiable():
    x = torch.randn(6, 3, 16, 16, requires_grad=True)
    for s in DSA_STRATEGIES:
        a = dsa_apply(x, s, torch.Generator().manual_seed(3))
        b = dsa_apply(x, s, torch.Generator().manual_seed(3))
        assert a.shape == x.shape and torch.equal(a, b), s
        a.sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all(), s
        x.grad = None
    a = dsa(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, dsa(x, torch.Generator().manual_seed(5)))


def test_dsa_operations():
    x = torch.randn(8, 3, 16, 16)
    cut = dsa_apply(x, "cutout", torch.Generator().manual_seed(0))
    zeros = (cut == 0).all(1).flatten(1).sum(1)
    assert ((zeros > 0) & (zeros <= 64)).all()            # a clipped 8x8 square
    flip = dsa_apply(x, "flip", torch.Generator().manual_seed(0))
    for i in range(8):
        assert torch.equal(flip[i], x[i]) or torch.equal(flip[i], x[i].flip(2))
    crop = dsa_apply(x, "crop", torch.Generator().manual_seed(1))
    assert crop.shape == x.shape
    with pytest.raises(ConfigError):
        dsa(x, torch.Generator(), ["zoom"])


def test_zca_roundtrip():
    x = torch.randn(40, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    z = ZCA.fit(x, eps=0.1)
    assert torch.allclose(z.invert(z(x)), x, atol=1e-4)


def test_config():
    with pytest.raises(ConfigError, match="not implemented"):
        ExpertConfig(gsam=True)
    c = ExpertConfig.for_dataset("cifar10")
    assert (c.num_experts, c.epochs, c.width, c.depth, c.zca) == (100, 50, 128, 3, True)
    assert ExpertConfig.for_dataset("imagewoof").depth == 5
    assert ExpertConfig.for_dataset("shapes") == ExpertConfig()


@pytest.fixture(scope="module")
def buffer_path():
    return train_experts(ExpertConfig(**TINY), tiny_bundle(), device="cpu")


def test_buffer_layout_and_cache(buffer_path, monkeypatch):
    b = load_buffer(buffer_path)
    net = seeded_model(3, 16, {"depth": 2, "width": 8}, torch.Generator().manual_seed(0))
    p = ParamLayout(net).numel
    assert (b.num_experts, b.epochs, b.num_params) == (2, 3, p)
    for i in range(2):
        t = b.trajectory(i)
        assert t.shape == (4, p) and t.dtype == torch.float32
        assert not torch.equal(t[0], t[-1])
        assert 0.0 <= b.test_accs[i] <= 1.0
    assert not torch.equal(b.trajectory(0)[0], b.trajectory(1)[0])   # different inits
    monkeypatch.setattr(ex_train, "ExpertTrainer", None)              # a cache hit trains nothing
    assert train_experts(ExpertConfig(**TINY), tiny_bundle(), device="cpu") == buffer_path


def test_corrupt_and_truncated_files(buffer_path, tmp_path):
    import shutil

    d = tmp_path / "buf"
    shutil.copytree(buffer_path, d)
    f = d / "expert_001.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_buffer(d)
    lazy = load_buffer(d, verify=False)                                # sizes only
    assert lazy.trajectory(0).shape[0] == 4
    with pytest.raises(CheckpointError, match="corrupt"):
        lazy.trajectory(1)
    f.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CheckpointError, match="truncated"):
        load_buffer(d, verify=False)
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError):
        load_buffer(d)
    with pytest.raises(CheckpointError):
        load_buffer(tmp_path / "nothing")


def test_trainer_resume_is_exact(tmp_path, monkeypatch):
    monkeypatch.setenv("NRRDD_CACHE", str(tmp_path))
    cfg, bundle = ExpertConfig(**{**TINY, "num_experts": 1}), tiny_bundle()
    a = ExpertTrainer(cfg, bundle, "cpu")
    a.step()
    state = a.state_dict()
    a.step()
    b = ExpertTrainer(cfg, bundle, "cpu")
    b.load_state_dict(state)
    b.step()
    assert torch.equal(torch.stack(a.snapshots), torch.stack(b.snapshots))
