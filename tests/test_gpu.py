"""The device-dependent parts on ``$NRRDD_TEST_DEVICE`` (default cpu; ``bench/gpu_check.sh`` sets
cuda): each method's steps, the EDF unrolls' equal gradients, the teacher's bf16/channels_last
pass. Tiny settings: seconds on a CPU."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from nrrdd_core.data import load_dataset
from nrrdd_core.dsa import DSA_STRATEGIES
from nrrdd_core.experts import ParamLayout, seeded_model
from nrrdd_core.methods import make_distiller
from nrrdd_core.methods.edf import matching_loss, unroll_student
from nrrdd_core.models import shipped_teacher
from nrrdd_core.unroll import unroll_recompute

DEVICE = os.environ.get("NRRDD_TEST_DEVICE", "cpu")
pytestmark = pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                                reason="NRRDD_TEST_DEVICE=cuda but CUDA is not available")
TINY = {"sre2l": {"iterations": 2}, "rded": {"mipc": 4, "images_per_step": 4},
        "nrrdd": {"mipc": 4, "images_per_step": 4, "iterations": 2}}


@pytest.fixture(scope="module")
def shapes():
    return load_dataset("shapes", train_per_class=6, test_per_class=2), shipped_teacher(DEVICE)


@pytest.mark.parametrize("method", sorted(TINY))
def test_kd_methods_run_on_the_device(shapes, method):
    bundle, teacher = shapes
    d = make_distiller(method, TINY[method], teacher=teacher, dataset=bundle, classes=[0, 1],
                       ipc=1, device=DEVICE, seed=0)
    while not d.done:
        d.step()
    x, y = d.images()
    assert x.device.type == "cpu" and x.shape == (2, 3, 32, 32) and y.tolist() == [0, 1]
    assert torch.isfinite(x).all() and 0 <= float(x.min()) and float(x.max()) <= 1


def test_recompute_unroll_equals_plain_on_the_device():
    dev = torch.device(DEVICE)
    net = seeded_model(3, 16, {"depth": 2, "width": 8}, torch.Generator().manual_seed(0)).to(dev)
    layout = ParamLayout(net)
    theta0 = layout.flatten(net).to(dev)
    target = theta0 + 0.01
    grads = []
    for fn in (unroll_student, unroll_recompute):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(10, 3, 16, 16, generator=g).to(dev).requires_grad_()
        y = torch.randn(10, 3, generator=g).to(dev).requires_grad_()
        lr = torch.tensor(0.05, device=dev, requires_grad=True)
        theta_n = fn(net, layout, theta0, x, y, lr, 5, 4, torch.Generator().manual_seed(2),
                     DSA_STRATEGIES)
        matching_loss(theta_n, theta0, target)[0].backward()
        grads.append((x.grad, y.grad, lr.grad))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4 * float(a.abs().max()))


def test_teacher_pass_options_keep_the_logits(shapes):
    bundle, teacher = shapes
    x = bundle.config.normalize(bundle.train.float01(torch.arange(8))).to(teacher.device)
    with torch.no_grad():
        ref = teacher(x)
        fast = teacher.with_pass_options(bf16=True, channels_last=True)(x)
    assert fast.dtype == torch.float32 and fast.shape == ref.shape
    tol = 0.0 if teacher.device.type == "cpu" else 0.1 * float(ref.abs().max())
    assert torch.allclose(fast, ref, atol=tol)
    assert torch.equal(fast.argmax(1), ref.argmax(1)) or teacher.device.type == "cuda"


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    """bench/gpu_check.sh --dry-run (the CI form of the GPU check) runs every part on the CPU and
    writes its JSON."""
    import json
    import subprocess

    from conftest import REPO

    env = {**os.environ, "GPU_CHECK_OUT": str(tmp_path), "NRRDD_TEST_DEVICE": "cpu",
           "PYTHON": sys.executable}
    p = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run"], cwd=REPO,
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    doc = json.loads((tmp_path / "gpu_check_dry.json").read_text())
    assert doc["ok"] and [q["part"] for q in doc["parts"]] == ["tests", "speed", "distill", "evaluate"]
    assert doc["accuracy_unit"]["result"]["final_acc"] >= 0
    assert (tmp_path / "speed_dry.json").is_file()
