"""Reopening a saved run on the Refine page (studio.reopen + the page)."""

from __future__ import annotations

import torch

from nrrdd_core.data import load_dataset
from nrrdd_core.export import build_manifest, load_run, save_run
from nrrdd_core.models.teacher import Teacher
from studio import keys as K
from studio import reopen

from test_app import APP, TINY_DATA, AppTest, tiny_teacher


def _saved_run(tmp_path, teacher_path):
    bundle = load_dataset("shapes", **TINY_DATA)
    teacher = Teacher.load(teacher_path)
    labels = torch.tensor([1, 1, 4])
    mf = build_manifest(method="nrrdd", config={"tau": 0.3, "iterations": 7}, teacher=teacher,
                        bundle=bundle, classes=[1, 4], ipc=2, seed=0)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return save_run(tmp_path / "runs", "r1", x, labels, mf), bundle


def test_knob_values_and_classes(tmp_path):
    path, bundle = _saved_run(tmp_path, tiny_teacher(tmp_path / "t.pt"))
    run = load_run(path)
    assert reopen.knob_values(run.manifest) == {K.METHOD: "nrrdd", K.knob("nrrdd", "tau"): 0.3,
                                                K.knob("nrrdd", "iterations"): 7}
    assert reopen.knob_values({**run.manifest, "method": "no_such_method"}) == {}
    names = bundle.config.class_names
    assert reopen.run_classes(run) == ([1, 4], [names[1], names[4]])


def test_refine_page_shows_the_reopened_run_and_loads_its_settings(tmp_path):
    teacher_path = tiny_teacher(tmp_path / "t.pt")
    path, _ = _saved_run(tmp_path, teacher_path)
    at = AppTest.from_file(APP, default_timeout=180)
    at.query_params.update({"teacher": "file", "teacher_path": str(teacher_path)})
    at.session_state[K.OPEN_RUN] = str(path)
    at.run()
    at.switch_page("app_pages/3_refine.py").run()
    assert not at.exception, at.exception
    assert any("Reopened run **r1**" in e.label for e in at.expander)
    assert at.session_state[K.METHOD] == "nrrdd"
    assert at.session_state[K.knob("nrrdd", "tau")] == 0.3
    assert at.session_state[K.OPEN_RUN_APPLIED] == str(path)
