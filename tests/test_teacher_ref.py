"""Teacher references (``nrrdd_core.models.ref.TeacherRef``): the text grammar round-trips for
every kind, each kind loads the teacher it names, and a run saved through the app's code path
with each teacher the Setup page offers is evaluated by ``nrrdd evaluate RUN`` without
``--teacher``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nrrdd_core.cli import main, teacher_ref
from nrrdd_core.data import load_dataset
from nrrdd_core.errors import CheckpointError, ConfigError
from nrrdd_core.export import list_evals, save_run
from nrrdd_core.io import cache_dir
from nrrdd_core.models import Teacher, TeacherTrainConfig, build_model, train_teacher
from nrrdd_core.models.ref import KINDS, TeacherRef
from nrrdd_core.models.resnet_cifar import CIFAR10_CLASSES
from nrrdd_core.models.train import SHIPPED_TEACHER_PATH

TINY_DATA = {"train_per_class": 6, "test_per_class": 2}

#: One reference of every kind, as text and as fields.
EXAMPLES = [
    ("shipped", TeacherRef("shipped")),
    ("file:/ckpt/teacher.pt", TeacherRef("file", path="/ckpt/teacher.pt")),
    ("resnet20_cifar:/data/cifar10_resnet20_akamaster.th",
     TeacherRef("resnet_cifar", arch="resnet20_cifar", path="/data/cifar10_resnet20_akamaster.th")),
    ("resnet56_cifar:rel/r56.th", TeacherRef("resnet_cifar", arch="resnet56_cifar", path="rel/r56.th")),
    ("pretrained:resnet18", TeacherRef("pretrained", arch="resnet18")),
    ("train:0123456789abcdef", TeacherRef("train", key="0123456789abcdef")),
    ("upload:fedcba9876543210", TeacherRef("upload", key="fedcba9876543210")),
]


def test_examples_cover_every_kind():
    assert {ref.kind for _, ref in EXAMPLES} == set(KINDS)


@pytest.mark.parametrize("text,ref", EXAMPLES, ids=[t for t, _ in EXAMPLES])
def test_round_trip(text, ref):
    assert TeacherRef.parse(text) == ref
    assert str(ref) == text
    assert TeacherRef.parse(str(ref)) == ref


@pytest.mark.parametrize("text,ref", [
    ("runs/teacher.pt", TeacherRef("file", path="runs/teacher.pt")),        # a bare path
    ("  /abs/t.pt ", TeacherRef("file", path="/abs/t.pt")),
    ("C:/models/t.pt", TeacherRef("file", path="C:/models/t.pt")),          # a drive, no scheme
    ("train:/cache/teachers/abc.pt", TeacherRef("file", path="/cache/teachers/abc.pt")),  # older app
    ("file:dir:x/t.pt", TeacherRef("file", path="dir:x/t.pt")),            # ':' inside a path
])
def test_other_spellings(text, ref):
    assert TeacherRef.parse(text) == ref


@pytest.mark.parametrize("text", ["", "  ", "pretrained:", "resnet_cifar:/x.th", "hub:resnet18",
                                  "train:a b", "resnet20:/x.th", "dir:x/t.pt"])
def test_bad_text_is_a_config_error(text):
    with pytest.raises(ConfigError):
        TeacherRef.parse(text)


@pytest.mark.parametrize("fields", [
    {"kind": "nope"}, {"kind": "file"}, {"kind": "shipped", "path": "x"},
    {"kind": "resnet_cifar", "arch": "resnet18", "path": "x"},
    {"kind": "pretrained", "arch": "resnet18", "key": "k"}, {"kind": "train", "key": "a/b"},
])
def test_bad_fields_are_config_errors(fields):
    with pytest.raises(ConfigError):
        TeacherRef(**fields)


def test_resolved_makes_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert TeacherRef.parse("t.pt").resolved() == TeacherRef("file", path=str(tmp_path / "t.pt"))
    cifar = TeacherRef.parse("resnet20_cifar:r.th").resolved()
    assert cifar.path == str(tmp_path / "r.th") and cifar.arch == "resnet20_cifar"
    assert teacher_ref("resnet20_cifar:r.th") == f"resnet20_cifar:{tmp_path / 'r.th'}"
    for text in ("shipped", "pretrained:resnet18", "train:abc"):
        assert TeacherRef.parse(text).resolved() == TeacherRef.parse(text)
    assert TeacherRef.of_manifest({"teacher": {"ref": ""}}) == TeacherRef("shipped")
    assert TeacherRef.of_manifest({"teacher": {"ref": "upload:ab"}}) == TeacherRef("upload", key="ab")


def _same_weights(a: Teacher, b: Teacher) -> bool:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _tiny_teacher(bundle) -> Teacher:
    torch.manual_seed(0)
    model = build_model("convnet_bn", bundle.num_classes, bundle.config.image_size, width=8)
    return Teacher(model, "convnet_bn", bundle.config, "features", {"width": 8})


@pytest.fixture(scope="module")
def bundle():
    return load_dataset("shapes", **TINY_DATA)


def test_each_kind_loads_what_it_names(tmp_path, bundle, monkeypatch):
    shipped = TeacherRef.parse("shipped").load()
    assert _same_weights(shipped, Teacher.load(SHIPPED_TEACHER_PATH))
    own = _tiny_teacher(bundle)
    own.save(tmp_path / "own.pt")
    assert _same_weights(TeacherRef.parse(str(tmp_path / "own.pt")).load(), own)
    up = TeacherRef.store_upload((tmp_path / "own.pt").read_bytes())
    assert up.kind == "upload" and up.checkpoint_path().parent == cache_dir() / "uploads"
    assert _same_weights(TeacherRef.parse(str(up)).load(), own)
    cfg = TeacherTrainConfig(arch="convnet_bn", width=8, epochs=1, batch_size=30, augment=False)
    trained = train_teacher(cfg, bundle)
    ref = TeacherRef.trained(cfg, bundle)
    assert _same_weights(TeacherRef.parse(str(ref)).load(), trained)
    torch.manual_seed(1)
    r20 = build_model("resnet20_cifar", 10, 32)
    torch.save({"state_dict": {f"module.{k}": v for k, v in r20.state_dict().items()}},
               tmp_path / "r20.th")
    pub = TeacherRef.parse(f"resnet20_cifar:{tmp_path / 'r20.th'}").load(
        class_names=[f"c{i}" for i in range(10)])
    assert pub.data_config.class_names == CIFAR10_CLASSES  # a CIFAR-10 model: its own names
    assert torch.equal(pub.model.state_dict()["linear.weight"], r20.state_dict()["linear.weight"])
    monkeypatch.setattr("nrrdd_core.models.torchvision_models.pretrained_teacher",
                        lambda arch, device="cpu": ("pretrained", arch))
    assert TeacherRef.parse("pretrained:resnet50").load() == ("pretrained", "resnet50")


def test_missing_cache_entries_say_what_to_do():
    with pytest.raises(CheckpointError, match="train it again"):
        TeacherRef.parse("train:0000000000000000").load()
    with pytest.raises(CheckpointError, match="upload it again"):
        TeacherRef.parse("upload:0000000000000000").load()


# ---- a run saved from the app, evaluated by the CLI ------------------------------------------
def _cifar_like_npz(root: Path) -> dict:
    """A tiny 10-class npz dataset with the CIFAR-10 class names (random 32 px images)."""
    g = np.random.default_rng(0)
    root.mkdir()
    for split, n in (("train", 3), ("test", 1)):
        np.savez(root / f"cifar10_{split}.npz", x=g.integers(0, 256, (10 * n, 32, 32, 3), np.uint8),
                 y=np.repeat(np.arange(10), n))
    (root / "cifar10_classes.json").write_text(json.dumps(list(CIFAR10_CLASSES)))
    return {"root": str(root)}


def _app_choice(kind: str, tmp_path: Path, monkeypatch) -> tuple:
    """``(dataset, kwargs, teacher, teacher_path, teacher_arch)`` as the Setup page leaves them
    for ``kind``, after making the checkpoint that choice names."""
    own = tmp_path / "own.pt"
    bundle = load_dataset("shapes", **TINY_DATA)
    _tiny_teacher(bundle).save(own)
    shapes = ("shapes", TINY_DATA)
    if kind == "shipped":
        return *shapes, "shipped", "", "resnet20_cifar"
    if kind == "file":  # a relative path, typed into the path box
        monkeypatch.chdir(tmp_path)
        return *shapes, "file", "own.pt", "resnet20_cifar"
    if kind == "upload":  # what the page's uploader writes into the path box
        return *shapes, "file", str(TeacherRef.store_upload(own.read_bytes())), "resnet20_cifar"
    if kind == "train":  # what the page's training job returns into the path box
        cfg = TeacherTrainConfig(arch="convnet_bn", width=8, epochs=1, batch_size=30,
                                 augment=False, seed=3)
        train_teacher(cfg, bundle)
        return *shapes, "train", str(TeacherRef.trained(cfg, bundle)), "resnet20_cifar"
    if kind == "resnet_cifar":  # a CIFAR-10 checkpoint fits a dataset with CIFAR-10's classes
        torch.manual_seed(0)
        torch.save({"state_dict": build_model("resnet20_cifar", 10, 32).state_dict()},
                   tmp_path / "r20.th")
        return ("npz", _cifar_like_npz(tmp_path / "npz"), "resnet_cifar", str(tmp_path / "r20.th"),
                "resnet20_cifar")
    assert kind == "pretrained"  # no ImageNet download in tests: torchvision's loader is faked
    monkeypatch.setattr("nrrdd_core.models.torchvision_models.pretrained_teacher",
                        lambda arch, device="cpu": Teacher.load(own, device))
    return *shapes, "pretrained", "", "mobilenet_v2"


@pytest.mark.parametrize("kind", KINDS)
def test_cli_evaluates_a_run_saved_from_the_app(kind, tmp_path, monkeypatch, capsys):
    from studio import cache, runners
    from studio.jobs import Job
    from studio.setup import Setup

    dataset, kwargs, choice, path, arch = _app_choice(kind, tmp_path, monkeypatch)
    s = Setup(dataset=dataset, dataset_kwargs=tuple(sorted(kwargs.items())), classes=(),
              teacher=choice, teacher_path=path, teacher_arch=arch, device="cpu", ipc=1, seed=0)
    assert s.teacher_ref.kind == kind
    bundle = cache.bundle(s.data_key)
    teacher = cache.teacher(s.teacher_key)
    teacher.check_compatible(bundle.config)  # as the pages do
    res = runners.distill(Job(id=f"t-{kind}", kind="refine"), "rded",
                          {"mipc": 3, "num_crops": 2}, teacher, bundle, [5], s, frames=False)
    run = save_run(tmp_path / "runs", f"app_{kind}", res["images"], res["labels"], res["manifest"],
                   extras=res["extras"])
    recorded = res["manifest"]["teacher"]["ref"]
    assert TeacherRef.parse(recorded).kind == kind
    monkeypatch.chdir(Path(__file__).parent)  # another folder than the one the app ran in
    code = main(["evaluate", str(run), "--student", "convnet_bn", "--student-width", "8",
                 "--epochs", "1", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.startswith("final_acc ")
    assert list_evals(run)[0]["teacher_ref"] == recorded


def test_setup_page_choices_map_to_references():
    """The Setup page's (radio, path box, architecture box) -> TeacherRef (studio.setup)."""
    from studio.setup import teacher_ref as choice

    assert choice("shipped", "ignored.pt", "resnet20_cifar") == TeacherRef("shipped")
    assert choice("pretrained", "", "resnet50") == TeacherRef("pretrained", arch="resnet50")
    assert choice("file", " /ckpt/t.pt ", "x") == TeacherRef("file", path="/ckpt/t.pt")
    assert choice("file", "upload:abc", "x") == TeacherRef("upload", key="abc")
    assert choice("train", "train:abc", "x") == TeacherRef("train", key="abc")
    assert choice("resnet_cifar", "r.th", "resnet32_cifar") == \
        TeacherRef("resnet_cifar", arch="resnet32_cifar", path="r.th")
    for kind in ("file", "train", "resnet_cifar"):
        assert choice(kind, "  ", "resnet20_cifar") is None  # nothing chosen yet
    with pytest.raises(ConfigError):
        choice("resnet_cifar", "r.th", "resnet18")  # an ImageNet arch left in the box
    with pytest.raises(ConfigError):
        choice("hub", "", "")
