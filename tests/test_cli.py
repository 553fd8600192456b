"""The ``nrrdd`` command, called in-process: listing, generated flags, one-line errors (exit 2),
and end-to-end distill + evaluate on the built-in shapes dataset at tiny settings."""

from __future__ import annotations

import json

import pytest
import torch

from nrrdd_core.cli import main
from nrrdd_core.data import load_dataset
from nrrdd_core.data.base import to_uint8
from nrrdd_core.export import list_evals, load_run
from nrrdd_core.methods import list_methods, make_distiller
from nrrdd_core.models import Teacher, build_model

SHAPES = ["--dataset", "shapes", "--dataset-opt", "train_per_class=6", "--dataset-opt", "test_per_class=2"]
TINY = {"sre2l": ["--iterations", "2"],
        "rded": ["--mipc", "3", "--num-crops", "2"],
        "nrrdd": ["--iterations", "2", "--mipc", "3", "--num-crops", "2"]}


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    bundle = load_dataset("shapes", train_per_class=6, test_per_class=2)
    torch.manual_seed(0)
    model = build_model("convnet_bn", 10, 32, width=8)
    path = tmp_path_factory.mktemp("teacher") / "tiny.pt"
    Teacher(model, "convnet_bn", bundle.config, "features", {"width": 8}).save(path)
    return path


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_methods_lists_every_field(capsys):
    code, out, _ = run(capsys, "methods")
    assert code == 0
    for m in list_methods():
        assert f"{m}:" in out
    assert "-inf" not in out  # fields without bounds (bools, strings) show no range
    assert "  dsa = True  DSA" in out and "  tau = 0.5  [0.0, 1.0]" in out
    code, out, _ = run(capsys, "methods", "--json")
    table = json.loads(out)
    assert set(table) == set(list_methods())
    assert all({"name", "default", "unit", "doc"} <= set(r) for rows in table.values() for r in rows)


def test_distill_help_shows_method_flags(capsys):
    code, out, _ = run(capsys, "distill", "--method", "nrrdd", "--help")
    assert code == 0 and "--tau" in out and "--mask-mode" in out
    code, out, _ = run(capsys, "distill", "--method", "sre2l", "--help")
    assert "--r-bn" in out and "--tau" not in out
    code, out, _ = run(capsys, "teacher", "train", "--help")
    assert code == 0 and "--label-smoothing" in out and "--augment, --no-augment" in out
    code, out, _ = run(capsys, "evaluate", "--help")
    assert code == 0 and "--label-mode" in out and "--store-labels" in out


@pytest.mark.parametrize("argv", [
    ["distill", "--method", "rded", "--ipc", "-1"],
    ["distill", "--method", "nrrdd", "--tau", "1.5"],
    ["distill", "--method", "rded", "--ipc", "1", "--teacher", "/no/such/teacher.pt"],
    ["teacher", "train", "--momentum", "1.5", "--out", "t.pt"],
    ["teacher", "train", "--dataset", "nope", "--out", "t.pt"],
    ["evaluate", "/no/such/run"],
    ["distill", "--method", "rded", "--name", "../up"],
])
def test_bad_values_give_one_line_and_exit_2(capsys, tmp_path, argv):
    code, out, err = run(capsys, *argv, "--out", str(tmp_path / "o")) if argv[0] == "distill" \
        else run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")


def test_unknown_class_and_argparse_errors(capsys, tmp_path, teacher_path):
    code, _, err = run(capsys, "distill", "--method", "rded", *SHAPES, "--classes", "circle,blob",
                       "--teacher", str(teacher_path), "--out", str(tmp_path))
    assert code == 2 and err.strip().splitlines() == [err.strip()] and "blob" in err
    code, _, err = run(capsys, "distill", "--method", "nosuch")
    assert code == 2 and "invalid choice" in err


@pytest.mark.parametrize("method", ["sre2l", "rded", "nrrdd"])
def test_distill_and_evaluate_end_to_end(capsys, tmp_path, teacher_path, method):
    code, out, err = run(capsys, "distill", "--method", method, *SHAPES, "--classes", "circle,star",
                         "--ipc", "1", "--teacher", str(teacher_path), "--out", str(tmp_path),
                         "--name", "r", "--device", "cpu", "--seed", "3", *TINY[method])
    assert code == 0, err
    saved = load_run(tmp_path / "r")
    assert saved.labels.tolist() == [0, 5] and saved.images01.shape == (2, 3, 32, 32)
    m = saved.manifest
    assert m["method"] == method and m["seed"] == 3 and m["dataset"]["class_names"] == ["circle", "star"]
    assert m["teacher"]["ref"] == f"file:{teacher_path.resolve()}"  # a TeacherRef text
    if method == "rded":  # the saved run equals a direct run with the same settings
        d = make_distiller(method, m["config"], teacher=Teacher.load(teacher_path),
                           dataset=load_dataset("shapes", train_per_class=6, test_per_class=2),
                           classes=[0, 5], ipc=1, device="cpu", seed=3)
        while not d.done:
            d.step()
        assert torch.equal(to_uint8(saved.images01), to_uint8(d.images()[0]))
    code, out, err = run(capsys, "evaluate", str(tmp_path / "r"), "--student", "convnet_bn",
                         "--student-width", "8", "--epochs", "2", "--label-mode", "dbr",
                         "--store-labels", "--device", "cpu")
    assert code == 0, err
    assert out.startswith("final_acc ") and "stored dbr labels: 16 bytes" in out  # 2 img x 2 ep x 2 x 2 B
    evals = list_evals(tmp_path / "r")
    assert len(evals) == 1 and 0.0 <= evals[0]["final_acc"] <= 1.0
    assert evals[0]["config"]["label_mode"] == "dbr" and evals[0]["n_test"] == 4
    assert (tmp_path / "r" / "labels_dbr" / "dbr_e0001.f16").stat().st_size == 8


