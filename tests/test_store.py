"""Views stored on disk (``studio.store``) and the start-up they allow: the explorer and the
Setup page's teacher accuracy drawn from the disk after a restart, the app's modules importable
without torch, and the warm-up's timing of the torch import."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import streamlit as st

from studio import store
from test_app import app, metric, teacher_path  # noqa: F401 - the module-scoped fixture

REPO = Path(__file__).resolve().parents[1]


def _forget_memory_caches():
    """What a server restart forgets: Streamlit's in-memory caches."""
    st.cache_data.clear()
    st.cache_resource.clear()


def test_the_first_page_imports_no_torch():
    """app.py and the explorer draw a stored view from modules that do not import torch (it is
    imported in the background, see studio.warm)."""
    code = ("import sys; import studio.cache, studio.setup, studio.widgets, studio.explorer, "
            "studio.store, studio.jobs, studio.warm, nrrdd_core.display, nrrdd_core.errors; "
            "heavy = [m for m in ('torch', 'torchvision', 'pandas') if m in sys.modules]; "
            "assert not heavy, heavy")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_explorer_methods_are_the_libraries():
    from nrrdd_core.cam import CAM_METHODS
    from studio import explorer
    assert tuple(explorer.METHOD_LABELS) == CAM_METHODS


def test_explorer_draws_a_stored_view_after_a_restart(teacher_path, monkeypatch):  # noqa: F811
    at = app(teacher_path, "2_explorer", classes="circle")
    shares = [c for im in at.image for c in im.captions if "non-crit" in c]
    assert len(shares) == 4
    _forget_memory_caches()
    from studio import cache

    def no_compute(*a, **k):
        raise AssertionError("the stored view was recomputed")

    monkeypatch.setattr(cache, "context", no_compute)
    at = app(teacher_path, "2_explorer", classes="circle")
    assert [c for im in at.image for c in im.captions if "non-crit" in c] == shares
    assert metric(at, "Images") == "4"
    assert at.selectbox(key="cam_layer").options  # the layers came from the disk too
    at.slider(key="tau").set_value(0.0).run()  # tau re-thresholds the stored maps
    assert metric(at, "Non-critical share") == "0 %"
    # another view of the same setup is not stored: it needs the teacher
    at.slider(key="per_class").set_value(2).run()
    assert at.exception and "recomputed" in str(at.exception)


def test_setup_reads_the_teacher_accuracy_back(teacher_path, monkeypatch):  # noqa: F811
    at = app(teacher_path)
    acc = metric(at, "Test accuracy")
    _forget_memory_caches()
    from nrrdd_core.models import Teacher

    def no_predict(*a, **k):
        raise AssertionError("the accuracy was measured again")

    monkeypatch.setattr(Teacher, "predict01", no_predict)
    at = app(teacher_path)
    assert metric(at, "Test accuracy") == acc


def test_a_changed_input_is_another_key(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "data").mkdir()
    ckpt = tmp_path / "ckpt" / "t.pt"
    ckpt.write_bytes(b"x")
    data = ("npz", (("root", str(tmp_path / "data")),))
    key = ("file", str(ckpt), "convnet_bn", "auto", data)
    fp = store.fingerprint(key)
    assert fp and store.fingerprint(key) == fp
    os.utime(ckpt, ns=(1, 1))  # the checkpoint changed
    assert store.fingerprint(key) not in (None, fp)
    fp = store.fingerprint(key)
    (tmp_path / "data" / "more.npz").write_bytes(b"y")  # the dataset folder changed
    assert store.fingerprint(key) not in (None, fp)
    assert store.fingerprint(("train", "train:abc", "convnet_bn", "auto", data)) is None
    assert store.fingerprint(("file", str(tmp_path / "missing.pt"), "x", "auto", data)) is None
    shipped = ("shipped", "", "", "auto", ("shapes", ()))
    assert store.path("grid", shipped, (1,)) != store.path("grid", shipped, (2,))


def test_an_unwritable_cache_stores_nothing(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("NRRDD_CACHE", str(blocker / "cache"))  # mkdir fails under a file
    where = store.path("grid", ("shipped", "", "", "auto", ("shapes", ())), (1,))
    assert where is None
    store.save(where, {"a": 1})
    assert store.load(where) is None


def test_a_damaged_stored_view_is_recomputed():
    where = store.path("test", ("shipped", "", "", "auto", ("shapes", ())), ("damaged",))
    store.save(where, {"a": np.arange(3), "name": "x"})
    z = store.load(where)
    assert z["a"].tolist() == [0, 1, 2] and str(z["name"]) == "x"
    where.write_bytes(b"not a zip")
    assert store.load(where) is None and not where.exists()


@pytest.mark.parametrize("page, imports_before_shown", [("explorer", False), ("setup", True)])
def test_torch_is_imported_after_a_light_first_page(monkeypatch, page, imports_before_shown):
    """After a first page drawn without torch (a stored explorer view) the warm-up imports torch
    only once the page has been shown; after any other page at once."""
    from studio import warm
    imported = []
    monkeypatch.setattr(warm, "_import", imported.append)
    monkeypatch.setattr(warm, "PAGE_STARTED", threading.Event())  # as in a fresh process
    monkeypatch.setattr(warm, "PAGE_SHOWN", threading.Event())
    monkeypatch.setattr(warm, "AFTER_LIGHT_S", 0.0)
    monkeypatch.setattr(warm, "SETTLE_S", 0.0)
    monkeypatch.setattr(warm, "_first_page", {"light": False})
    warm.page_started(page)
    warm.page_started("setup")  # later pages do not change the decision
    thread = threading.Thread(target=warm.warm, args=(30.0, 1.0), daemon=True)
    thread.start()
    thread.join(1.5)
    assert ("torch" in imported) == imports_before_shown, imported
    warm.PAGE_SHOWN.set()
    thread.join(10.0)
    assert not thread.is_alive() and imported[:len(warm.FIRST)] == list(warm.FIRST)
