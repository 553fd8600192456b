"""Dataset entries of ``nrrdd_core.data``: shapes, npz, cifar10/100, imagefolder, imagenet_subset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nrrdd_core.data import list_datasets, load_dataset
from nrrdd_core.data import shapes
from nrrdd_core.data.shapes import CLASS_NAMES
from nrrdd_core.errors import ConfigError, DataError

SMALL = {"train_per_class": 3, "test_per_class": 2}


def test_registry_lists_every_entry():
    assert {"shapes", "npz", "cifar10", "cifar100", "imagefolder",
            "imagenet_subset"} <= set(list_datasets())


@pytest.mark.parametrize("size", [32, 64])
def test_shapes_counts_classes_sizes(size):
    b = load_dataset("shapes", image_size=size, **SMALL)
    assert b.train.x.shape == (30, 3, size, size) and b.train.x.dtype == torch.uint8
    assert b.test.x.shape == (20, 3, size, size)
    assert b.train.counts(10).tolist() == [3] * 10 and b.test.counts(10).tolist() == [2] * 10
    assert b.config.class_names == CLASS_NAMES == (
        "circle", "triangle", "square", "pentagon", "hexagon", "star", "cross", "ring",
        "crescent", "arrow")
    assert b.config.name == "shapes" and b.config.image_size == size
    assert b.class_map == tuple(range(10))


def test_shapes_deterministic_and_seeded(tmp_path, monkeypatch):
    a = load_dataset("shapes", seed=3, **SMALL)
    assert load_dataset("shapes", seed=3, **SMALL) is a  # in-process cache
    # bypassing both caches (fresh cache folder) regenerates identical tensors and writes the npz
    monkeypatch.setenv("NRRDD_CACHE", str(tmp_path))
    fresh = shapes._cached_bundle.__wrapped__(32, 3, 3, 2)
    assert torch.equal(fresh.train.x, a.train.x) and torch.equal(fresh.test.x, a.test.x)
    assert torch.equal(fresh.train.y, a.train.y)
    assert len(list((tmp_path / "datasets").glob("shapes-*.npz"))) == 1
    again = shapes._cached_bundle.__wrapped__(32, 3, 3, 2)  # read back from the npz
    assert torch.equal(again.train.x, a.train.x)
    other = load_dataset("shapes", seed=4, **SMALL)
    assert not torch.equal(other.train.x, a.train.x)
    # order independent: a smaller set is a prefix of a larger one; train differs from test
    bigger = load_dataset("shapes", seed=3, train_per_class=5, test_per_class=2)
    assert torch.equal(bigger.train.x[:30], a.train.x)
    assert not torch.equal(a.train.x[:20], a.test.x)


def test_shapes_images_are_varied_and_stats_fixed():
    b = load_dataset("shapes", **SMALL)
    x = b.train.float01()
    assert x.std() > 0.1 and len({tuple(v) for v in x.mean((2, 3)).tolist()}) == 30
    assert all(0.4 < m < 0.6 for m in b.config.mean) and all(0.15 < s < 0.3 for s in b.config.std)


def test_shapes_bad_kwargs():
    with pytest.raises(ConfigError):
        load_dataset("shapes", image_size=4)
    with pytest.raises(ConfigError):
        load_dataset("shapes", train_per_class=0)


def test_subset_by_name_and_index_relabels():
    b = load_dataset("shapes", **SMALL)
    s = load_dataset("shapes", classes=["star", "circle", 7], **SMALL)
    assert s.class_map == (0, 5, 7)
    assert s.config.class_names == ("circle", "star", "ring")
    assert sorted(s.train.y.unique().tolist()) == [0, 1, 2] and len(s.train) == 9
    assert torch.equal(s.train.x[s.train.y == 1], b.train.x[b.train.y == 5])
    with pytest.raises(DataError, match="unknown class"):
        load_dataset("shapes", classes=["dodecahedron"], **SMALL)
    with pytest.raises(DataError, match="out of range"):
        load_dataset("shapes", classes=[10], **SMALL)


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("nope")
