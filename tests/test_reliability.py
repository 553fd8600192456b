"""Reliability: a generated corpus of bad inputs (spiked image folders, hostile and damaged
checkpoints and run folders, hostile names and paths) fed to the library, the ``nrrdd`` command
(a few real subprocesses: exit code 2, one ``error:`` line, no traceback) and the Runs page
(AppTest: ``st.error``, no exception). Every hostile case also checks that nothing outside the
runs folder changed and that no finished run was lost. One test per class of defect of issue 12.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nrrdd_core.configs import ConfigBase
from nrrdd_core.data import load_dataset
from nrrdd_core.errors import CheckpointError, ConfigError, DataError, NonFiniteLossError, \
    TeacherMismatchError
from nrrdd_core.export import (build_manifest, check_name, delete_run, list_evals, list_runs,
                               load_run, recover_runs, reserve_run, release_run, run_test_classes,
                               save_eval, save_run, zip_run)
from nrrdd_core.io import safe_torch_load
from nrrdd_core.models import Teacher, build_model, public_checkpoint_data_config
from nrrdd_core.models.resnet_cifar import CIFAR10_CLASSES

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"train_per_class": 6, "test_per_class": 2}
SHAPES_ARGS = ["--dataset", "shapes", "--dataset-opt", "train_per_class=6",
               "--dataset-opt", "test_per_class=2"]


# ---- helpers -----------------------------------------------------------------------------------
def tree(path: Path) -> dict[str, str]:
    """``{relative path: sha256 or '->target'}`` of everything under ``path`` (links not followed)."""
    out = {}
    for folder, dirs, files in os.walk(path, followlinks=False):
        for name in dirs + files:
            p = Path(folder) / name
            rel = str(p.relative_to(path))
            if p.is_symlink():
                out[rel] = "->" + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def outside_folder(tmp_path: Path) -> Path:
    """A folder beside the runs folder whose content must never change."""
    out = tmp_path / "outside"
    (out / "sub").mkdir(parents=True, exist_ok=True)
    (out / "precious.txt").write_text("do not touch")
    (out / "sub" / "manifest.json").write_text(json.dumps({"images": []}))
    return out


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture(scope="module")
def bundle():
    return load_dataset("shapes", **SHAPES)


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory, bundle) -> Path:
    torch.manual_seed(0)
    model = build_model("convnet_bn", 10, 32, width=8)
    path = tmp_path_factory.mktemp("teacher") / "tiny.pt"
    Teacher(model, "convnet_bn", bundle.config, "features", {"width": 8}).save(path)
    return path


def a_run(root: Path, name: str, teacher_path: Path, bundle, n: int = 4, **extra) -> Path:
    t = Teacher.load(teacher_path)
    x, y = bundle.train.float01(torch.arange(n)), bundle.train.y[:n]
    mf = build_manifest(method="rded", config={}, teacher=t, bundle=bundle,
                        classes=sorted(set(y.tolist())), ipc=1, seed=0, dataset_args=SHAPES, **extra)
    return save_run(root, name, x, y, mf)


def cli(*argv: str, env: dict | None = None) -> subprocess.Popen:
    e = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "nrrdd_core.cli", *argv], cwd=ROOT, env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def one_line_error(proc: subprocess.Popen) -> str:
    """The single ``error:`` line of a finished CLI call that must have failed with code 2."""
    out, err = proc.communicate(timeout=600)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == 2, (proc.args, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


class Evil:
    """Unpickling this runs code (writes a marker file)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


# ---- silently wrong results --------------------------------------------------------------------
def test_npz_test_file_follows_the_train_file(tmp_path):
    rng = np.random.default_rng(0)

    def write(name, n_classes):
        np.savez(tmp_path / name, x=rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8),
                 y=np.arange(4) % n_classes)

    write("cifar100_exact_train_prefix.npz", 4)
    write("cifar100_exact_test_prefix.npz", 4)
    write("cifar10_test.npz", 2)
    b = load_dataset("npz", root=tmp_path, train_file="cifar100_exact_train_prefix.npz")
    assert b.source["test_file"] == "cifar100_exact_test_prefix.npz"
    with pytest.raises(DataError, match="cifar100_exact_test_prefix.npz"):  # CIFAR-10's test set
        load_dataset("npz", root=tmp_path, train_file="cifar100_exact_train_prefix.npz",
                     test_file="cifar10_test.npz")
    write("mine.npz", 2)
    with pytest.raises(DataError, match="test file"):  # no 'train' part: refuse, do not guess
        load_dataset("npz", root=tmp_path, train_file="mine.npz")


