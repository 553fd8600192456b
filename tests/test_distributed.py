"""torch.distributed runs (``torchrun``): classes sharded over ranks give the one-process run pixel
for pixel; per-class random draws do not depend on the other classes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from nrrdd_core import cli
from nrrdd_core.data import load_dataset
from nrrdd_core.distributed import owned_positions
from nrrdd_core.export import load_run
from nrrdd_core.methods import make_distiller, run_distiller
from nrrdd_core.models import shipped_teacher

from conftest import REPO

SHAPES = ["--dataset", "shapes", "--dataset-opt", "train_per_class=6", "--dataset-opt",
          "test_per_class=2", "--classes", "0,1,2", "--ipc", "1", "--mipc", "4",
          "--images-per-step", "2", "--threads", "1", "--device", "cpu", "--seed", "3"]
TINY = {"rded": [], "nrrdd": ["--iterations", "2"]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_owned_positions_cover_every_class_once():
    got = sorted(p for r in range(3) for p in owned_positions(7, r, 3))
    assert got == list(range(7)) and owned_positions(2, 2, 3) == []


def test_a_class_is_selected_the_same_with_or_without_the_others():
    bundle = load_dataset("shapes", train_per_class=6, test_per_class=2)
    teacher = shipped_teacher()
    cfg = {"mipc": 4, "images_per_step": 2}

    def images(classes):
        d = make_distiller("rded", cfg, teacher=teacher, dataset=bundle, classes=classes, ipc=1,
                           device="cpu", seed=3)
        return run_distiller(d).images()[0]

    assert torch.equal(images([0, 1, 2])[1], images([1])[0])
    assert torch.equal(images([0, 1, 2])[2], images([2, 3])[0])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rded", "nrrdd"])
def test_torchrun_two_processes_equal_one_process(method, tmp_path):
    args = ["distill", "--method", method, *SHAPES, *TINY[method], "--out", str(tmp_path)]
    threads = torch.get_num_threads()
    try:
        assert cli.main([*args, "--name", "one"]) == 0
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
           "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                        "-m", "nrrdd_core.cli", *args, "--name", "two"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert sorted(q.name for q in tmp_path.iterdir()) == ["one", "two"]   # rank 1 wrote nothing
    one, two = load_run(tmp_path / "one"), load_run(tmp_path / "two")
    assert torch.equal(one.images01, two.images01) and torch.equal(one.labels, two.labels)
    assert one.images01.std() > 0
    assert two.manifest["timings"]["processes"] == 2


@pytest.mark.slow
def test_torchrun_experts_one_per_rank_equal_one_process(tmp_path, monkeypatch):
    args = ["experts", "--dataset", "shapes", "--dataset-opt", "train_per_class=6", "--dataset-opt",
            "test_per_class=2", "--num-experts", "3", "--epochs", "1", "--width", "8", "--depth", "1",
            "--threads", "1", "--device", "cpu"]
    monkeypatch.setenv("NRRDD_CACHE", str(tmp_path / "one"))
    threads = torch.get_num_threads()
    try:
        assert cli.main(args) == 0
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
           "PYTHONPATH": str(REPO), "NRRDD_CACHE": str(tmp_path / "two")}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                        "-m", "nrrdd_core.cli", *args],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    one = sorted((tmp_path / "one").rglob("expert_*.pt"))
    two = sorted((tmp_path / "two").rglob("expert_*.pt"))
    assert [f.name for f in one] == [f.name for f in two] == [f"expert_{i:03d}.pt" for i in range(3)]
    for a, b in zip(one, two):
        ta = torch.load(a, weights_only=True)["trajectory"]
        assert torch.equal(ta, torch.load(b, weights_only=True)["trajectory"]) and ta.shape[0] == 2
    assert len(list((tmp_path / "two").rglob("manifest.json"))) == 1


@pytest.mark.slow
def test_torchrun_student_evaluation_with_ddp(tmp_path):
    args = ["distill", "--method", "rded", *SHAPES, "--out", str(tmp_path), "--name", "run"]
    threads = torch.get_num_threads()
    try:
        assert cli.main(args) == 0
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                        "-m", "nrrdd_core.cli", "-v", "evaluate", str(tmp_path / "run"), "--epochs",
                        "2", "--student-width", "8", "--batch-size", "4", "--device", "cpu"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "DistributedDataParallel" in p.stderr   # the student really trained with DDP
    evals = list((tmp_path / "run" / "evals").glob("*.json"))
    assert len(evals) == 1 and p.stdout.count("final_acc") == 1   # rank 0 writes
    import json

    res = json.loads(evals[0].read_text())
    assert 0 <= res["final_acc"] <= 1 and res["config"]["epochs"] == 2
