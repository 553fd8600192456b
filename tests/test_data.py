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


# ---------------------------------------------------------------- npz
def test_npz_cifar10_test_file(shared_data):
    b = load_dataset("npz", root=shared_data, train_file="cifar10_test.npz", test_file=None)
    assert b.train.x.shape == (10000, 3, 32, 32) and b.train.x.dtype == torch.uint8
    assert b.config.name == "cifar10" and b.config.image_size == 32
    assert b.config.class_names == ("airplane", "automobile", "bird", "cat", "deer", "dog",
                                    "frog", "horse", "ship", "truck")
    assert b.train.counts(10).tolist() == [1000] * 10
    assert b.config.mean == (0.4914, 0.4822, 0.4465)
    # channels-first conversion keeps the pixels: compare with the raw file
    with np.load(shared_data / "cifar10_test.npz") as z:
        assert np.array_equal(b.train.x[7].permute(1, 2, 0).numpy(), z["x"][7])


def test_npz_class_name_layouts(shared_data):
    c100 = load_dataset("npz", root=shared_data, train_file="cifar100_exact_train_prefix.npz",
                        test_file="cifar100_exact_test_prefix.npz")
    assert c100.num_classes == 100 and c100.config.class_names[:3] == ("apple", "aquarium_fish", "baby")
    tiny = load_dataset("npz", root=shared_data, train_file="tinyimagenet_val_subset.npz", test_file=None)
    assert tiny.config.name == "tinyimagenet" and tiny.config.image_size == 64
    assert tiny.num_classes == 200 and tiny.config.class_names[0] == "goldfish"
    assert len(tiny.test) == 0 and len(tiny.train) == 800
    assert all(0.2 < m < 0.6 for m in tiny.config.mean)  # computed from the train split


def _write_npz(path, x, y):
    np.savez(path, x=x, y=y)