def test_teacher_train(capsys, tmp_path):
    out_path = tmp_path / "t.pt"
    code, out, err = run(capsys, "teacher", "train", *SHAPES, "--classes", "circle,square",
                         "--arch", "convnet_bn", "--width", "8", "--epochs", "1", "--batch-size", "8",
                         "--no-augment", "--out", str(out_path), "--device", "cpu")
    assert code == 0, err
    t = Teacher.load(out_path)
    assert t.data_config.class_names == ("circle", "square") and "test_acc" in out


def test_experts_distill_edf_and_evaluate_edf(capsys, tmp_path, teacher_path):
    code, out, err = run(capsys, "experts", *SHAPES, "--num-experts", "1", "--epochs", "2",
                         "--width", "8", "--depth", "2", "--batch-size", "20", "--device", "cpu")
    assert code == 0, err
    buffer = out.strip().split("expert buffer: ")[-1]
    code, out, err = run(capsys, "distill", "--method", "edf", *SHAPES, "--classes", "circle,star",
                         "--ipc", "1", "--teacher", str(teacher_path), "--out", str(tmp_path),
                         "--name", "e", "--device", "cpu", "--threads", "1", "--buffer", buffer,
                         "--iterations", "2", "--syn-steps", "2", "--batch-syn", "2",
                         "--current-max-start-epoch", "1", "--max-start-epoch", "1",
                         "--expert-epochs", "1")
    assert code == 0, err
    saved = load_run(tmp_path / "e")
    ex = saved.extras
    assert ex["label_logits"].shape == (2, 10) and ex["arch_kwargs"] == {"depth": 2, "width": 8}
    assert saved.labels.tolist() == [0, 5] and ex["syn_lr"] > 0  # the distilled classes
    assert ex["images_float"].shape == (2, 3, 32, 32)           # the float tensor is kept
    conf = saved.manifest["config"]                             # EDF's IPC-1 values, resolved
    assert (conf["cpd_alpha"], conf["dae_interval"], conf["dae_beta"]) == (0.0, 50, 1.0)
    code, out, err = run(capsys, "evaluate", str(tmp_path / "e"), "--protocol", "edf", "--epochs",
                         "2", "--device", "cpu")
    assert code == 0, err
    assert "edf protocol, 2 epochs" in out
    conf = list_evals(tmp_path / "e")[0]["config"]
    assert conf["lr"] == ex["syn_lr"] and conf["arch_kwargs"] == ex["arch_kwargs"]
    assert conf["soft_labels"] and conf["epochs"] == 2 and conf["inputs"] == "float"
    assert (conf["student"], conf["label_mode"]) == ("convnet_in", "soft")


def test_npz_run_evaluates_from_another_folder(capsys, tmp_path, monkeypatch):
    import numpy as np

    g = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 12), ("test", 6)):
        np.savez(data / f"tiny_{split}.npz", x=g.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8),
                 y=np.arange(n, dtype=np.int64) % 3)
    monkeypatch.chdir(tmp_path)
    npz = ["--dataset", "npz", "--data-root", "data", "--train-file", "tiny_train.npz",
           "--test-file", "tiny_test.npz", "--device", "cpu"]
    code, _, err = run(capsys, "teacher", "train", *npz, "--arch", "convnet_bn", "--width", "8",
                       "--epochs", "1", "--out", "t.pt")
    assert code == 0, err
    code, _, err = run(capsys, "distill", "--method", "rded", *npz, "--ipc", "1", "--teacher",
                       "t.pt", "--mipc", "2", "--num-crops", "1", "--out", "runs", "--name", "r")
    assert code == 0, err
    ds = load_run(tmp_path / "runs" / "r").manifest["dataset"]
    assert ds["name"] == "tiny" and ds["args"]["root"] == str(data)  # file prefix; absolute root
    monkeypatch.chdir(data)
    code, out, err = run(capsys, "evaluate", str(tmp_path / "runs" / "r"), "--epochs", "1",
                         "--student-width", "8", "--device", "cpu")
    assert code == 0, err
    assert "6 test images" in out