def test_public_checkpoint_needs_the_cifar10_classes_in_order(bundle):
    dc = public_checkpoint_data_config(bundle.config.class_names)  # shapes: 10 other names
    with pytest.raises(TeacherMismatchError, match="class names differ"):
        Teacher(build_model("resnet20_cifar", 10, 32), "resnet20_cifar", dc, "layer3") \
            .check_compatible(replace(dc, class_names=bundle.config.class_names))
    swapped = list(CIFAR10_CLASSES)
    swapped[0], swapped[9] = swapped[9], swapped[0]  # "airplane" images that are trucks
    assert public_checkpoint_data_config(swapped).class_names == CIFAR10_CLASSES
    names100 = tuple(f"c{i}" for i in range(100))
    assert public_checkpoint_data_config(names100).class_names == names100


def test_evaluate_refuses_classes_the_run_lacks_and_records_what_it_tested(tmp_path, bundle,
                                                                           teacher_path):
    path = a_run(tmp_path / "runs", "r", teacher_path, bundle)  # classes of the first 4 images
    m = load_run(path).manifest
    own = m["dataset"]["class_names"]
    other = next(c for c in bundle.config.class_names if c not in own)
    with pytest.raises(DataError, match=other):
        run_test_classes(m, bundle, [other])
    assert run_test_classes(m, bundle, None) == bundle.resolve_classes(own)
    save_eval(path, {"final_acc": 0.5, "config": {}}, dataset={"name": "shapes"},
              test_classes=own)
    save_eval(path, {"final_acc": 0.5, "config": {}})  # the app's call: the run's own set
    ev, default = list_evals(path)
    assert ev["dataset"] == {"name": "shapes"} and ev["test_classes"] == own
    assert default["dataset"]["name"] == "shapes" and default["test_classes"] == own


def _png(path: Path, arr: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path) if mode else Image.fromarray(arr).save(path)


def test_imagefolder_cap_is_validated_and_counts_readable_images(tmp_path, caplog):
    from nrrdd_core.data.imagefolder import load_imagefolder

    root = tmp_path / "spiked"
    for c in ("a", "b"):
        for k in range(2):  # the first files of each class are unreadable
            (root / c).mkdir(parents=True, exist_ok=True)
            (root / c / f"0{k}_broken.png").write_bytes(b"\x89PNG not really")
        for k in range(3):
            _png(root / c / f"1{k}.png", np.full((8, 8, 3), 40 * k, np.uint8))
    for bad in (-3, 0, 2.5, True, "3"):
        with pytest.raises(ConfigError, match="max_per_class"):
            load_imagefolder(root, image_size=8, max_per_class=bad)
    b = load_imagefolder(root, image_size=8, max_per_class=2, test_fraction=0.5)
    assert (b.train.counts(2) + b.test.counts(2)).tolist() == [2, 2]
    assert any("broken.png" in r.getMessage() for r in caplog.records)


