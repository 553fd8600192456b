"""ImageFolder read on demand (nrrdd_core/data/stream.py): the same pixels as the in-memory entry,
selection decodes only the images it scores, and a dataset larger than the process's memory limit
distils at factor 2."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nrrdd_core.data import load_dataset
from nrrdd_core.methods import make_distiller, run_distiller
from nrrdd_core.models import build_model
from nrrdd_core.models.teacher import Teacher

from conftest import REPO


def make_folder(root: Path, per_class: int, size: int, classes: int = 3) -> Path:
    """``root/class<k>/<i>.jpg``: smooth colour ramps with noise (small JPEG files)."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, size)[None, :, None]
    for c in range(classes):
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = 40 + 60 * c + 80 * ramp * rng.random(3)[None, None, :]
            img = np.broadcast_to(base, (size, size, 3)) + rng.normal(0, 8, (size, size, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"{i:04d}.jpg", quality=85)
    return root


def random_teacher(config) -> Teacher:
    torch.manual_seed(0)
    return Teacher(build_model("convnet_bn", config.num_classes, config.image_size, depth=2, width=8),
                   "convnet_bn", config, "features", {"depth": 2, "width": 8})


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("folder"), 20, 48)


def test_streamed_images_equal_the_in_memory_entry(folder):
    s = load_dataset("imagefolder_stream", root=folder, image_size=32, workers=2)
    m = load_dataset("imagefolder", root=folder, image_size=32)
    assert torch.equal(s.train.y, m.train.y) and torch.equal(s.test.y, m.test.y)
    assert s.train.decoded == 0
    idx = torch.tensor([0, 17, 30, 5])
    assert torch.equal(s.train.float01(idx), m.train.float01(idx)) and s.train.decoded == 4
    sub = load_dataset("imagefolder_stream", root=folder, image_size=32, classes=["class2"])
    assert sub.train.decoded == 0 and set(sub.train.y.tolist()) == {0}
    assert torch.equal(sub.train.uint8(), m.subset(["class2"]).train.x)


@pytest.mark.parametrize("method", ["rded", "nrrdd"])
def test_selection_decodes_only_the_images_it_scores(folder, method):
    bundle = load_dataset("imagefolder_stream", root=folder, image_size=32, workers=0)
    cfg = {"mipc": 5, "images_per_step": 5, "factor": 2, **({"iterations": 1} if method == "nrrdd" else {})}
    d = make_distiller(method, cfg, teacher=random_teacher(bundle.config), dataset=bundle, ipc=1,
                       device="cpu", seed=0)
    run_distiller(d)
    x, y = d.images()
    assert x.shape == (3, 3, 32, 32) and y.tolist() == [0, 1, 2]
    # per class: the mipc scored images, then the (at most 4) images whose patches are stitched
    assert bundle.train.decoded <= 3 * (5 + 4) < len(bundle.train)
    assert bundle.test.decoded == 0


SCRIPT = textwrap.dedent("""
    import json, resource, sys, threading
    import torch
    threading.stack_size(512 * 1024)  # the in-memory loader's decoding threads: small stacks
    torch.set_num_threads(1)
    from nrrdd_core.data import load_dataset
    from nrrdd_core.methods import make_distiller, run_distiller
    import torchvision.datasets.folder  # noqa: F401  (imported before the limit: shared libraries)
    import nrrdd_core.cam, nrrdd_core.methods.rded  # noqa: F401, E401
    sys.path.insert(0, {tests!r})
    from test_stream import random_teacher

    def vm_bytes():
        for line in open("/proc/self/status"):
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024

    entry = sys.argv[1]
    kw = {{"root": {root!r}, "image_size": 256}}
    if entry == "imagefolder_stream":
        kw["workers"] = 0
        bundle = load_dataset(entry, **kw)
        teacher = random_teacher(bundle.config)
        with torch.no_grad():
            teacher(torch.zeros(2, 3, 256, 256))
        d = make_distiller("rded", {{"mipc": 4, "images_per_step": 2, "num_crops": 2, "factor": 2}},
                           teacher=teacher, dataset=bundle, ipc=1, device="cpu", seed=0)
    limit = vm_bytes() + {headroom} * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    if entry != "imagefolder_stream":
        try:
            load_dataset(entry, **kw)
        except MemoryError:
            print(json.dumps({{"memory_error": True}}))
            sys.exit(0)
        print(json.dumps({{"memory_error": False}}))
        sys.exit(0)
    run_distiller(d)
    x, y = d.images()
    print(json.dumps({{"shape": list(x.shape), "decoded": bundle.train.decoded,
                      "train": len(bundle.train), "dataset_mib": len(bundle.train) * 3 * 256 * 256 / 2**20}}))
""")


@pytest.mark.slow
def test_distils_a_folder_larger_than_its_memory_limit(tmp_path):
    """RDED at factor 2 from a 256 px folder whose decoded train split (about 135 MiB, 3 x 240
    images) is larger than the address space the process may still grow by (120 MiB); the
    streamed entry distils there (the in-memory entry, run as ``SCRIPT imagefolder``, fails with
    MemoryError; not run here to keep the test short)."""
    import json

    root = make_folder(tmp_path / "big", 300, 256)
    script = tmp_path / "limited.py"
    script.write_text(SCRIPT.format(tests=str(REPO / "tests"), root=str(root), headroom=120))
    env = {**os.environ, "MALLOC_ARENA_MAX": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

    def run(entry):
        p = subprocess.run([sys.executable, str(script), entry], capture_output=True, text=True,
                           env=env, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        return json.loads(p.stdout.strip().splitlines()[-1])

    out = run("imagefolder_stream")
    assert out["shape"] == [3, 3, 256, 256]
    assert out["dataset_mib"] > 120 and out["decoded"] <= 3 * (4 + 4)


def test_the_app_offers_and_loads_a_streamed_folder(folder, monkeypatch, tmp_path):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("NRRDD_STUDIO_TINY", "1")
    monkeypatch.setenv("NRRDD_RUNS", str(tmp_path / "runs"))
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=90)
    at.query_params.update({"ds": "imagefolder_stream", "root": str(folder), "size": "32"})
    at.run()
    assert not at.exception, at.exception
    assert "Image folder, read on demand (larger than memory)" in at.selectbox(key="ds").options
    assert at.selectbox(key="ds").value == "imagefolder_stream"
    assert not any("Cannot load this dataset" in e.value for e in at.error)