def test_npz_validation(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    _write_npz(tmp_path / "toy_train.npz", x, np.array([0, 1, 2, 0, 1, 2]))
    _write_npz(tmp_path / "toy_test.npz", x[:3], np.array([0, 1, 2]))
    b = load_dataset("npz", root=tmp_path, train_file="toy_train.npz", test_file="toy_test.npz")
    assert b.config.name == "toy" and b.config.class_names == ("class_0", "class_1", "class_2")
    assert b.config.image_size == 8 and len(b.test) == 3
    (tmp_path / "names.json").write_text('["a", "b", "c"]')
    b = load_dataset("npz", root=tmp_path, train_file="toy_train.npz", test_file=None,
                     classes_file="names.json")
    assert b.config.class_names == ("a", "b", "c")

    with pytest.raises(DataError, match="missing_train.npz"):
        load_dataset("npz", root=tmp_path, train_file="missing_train.npz", test_file=None)
    _write_npz(tmp_path / "f_train.npz", x.astype(np.float32), np.zeros(6, np.int64))
    with pytest.raises(DataError, match="uint8"):
        load_dataset("npz", root=tmp_path, train_file="f_train.npz", test_file=None)
    _write_npz(tmp_path / "c_train.npz", x.transpose(0, 3, 1, 2).copy(), np.zeros(6, np.int64))
    with pytest.raises(DataError, match=r"\(N,H,W,3\)"):
        load_dataset("npz", root=tmp_path, train_file="c_train.npz", test_file=None)
    _write_npz(tmp_path / "big_test.npz", np.zeros((2, 16, 16, 3), np.uint8), np.zeros(2, np.int64))
    with pytest.raises(DataError, match="16px"):
        load_dataset("npz", root=tmp_path, train_file="toy_train.npz", test_file="big_test.npz")
    _write_npz(tmp_path / "bad_test.npz", x[:2], np.array([0, 5]))
    with pytest.raises(DataError, match=r"labels must be in \[0, 3\)"):
        load_dataset("npz", root=tmp_path, train_file="toy_train.npz", test_file="bad_test.npz",
                     classes_file="names.json")


# ---------------------------------------------------------------- torchvision sets
@pytest.mark.parametrize("name,folder", [("cifar10", "cifar-10-batches-py"),
                                         ("cifar100", "cifar-100-python")])
def test_torchvision_sets_offline_error(tmp_path, name, folder):
    with pytest.raises(DataError, match=folder):
        load_dataset(name, root=tmp_path)


# ---------------------------------------------------------------- imagefolder
def _img(path, mode="RGB", size=(20, 12), colour=None):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    colour = colour if colour is not None else {"RGB": (200, 30, 30), "L": 90, "RGBA": (0, 0, 255, 0),
                                                "CMYK": (0, 255, 255, 0), "P": 3}[mode]
    Image.new(mode, size, colour).save(path)


def test_imagefolder_modes_split_and_skips(tmp_path):
    root = tmp_path / "tree"
    for i in range(5):
        _img(root / "cat" / f"{i}.png")
    _img(root / "dog" / "g.png", "L")
    _img(root / "dog" / "a.png", "RGBA")  # fully transparent blue -> white
    _img(root / "dog" / "c.jpg", "CMYK")
    _img(root / "dog" / "p.png", "P")
    (root / "dog" / "broken.jpg").write_bytes(b"not an image")
    (root / "dog" / "notes.txt").write_text("ignored: not an image extension")
    b = load_dataset("imagefolder", root=root, image_size=8, test_fraction=0.4, seed=1)
    assert b.config.class_names == ("cat", "dog") and b.config.image_size == 8
    assert b.source["skipped"] == 1 and "broken.jpg" in b.source["skipped_files"][0]
    assert b.train.x.shape[1:] == (3, 8, 8)
    assert (b.train.counts(2) + b.test.counts(2)).tolist() == [5, 4]
    assert b.test.counts(2).tolist() == [2, 2]
    x = torch.cat([b.train.x, b.test.x])[torch.cat([b.train.y, b.test.y]) == 1]
    pixels = {tuple(v) for v in x[:, :, 4, 4].tolist()}
    assert (90, 90, 90) in pixels and (255, 255, 255) in pixels  # grayscale, RGBA on white
    same = load_dataset("imagefolder", root=root, image_size=8, test_fraction=0.4, seed=1)
    assert torch.equal(same.test.x, b.test.x)
    capped = load_dataset("imagefolder", root=root, image_size=8, max_per_class=2, test_fraction=0.5)
    assert capped.train.counts(2).tolist() == [1, 1] and capped.test.counts(2).tolist() == [1, 1]


def test_imagefolder_resize_centre_crop(tmp_path):
    from PIL import Image

    im = Image.new("RGB", (40, 20), (0, 0, 0))
    im.paste((255, 255, 255), (10, 0, 30, 20))  # white centre square, black sides
    (tmp_path / "a").mkdir()
    im.save(tmp_path / "a" / "x.png")
    b = load_dataset("imagefolder", root=tmp_path, image_size=10, test_fraction=0.0)
    assert b.train.x.shape == (1, 3, 10, 10) and len(b.test) == 0
    # shorter side -> 10 px, centre 10x10 kept: white (bicubic lets the black sides bleed 1 px)
    assert b.train.x[..., 1:-1].min() == 255 and b.train.x.float().mean() > 240


def test_imagefolder_train_val_layout(tmp_path):
    for split, n in (("train", 3), ("val", 2)):
        for c in ("b", "a"):
            for i in range(n):
                _img(tmp_path / split / c / f"{i}.png", size=(9, 9))
    b = load_dataset("imagefolder", root=tmp_path, image_size=8)
    assert b.config.class_names == ("a", "b")
    assert b.train.counts(2).tolist() == [3, 3] and b.test.counts(2).tolist() == [2, 2]
    _img(tmp_path / "val" / "zebra" / "0.png")
    with pytest.raises(DataError, match="zebra"):
        load_dataset("imagefolder", root=tmp_path, image_size=8)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset("imagefolder", root=tmp_path / "missing")
    with pytest.raises(DataError, match="no class sub-folders"):
        load_dataset("imagefolder", root=tmp_path)
    _img(tmp_path / "ok" / "0.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        load_dataset("imagefolder", root=tmp_path, image_size=8)
    (tmp_path / "empty" / "bad.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match=r"no readable images in .*empty"):
        load_dataset("imagefolder", root=tmp_path, image_size=8)
    with pytest.raises(ConfigError):
        load_dataset("imagefolder", root=tmp_path, test_fraction=1.0)


# ---------------------------------------------------------------- imagenet_subset
def test_imagenet_subset_index_mapping(tmp_path):
    from nrrdd_core.data.imagefolder import IMAGENET_SUBSETS

    wnids = [f"n{i:08d}" for i in range(1000)]
    rng = np.random.default_rng(0)
    for w in rng.permutation(wnids):  # creation order must not matter
        (tmp_path / "train" / w).mkdir(parents=True)
    idx = IMAGENET_SUBSETS["imagewoof"]
    for k, i in enumerate(idx):  # class k of the subset: grey level k*20, 2 train images
        for j in range(2):
            _img(tmp_path / "train" / wnids[i] / f"{j}.png", "L", (8, 8), k * 20)
    b = load_dataset("imagenet_subset", root=tmp_path, subset="imagewoof", image_size=8)
    assert b.config.name == "imagewoof" and b.config.image_size == 8
    assert b.class_map == idx and b.num_classes == 10 and len(b.test) == 0
    assert b.config.class_names[0] == "Australian terrier" and b.config.mean == (0.485, 0.456, 0.406)
    assert b.train.counts(10).tolist() == [2] * 10
    assert torch.equal(b.train.x[:, 0, 0, 0], b.train.y.to(torch.uint8) * 20)
    sub = b.subset(["Australian terrier", 3])
    assert sub.class_map == (193, 162)
    (tmp_path / "val").mkdir()
    with pytest.raises(DataError, match=wnids[idx[0]]):
        load_dataset("imagenet_subset", root=tmp_path, subset="imagewoof", image_size=8)
    with pytest.raises(ConfigError, match="imagenette"):
        load_dataset("imagenet_subset", root=tmp_path, subset="imagecats")
    (tmp_path / "train" / wnids[0]).rmdir()
    with pytest.raises(DataError, match="999 class folders"):
        load_dataset("imagenet_subset", root=tmp_path, subset="imagewoof")