def test_every_decoded_image_is_what_a_viewer_shows(tmp_path, caplog, monkeypatch):
    from nrrdd_core.data.imagefolder import load_rgb

    d = tmp_path / "modes"
    d.mkdir()
    expect = {}
    g16 = np.full((8, 8), 128 * 257, np.uint16)  # 16-bit grey: mid grey, not white
    Image.fromarray(g16).save(d / "grey16.png")
    expect["grey16.png"] = (128, 128, 128)
    pal = Image.new("P", (8, 8))
    pal.putpalette([10, 200, 30] + [0] * 765)
    pal.save(d / "palette.png")
    expect["palette.png"] = (10, 200, 30)
    pal.save(d / "palette_transparent.png", transparency=0)
    expect["palette_transparent.png"] = (255, 255, 255)
    Image.new("LA", (8, 8), (0, 0)).save(d / "la_clear.png")
    expect["la_clear.png"] = (255, 255, 255)
    Image.new("RGBA", (8, 8), (255, 0, 0, 255)).save(d / "rgba.png")
    expect["rgba.png"] = (255, 0, 0)
    Image.new("CMYK", (8, 8), (255, 0, 0, 0)).save(d / "cmyk.jpg", quality=100)
    expect["cmyk.jpg"] = (0, 255, 255)
    Image.fromarray(np.full((8, 8), 0.5, np.float32), "F").save(d / "float.tif")
    expect["float.tif"] = (128, 128, 128)
    Image.new("1", (8, 8), 1).save(d / "bilevel.png")
    expect["bilevel.png"] = (255, 255, 255)
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.new("RGB", (8, 8), (200, 30, 60)).save(d / "srgb_profile.png", icc_profile=srgb)
    expect["srgb_profile.png"] = (200, 30, 60)
    Image.new("RGB", (8, 8), (200, 30, 60)).save(d / "bad_profile.png", icc_profile=b"junk")
    expect["bad_profile.png"] = (200, 30, 60)  # an unusable profile is ignored, not fatal
    for f, rgb in expect.items():
        got = load_rgb(d / f, 8)
        assert got.shape == (8, 8, 3) and got.dtype == np.uint8
        assert np.abs(got.reshape(-1, 3).mean(0) - rgb).max() <= 3, (f, got.reshape(-1, 3).mean(0))
    used = []
    real = ImageCms.profileToProfile
    monkeypatch.setattr(ImageCms, "profileToProfile", lambda im, *a, **k: used.append(im.mode)
                        or real(im, *a, **k))
    load_rgb(d / "srgb_profile.png", 8)  # the embedded profile goes through colour management
    assert used == ["RGB"]
    # EXIF orientation 6 (shown rotated 90 degrees clockwise): left half red -> top half red
    arr = np.zeros((8, 16, 3), np.uint8)
    arr[:, :8] = (255, 0, 0)
    arr[:, 8:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(d / "rotated.jpg", exif=exif, quality=95)
    got = load_rgb(d / "rotated.jpg", 8).astype(int)
    assert got[0, :, 0].mean() > 200 and got[-1, :, 2].mean() > 200
    # no single sensible picture: skipped with a warning naming the file
    Image.fromarray(np.full((8, 8), 7.0, np.float32), "F").save(d / "float_big.tif")
    with pytest.raises(ValueError):
        load_rgb(d / "float_big.tif", 8)
    from nrrdd_core.data.imagefolder import load_imagefolder

    folder = tmp_path / "mixed" / "only"
    folder.mkdir(parents=True)
    for f in [*expect, "float_big.tif"]:
        (folder / f).write_bytes((d / f).read_bytes())
    b = load_imagefolder(tmp_path / "mixed", image_size=8, test_fraction=0)
    assert len(b.train) == len(expect) and b.source["skipped"] == 1
    assert any("float_big.tif" in r.getMessage() for r in caplog.records)


# ---- lost work ---------------------------------------------------------------------------------
def test_output_paths_are_checked_before_any_work(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for root, name in ((a_file, "r"), (a_file / "below", "r"), (Path("/proc/nrrdd_runs"), "r"),
                       (tmp_path / "ok", "n" * 240), (tmp_path / "ok", "é" * 120),
                       (tmp_path / "ok", "../escape"), (tmp_path / "ok", ".hidden"),
                       (tmp_path / "ok", "two\nlines"), (tmp_path / "ok", "\udcff")):
        with pytest.raises(ConfigError):
            reserve_run(root, name)
    assert a_file.read_text() == "x" and not (tmp_path / "escape").exists()
    assert check_name("n" * 200) and not list((tmp_path / "ok").glob(".*"))
    from nrrdd_core.export import check_output_file

    with pytest.raises(ConfigError, match="folder"):
        check_output_file(tmp_path)
    with pytest.raises(ConfigError, match="is a file"):
        check_output_file(a_file / "teacher.pt")


def test_second_process_saving_the_same_name_is_refused_before_starting(tmp_path, bundle,
                                                                         teacher_path):
    root = tmp_path / "runs"
    root.mkdir()
    (root / ".r.lock").write_text(str(os.getppid()))  # a live process holds the name
    with pytest.raises(ConfigError, match="another process"):
        reserve_run(root, "r")
    (root / ".r.lock").write_text(str(dead_pid()))  # its holder is gone: the name is free
    assert reserve_run(root, "r") == root / "r"
    a_run(root, "r", teacher_path, bundle)  # the holder saves; the reservation is kept
    assert (root / ".r.lock").is_file()
    release_run(root, "r")
    assert not (root / ".r.lock").exists() and load_run(root / "r").labels.numel() == 4


def test_interrupted_overwrite_is_recovered_and_temp_folders_cleaned(tmp_path, bundle,
                                                                     teacher_path):
    root = tmp_path / "runs"
    a_run(root, "old", teacher_path, bundle, n=2)
    a_run(root, "new", teacher_path, bundle, n=3)
    pid = dead_pid()
    # killed between the two renames of --overwrite, with the new run complete: it is put in place
    os.replace(root / "old", root / f".x.old-{pid}-a")
    os.replace(root / "new", root / f".x.tmp-{pid}-b")
    # killed before the new run was complete: the old run comes back
    a_run(root, "y_old", teacher_path, bundle, n=2)
    os.replace(root / "y_old", root / f".y.old-{pid}-c")
    (root / f".y.tmp-{pid}-d" / "images").mkdir(parents=True)
    (root / f".z.tmp-{pid}-e").mkdir()  # kill -9 during a plain save
    (root / f".w.tmp-{os.getpid()}-f").mkdir()  # a save in progress in this process: kept
    actions = recover_runs(root)
    assert len(actions) >= 3
    assert len(load_run(root / "x").labels) == 3 and len(load_run(root / "y").labels) == 2
    assert sorted(p.name for p in root.iterdir()) == [f".w.tmp-{os.getpid()}-f", "x", "y"]
    # save_run itself: the old run stays loadable until the new one replaces it
    with pytest.raises(ConfigError, match="exists"):
        a_run(root, "x", teacher_path, bundle, n=2)
    t = Teacher.load(teacher_path)
    mf = build_manifest(method="rded", config={}, teacher=t, bundle=bundle, classes=[0], ipc=1,
                        seed=0)
    save_run(root, "x", bundle.train.float01(torch.arange(1)), bundle.train.y[:1], mf,
             overwrite=True)
    assert len(load_run(root / "x").labels) == 1


def test_delete_zip_and_load_stay_inside_the_runs_folder(tmp_path, bundle, teacher_path):
    outside = outside_folder(tmp_path)
    before = tree(outside)
    root = tmp_path / "runs"
    a_run(root, "good", teacher_path, bundle)
    (root / "manifest.json").write_text(json.dumps({"images": []}))  # a manifest in the root
    (root / "x").mkdir()
    (root / "link").symlink_to(outside / "sub", target_is_directory=True)
    (root / "good" / "images" / "stolen.png").symlink_to(outside / "precious.txt")
    for hostile in (root / "x" / "..", root / ".", root / "link", root / "good" / ".." / "..",
                    outside / "sub"):
        for op in (load_run, zip_run):
            with pytest.raises(DataError):
                op(hostile, root)
        if hostile != root / "link":
            with pytest.raises(DataError):
                delete_run(hostile, root)
    with pytest.raises(DataError):
        delete_run(root / "x" / "..")  # default root: still refused
    names = {n for n in zip_run(root / "good", root).decode("latin-1").split("\0") if n}
    assert not any("stolen" in n for n in names)  # a link inside is never followed
    delete_run(root / "link", root)  # removes the link itself
    assert not (root / "link").exists() and tree(outside) == before
    assert load_run(root / "good").labels.numel() == 4  # finished work still there


# ---- crashes and unclear messages --------------------------------------------------------------
def test_damaged_runs_are_listed_with_the_reason(tmp_path, bundle, teacher_path):
    root = tmp_path / "runs"
    a_run(root, "good", teacher_path, bundle)
    (root / "list").mkdir()
    (root / "list" / "manifest.json").write_text("[]")
    (root / "truncated").mkdir()
    (root / "truncated" / "manifest.json").write_text('{"images": [')
    a_run(root, "nodataset", teacher_path, bundle)
    mf = json.loads((root / "nodataset" / "manifest.json").read_text())
    del mf["dataset"]
    (root / "nodataset" / "manifest.json").write_text(json.dumps(mf))
    (root / "linked").symlink_to(root / "good", target_is_directory=True)
    runs = {r.name: r for r in list_runs(root, damaged=True)}
    assert {n for n, r in runs.items() if r.error} == {"list", "truncated", "linked"}
    assert "list" in runs["list"].error and "link" in runs["linked"].error
    assert [r.name for r in list_runs(root)] == ["good", "nodataset"]
    for name in ("list", "truncated", "linked"):
        delete_run(root / name, root)
    assert sorted(p.name for p in root.iterdir()) == ["good", "nodataset"]


def test_our_checkpoints_with_bad_content_name_the_file(tmp_path, teacher_path):
    good = torch.load(teacher_path, weights_only=True)
    cases = {"kwargs.pt": {**good, "arch_kwargs": {"nope": 1}},
             "kwargs_list.pt": {**good, "arch_kwargs": [1, 2]},
             "no_data_config.pt": {k: v for k, v in good.items() if k != "data_config"},
             "bad_data_config.pt": {**good, "data_config": {"name": "x"}},
             "no_weights.pt": {k: v for k, v in good.items() if k != "state_dict"},
             "arch.pt": {**good, "arch": "no_such_net"},
             "weights.pt": {**good, "state_dict": {"w": torch.zeros(1)}}}
    for name, obj in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(CheckpointError, match=name):
            Teacher.load(tmp_path / name)
    (tmp_path / "truncated.pt").write_bytes(teacher_path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        Teacher.load(tmp_path / "truncated.pt")


def test_unsafe_checkpoints_are_refused_without_suggesting_weights_only_false(tmp_path):
    marker = tmp_path / "marker"
    torch.save({"state_dict": {}, "evil": Evil(marker)}, tmp_path / "evil.pt")
    (tmp_path / "legacy.pt").write_bytes(pickle.dumps(Evil(marker)))
    for f in ("evil.pt", "legacy.pt"):
        with pytest.raises(CheckpointError) as info:
            safe_torch_load(tmp_path / f)
        assert f in str(info.value) and "weights_only" not in str(info.value)
        with pytest.raises(CheckpointError):
            Teacher.load(tmp_path / f)
    assert not marker.exists()


def test_caches_repair_themselves(tmp_path, monkeypatch, bundle):
    monkeypatch.setenv("NRRDD_CACHE", str(tmp_path / "cache"))
    from nrrdd_core.zca import ZCA, zca_for

    small = bundle.subset([0, 1])
    small.config = replace(small.config, image_size=8)
    small.train.x = small.train.x[:, :, :8, :8].contiguous()
    z = zca_for(small)
    f = next((tmp_path / "cache" / "zca").glob("*.pt"))
    f.write_bytes(f.read_bytes()[:100])  # truncated
    assert torch.equal(zca_for(small).matrix, z.matrix) and len(f.read_bytes()) > 100
    torch.save({"mean": torch.zeros(3)}, f)  # loads, wrong content
    assert torch.equal(zca_for(small).matrix, z.matrix)
    with pytest.raises(CheckpointError, match="zca.pt"):
        ZCA.from_state({"mean": torch.zeros(4), "matrix": torch.eye(3), "inverse": torch.eye(3)},
                       "zca.pt")
    # the label store: a damaged epoch is labelled again, a bad store.json restarts the store
    from nrrdd_core.labels import AugSpec, LossSpec, SoftLabelStore, epoch_batches

    t = Teacher(build_model("convnet_bn", 10, 32, width=8), "convnet_bn", bundle.config,
                "features", {"width": 8})
    x, y = bundle.train.float01(torch.arange(4)), bundle.train.y[:4]
    store = SoftLabelStore(tmp_path / "labels", "dbr", num_values=2, num_images=4)
    gen = torch.Generator().manual_seed(0)
    ls = LossSpec(mode="dbr")
    first = [b.values for b in epoch_batches(x, y, 2, gen, AugSpec(), ls, t, store, 1)]
    store.aug_path(1).write_bytes(b"\0" * 10)
    again = [b.values for b in epoch_batches(x, y, 2, gen, AugSpec(), ls, t, store, 1)]
    assert len(again) == len(first) and store.read_epoch(1)[1].shape == (4, 2)
    torch.save({"sizes": torch.tensor([9])}, store.aug_path(1))  # loads, wrong content
    assert len(list(epoch_batches(x, y, 2, gen, AugSpec(), ls, t, store, 1))) == 2
    (tmp_path / "labels" / "store.json").write_text("[]")
    assert SoftLabelStore(tmp_path / "labels", "dbr", num_values=2, num_images=4).meta["epochs"] == []
    # an upload whose stored copy is damaged is replaced by uploading the good file again
    from nrrdd_core.models.ref import TeacherRef

    data = b"checkpoint bytes"
    ref = TeacherRef.store_upload(data)
    ref.checkpoint_path().write_bytes(data[:5])
    assert TeacherRef.store_upload(data) == ref and ref.checkpoint_path().read_bytes() == data


def test_expert_buffers_with_bad_content_name_the_file(tmp_path):
    from nrrdd_core.experts import load_buffer

    buf = tmp_path / "buffer"
    buf.mkdir()
    for manifest in ("[]", '{"experts": [1]}', '{"experts": [{"file": "../x", "bytes": 1, '
                     '"sha256": "0"}]}', '{"experts": [], "epochs": "many"}'):
        (buf / "manifest.json").write_text(manifest)
        with pytest.raises(CheckpointError, match="manifest.json"):
            load_buffer(buf)


def test_nan_messages_are_true_per_method(bundle, teacher_path):
    from nrrdd_core.methods import list_methods, make_distiller

    t = Teacher.load(teacher_path)
    for method in ("rded", "sre2l"):
        if method not in list_methods():
            continue
        d = make_distiller(method, None, teacher=t, dataset=bundle, classes=[0], ipc=1,
                           device="cpu")
        with pytest.raises(NonFiniteLossError) as info:
            d.check_finite({"loss": float("nan")})
        has_lr = any(n == "lr" or n.startswith("lr_") for n in d.config.to_dict())
        assert ("lower" in str(info.value)) == has_lr, str(info.value)
        assert "last good" in str(info.value)


def test_infinities_are_refused_in_every_float_field():
    from nrrdd_core.evaluate import EvalConfig
    from nrrdd_core.experts import ExpertConfig
    from nrrdd_core.methods import get_method, list_methods
    from nrrdd_core.models import TeacherTrainConfig

    classes = [EvalConfig, ExpertConfig, TeacherTrainConfig, *(get_method(m).Config
                                                              for m in list_methods())]
    checked = 0
    for cls in classes:
        assert issubclass(cls, ConfigBase)
        for row in cls.describe():
            if row["type"] != "float":
                continue
            for v in ("inf", "-inf", "nan"):
                with pytest.raises(ConfigError, match=row["name"]):
                    cls.from_dict({row["name"]: v})
            checked += 1
    assert checked > 10


def test_long_runs_print_an_estimated_duration(monkeypatch, capsys):
    from nrrdd_core import cli

    clock = iter(range(100))
    monkeypatch.setattr(cli.time, "perf_counter", lambda: float(next(clock)))
    bar = cli._Bar("nrrdd")
    for step in range(1, 6):
        bar(step, 1000)  # 1 s per step, 1000 steps
    bar.close()
    err = capsys.readouterr().err
    assert err.count("estimated duration") == 1 and "17 min more (996 steps" in err
    short = cli._Bar("short")
    for step in range(1, 6):
        short(step, 10)
    short.close()
    assert "estimated duration" not in capsys.readouterr().err


# ---- the CLI: Ctrl-C and non-finite losses keep the work -----------------------------------------
@pytest.mark.parametrize("failure", ["ctrl_c", "nan"])
def test_cli_saves_the_partial_run(tmp_path, monkeypatch, capsys, teacher_path, failure):
    from nrrdd_core.cli import main
    from nrrdd_core.methods.base import Distiller

    real_step = Distiller.step

    def step(self):
        if self.step_index == 2:
            if failure == "ctrl_c":
                raise KeyboardInterrupt
            raise NonFiniteLossError("sre2l: loss term 'bn' is nan at step 2; the images of the "
                                     "last good step are kept", step=2, term="bn")
        return real_step(self)

    monkeypatch.setattr(Distiller, "step", step)
    code = main(["distill", "--method", "sre2l", *SHAPES_ARGS, "--classes", "circle,star",
                 "--ipc", "1", "--teacher", str(teacher_path), "--out", str(tmp_path), "--name",
                 "r", "--device", "cpu", "--iterations", "5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == (130 if failure == "ctrl_c" else 2) and len(err) == 1, err
    assert str(tmp_path / "r") in err[0]
    run = load_run(tmp_path / "r")
    assert run.manifest["complete"] is False and "2 of 5 steps" in run.manifest["stopped"]
    assert run.images01.shape == (2, 3, 32, 32) and not list(tmp_path.glob(".r*"))


# ---- the corpus through the real command and the app -------------------------------------------
def test_cli_corpus_one_line_errors_and_nothing_lost(tmp_path, capsys, monkeypatch, bundle,
                                                     teacher_path):
    from nrrdd_core.cli import main

    monkeypatch.setenv("NRRDD_CACHE", str(tmp_path / "cache"))
    runs = tmp_path / "runs"
    a_run(runs, "finished", teacher_path, bundle)
    before_runs = tree(runs)
    outside = outside_folder(tmp_path)
    before = tree(outside)
    marker = tmp_path / "marker"
    torch.save({"evil": Evil(marker)}, tmp_path / "evil.pt")
    public = tmp_path / "resnet20.th"
    torch.save({"state_dict": build_model("resnet20_cifar", 10, 32).state_dict()}, public)
    bad_kwargs = tmp_path / "bad_kwargs.pt"
    torch.save({**torch.load(teacher_path, weights_only=True), "arch_kwargs": {"nope": 1}},
               bad_kwargs)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    base = ["distill", "--method", "rded", *SHAPES_ARGS, "--ipc", "1", "--device", "cpu",
            "--mipc", "2", "--num-crops", "1"]
    calls = {
        "out_is_a_file": [*base, "--teacher", str(teacher_path), "--out", str(a_file)],
        "long_name": [*base, "--teacher", str(teacher_path), "--out", str(runs), "--name", "n" * 250],
        "existing": [*base, "--teacher", str(teacher_path), "--out", str(runs), "--name", "finished"],
        "unsafe": [*base, "--teacher", str(tmp_path / "evil.pt"), "--out", str(runs), "--name",
                   "u"],
        "public_on_shapes": [*base, "--teacher", f"resnet20_cifar:{public}", "--out", str(runs),
                             "--name", "p"],
        "bad_kwargs": [*base, "--teacher", str(bad_kwargs), "--out", str(runs), "--name", "k"],
        "lr_inf": ["distill", "--method", "sre2l", "--lr", "inf", "--out", str(runs)],
        "eval_other_class": ["evaluate", str(runs / "finished"), "--classes", "circle,arrow",
                             "--teacher", str(teacher_path), "--epochs", "1", "--device", "cpu"],
    }
    # three real processes (each imports torch: seconds), the rest through main() in-process
    real = ("out_is_a_file", "unsafe", "public_on_shapes")
    procs = {k: cli(*calls[k], env={"NRRDD_CACHE": str(tmp_path / "cache")}) for k in real}
    lines = {}
    for k, argv in calls.items():
        if k in real:
            continue
        code = main(argv)
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (k, err)
        lines[k] = err[0]
    lines.update({k: one_line_error(p) for k, p in procs.items()})
    assert "is a file" in lines["out_is_a_file"] and "bytes" in lines["long_name"]
    assert "already exists" in lines["existing"]
    assert "refused" in lines["unsafe"] and "weights_only" not in lines["unsafe"]
    assert "class names differ" in lines["public_on_shapes"]
    assert "bad_kwargs.pt" in lines["bad_kwargs"] and "lr=inf" in lines["lr_inf"]
    assert "not in the run" in lines["eval_other_class"]
    assert not marker.exists() and tree(outside) == before and tree(runs) == before_runs


def test_runs_page_shows_damaged_runs_with_a_delete_button(tmp_path, monkeypatch, bundle,
                                                           teacher_path):
    AppTest = pytest.importorskip("streamlit.testing.v1").AppTest
    runs = tmp_path / "runs"
    monkeypatch.setenv("NRRDD_RUNS", str(runs))
    monkeypatch.setenv("NRRDD_STUDIO_TINY", "1")
    outside = outside_folder(tmp_path)
    before = tree(outside)
    a_run(runs, "good", teacher_path, bundle)
    (runs / "list").mkdir()
    (runs / "list" / "manifest.json").write_text("[]")
    a_run(runs, "nodataset", teacher_path, bundle)
    mf = json.loads((runs / "nodataset" / "manifest.json").read_text())
    mf.pop("dataset")
    (runs / "nodataset" / "manifest.json").write_text(json.dumps(mf))
    (runs / "linked").symlink_to(outside / "sub", target_is_directory=True)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.run()
    at.switch_page("app_pages/6_runs.py").run()
    assert not at.exception, at.exception
    errors = " ".join(e.value for e in at.error)
    assert "list" in errors or "manifest" in errors
    assert "link" in errors
    assert at.dataframe[0].value["run"].tolist() == ["good", "linked", "list", "nodataset"]
    keys = [b.key for b in at.button]
    delete_linked = next(k for k in keys if k and "delete" in k and "linked" in k)
    at.button(key=delete_linked).click().run()
    assert not at.exception, at.exception
    assert not (runs / "linked").exists() and tree(outside) == before
    assert (runs / "good").is_dir() and (runs / "nodataset").is_dir()


def test_setup_page_refuses_hostile_checkpoints_with_an_error(tmp_path, monkeypatch,
                                                              teacher_path):
    AppTest = pytest.importorskip("streamlit.testing.v1").AppTest
    monkeypatch.setenv("NRRDD_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("NRRDD_STUDIO_TINY", "1")
    monkeypatch.setenv("NRRDD_CACHE", str(tmp_path / "cache"))
    marker = tmp_path / "marker"
    torch.save({"evil": Evil(marker)}, tmp_path / "evil.pt")
    (tmp_path / "truncated.pt").write_bytes(teacher_path.read_bytes()[:300])
    torch.save({**torch.load(teacher_path, weights_only=True), "arch_kwargs": {"nope": 1}},
               tmp_path / "kwargs.pt")
    public = tmp_path / "resnet20.th"
    torch.save({"state_dict": build_model("resnet20_cifar", 10, 32).state_dict()}, public)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.query_params.update({"teacher": "file", "teacher_path": str(tmp_path / "evil.pt")})
    at.run()
    cases = {"evil.pt": "file", "truncated.pt": "file", "kwargs.pt": "file",
             "resnet20.th": "resnet_cifar"}
    for name, kind in cases.items():
        at.radio(key="teacher").set_value(kind).run()
        at.text_input(key="teacher_path").set_value(str(tmp_path / name)).run()
        assert not at.exception, (name, at.exception)
        errors = " ".join(e.value for e in at.error)
        assert (name in errors) if kind == "file" else ("class names" in errors), (name, errors)
        assert "weights_only" not in errors  # torch's advice to load it unsafely is not repeated
    assert not marker.exists()


def test_sigterm_stops_like_ctrl_c():
    import signal

    from nrrdd_core import cli

    previous = cli._stop_on_sigterm()
    try:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs between bytecodes
                pass
    finally:
        signal.signal(signal.SIGTERM, previous)
