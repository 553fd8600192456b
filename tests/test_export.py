"""Export / import of distilled sets: bit-identical round trip, names, atomic writes, listing."""

from __future__ import annotations

import io
import json
import logging
import zipfile

import pytest
import torch
from torch import nn

from nrrdd_core.data.base import DataConfig, DatasetBundle, ImageSplit, to_float01, to_uint8
from nrrdd_core.device import make_generator
from nrrdd_core.errors import ConfigError, DataError
from nrrdd_core.export import (build_manifest, delete_run, list_evals, list_runs, load_run,
                               save_eval, save_run, zip_run)
from nrrdd_core.models.teacher import Teacher


def sample(n=6, s=8):
    x = torch.rand(n, 3, s, s, generator=make_generator(0))
    return x, torch.tensor([0, 0, 3, 3, 7, 7][:n])


def test_png_round_trip_is_bit_identical(tmp_path):
    x, y = sample()
    path = save_run(tmp_path, "r1", x, y, {"method": "test", "seed": 3})
    run = load_run(path)
    assert torch.equal(run.images01, to_float01(to_uint8(x)))
    assert torch.equal(run.labels, y) and run.labels.dtype == torch.int64
    assert run.manifest["method"] == "test" and run.manifest["format"] == "png"
    assert run.manifest["images"][2] == "0003_0000.png" and run.manifest["num_images"] == 6
    assert {"torch", "torchvision", "nrrdd_core"} <= set(run.manifest["versions"])
    again = save_run(tmp_path, "r2", run.images01, run.labels, run.manifest)
    assert torch.equal(load_run(again).images01, run.images01)


def test_jpeg_option(tmp_path):
    x, y = sample()
    run = load_run(save_run(tmp_path, "j", x, y, {}, fmt="jpeg"))
    assert run.images01.shape == x.shape and run.manifest["images"][0].endswith(".jpg")
    with pytest.raises(ConfigError):
        save_run(tmp_path, "g", x, y, {}, fmt="gif")


@pytest.mark.parametrize("name", ["", " ", "a/b", "..", ".", ".hidden", "a\\b", "../x"])
def test_bad_names_are_rejected(tmp_path, name):
    x, y = sample()
    with pytest.raises(ConfigError):
        save_run(tmp_path, name, x, y, {})
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_and_overwrite(tmp_path):
    x, y = sample()
    save_run(tmp_path, "r", x, y, {"v": 1})
    with pytest.raises(ConfigError):
        save_run(tmp_path, "r", x, y, {"v": 2})
    with pytest.raises(FileNotFoundError):  # fails half-way: nothing is left behind
        save_run(tmp_path, "r", x, y, {"v": 2}, overwrite=True, label_files={"extra": tmp_path / "missing"})
    assert load_run(tmp_path / "r").manifest["v"] == 1
    save_run(tmp_path, "r", x[:2], y[:2], {"v": 3}, overwrite=True)
    assert load_run(tmp_path / "r").manifest["v"] == 3 and len(load_run(tmp_path / "r").labels) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # no temp folders left


def test_list_delete_zip_and_evals(tmp_path, caplog):
    x, y = sample()
    for name in ("b", "a"):
        save_run(tmp_path, name, x, y, {"method": name})
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text("{not json")
    with caplog.at_level(logging.WARNING):
        runs = list_runs(tmp_path)
    assert [r.name for r in runs] == ["a", "b"] and runs[0].manifest["method"] == "a"
    assert "broken" in caplog.text
    with zipfile.ZipFile(io.BytesIO(zip_run(tmp_path / "a"))) as zf:
        names = zf.namelist()
    assert "a/manifest.json" in names and "a/labels_hard.pt" in names and "a/images/0000_0000.png" in names
    save_eval(tmp_path / "a", {"final_acc": 0.5, "config": {"student": "s", "label_mode": "dbr", "seed": 1}})
    save_eval(tmp_path / "a", {"final_acc": 0.6, "config": {"student": "s", "label_mode": "dbr", "seed": 1}})
    assert [e["final_acc"] for e in list_evals(tmp_path / "a")] == [0.5, 0.6]
    with pytest.raises(DataError):
        delete_run(tmp_path / "broken" / "nothing")
    delete_run(tmp_path / "a")
    assert [r.name for r in list_runs(tmp_path)] == ["b"]
    with pytest.raises(DataError):
        load_run(tmp_path / "a")


def test_build_manifest_is_json():
    dc = DataConfig("tiny", 8, (0.5,) * 3, (0.25,) * 3, ("x", "y", "z"))
    split = ImageSplit(torch.zeros(3, 3, 8, 8, dtype=torch.uint8), torch.arange(3))
    teacher = Teacher(nn.Sequential(nn.Flatten(), nn.Linear(192, 3)), "tiny", dc, "0", test_acc=0.9)
    m = build_manifest(method="rded", config={"factor": 1}, teacher=teacher,
                       bundle=DatasetBundle(split, split, dc), classes=[0, 2], ipc=1, seed=0,
                       teacher_ref="shipped", dataset_args={"seed": 0}, timings={"seconds": 1.0})
    assert m["dataset"]["class_names"] == ["x", "z"] and m["teacher"]["test_acc"] == 0.9
    assert json.loads(json.dumps(m)) == m


def test_extras_round_trip_and_damage(tmp_path):
    x, y = sample()
    logits = torch.randn(6, 10, generator=make_generator(1))
    extras = {"label_logits": logits, "syn_lr": 0.0123, "arch_kwargs": {"depth": 2, "width": 8},
              "zca_eps": None}
    run = load_run(save_run(tmp_path, "e", x, y, {"method": "edf"}, extras=extras))
    assert set(run.extras) == set(extras) and torch.equal(run.extras["label_logits"], logits)
    assert run.extras["syn_lr"] == 0.0123 and run.extras["arch_kwargs"] == {"depth": 2, "width": 8}
    assert run.manifest["extra_tensors"] == {"label_logits": [6, 10]} and run.extras["zca_eps"] is None
    assert load_run(save_run(tmp_path, "plain", x, y, run.manifest)).extras == {}  # not carried over
    (run.path / "extras.pt").unlink()
    with pytest.raises(DataError, match="label_logits"):
        load_run(run.path)
    for bad in ({"no-id": 1}, {"obj": object()}):
        with pytest.raises(ConfigError):
            save_run(tmp_path, "bad", x, y, {}, extras=bad)
    assert not (tmp_path / "bad").exists()
