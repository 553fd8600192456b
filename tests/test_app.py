"""Streamlit pages driven headless with ``streamlit.testing.v1.AppTest``.

Tiny settings (``NRRDD_STUDIO_TINY=1``: 20 training images per class, runs of a few steps, one
student epoch) and a tiny untrained ConvNet teacher given through the URL keep every page fast.
AppTest never ticks ``run_every``: background jobs are polled by calling ``at.run()``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from nrrdd_core.data import load_dataset
from nrrdd_core.export import build_manifest, save_run
from nrrdd_core.methods import list_methods
from nrrdd_core.models import Teacher, build_model, default_cam_layer

AppTest = pytest.importorskip("streamlit.testing.v1").AppTest
APP = str(Path(__file__).resolve().parents[1] / "app.py")
TINY_DATA = {"train_per_class": 20, "test_per_class": 10}


def tiny_teacher(path: Path, class_names=None) -> Path:
    """An untrained ConvNet-BN (width 8) for the tiny shapes set, saved at ``path``."""
    b = load_dataset("shapes", **TINY_DATA)
    cfg = b.config
    if class_names is not None:
        from dataclasses import replace
        cfg = replace(cfg, class_names=tuple(class_names))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model("convnet_bn", cfg.num_classes, cfg.image_size, width=8)
    Teacher(model, "convnet_bn", cfg, default_cam_layer("convnet_bn"), {"width": 8}).save(path)
    return path


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory) -> Path:
    return tiny_teacher(tmp_path_factory.mktemp("teacher") / "tiny.pt")


@pytest.fixture(autouse=True)
def _tiny(monkeypatch, tmp_path):
    monkeypatch.setenv("NRRDD_STUDIO_TINY", "1")
    monkeypatch.setenv("NRRDD_RUNS", str(tmp_path / "runs"))


def app(tiny: Path | None, page: str | None = None, **params) -> AppTest:
    """The app with the tiny teacher ``tiny`` (and extra URL parameters), opened on ``page``."""
    at = AppTest.from_file(APP, default_timeout=60)
    if tiny is not None:
        at.query_params.update({"teacher": "file", "teacher_path": str(tiny)})
    at.query_params.update({k: v if isinstance(v, list) else str(v) for k, v in params.items()})
    at.run()
    if page:
        at.switch_page(f"app_pages/{page}.py").run()
    assert not at.exception, at.exception
    return at


def poll(at: AppTest, done, timeout: float = 90.0) -> AppTest:
    """Re-run until ``done(at)`` (jobs run in threads; AppTest does not tick fragments)."""
    end = time.time() + timeout
    while time.time() < end:
        at.run()
        assert not at.exception, at.exception
        if done(at):
            return at.run()  # one more full run, as the fragment's st.rerun() does in a browser
        time.sleep(0.3)
    raise AssertionError("timed out; progress: " + str([p.proto.text for p in at.get("progress")]))


def progress_text(at: AppTest) -> str:
    bars = at.get("progress")
    return bars[0].proto.text if bars else ""


def metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


# ---- Setup ----------------------------------------------------------------------------------
def test_setup_loads_with_defaults():
    at = app(None)
    assert at.title[0].value == "Setup"
    assert at.selectbox(key="ds").value == "shapes"
    assert at.radio(key="teacher").value == "shipped"
    # the home page shows images of the built-in dataset with the shipped teacher's CAMs
    assert any(h.value == "The teacher's view" for h in at.subheader)
    assert any("Class activation map" in c.value for c in at.caption)
    assert len(at.get("image")) >= 2  # class thumbnails + the CAM overlays


def test_setup_shows_teacher_accuracy_and_is_kept_in_the_url(teacher_path):
    at = app(teacher_path, ipc=3, classes=["circle", "star"])
    assert "%" in metric(at, "Test accuracy")
    assert any("Matches the dataset" in s.value for s in at.success)
    assert at.number_input(key="ipc").value == 3
    assert at.multiselect(key="classes").value == ["circle", "star"]
    assert at.radio(key="teacher").value == "file"
    at.number_input(key="ipc").set_value(5).run()
    at.switch_page("app_pages/6_runs.py").run()  # the setup stays in the URL on every page
    assert at.query_params["ipc"] == "5" and at.query_params["classes"] == ["circle", "star"]


def test_setup_lists_the_npz_files_present_when_a_file_name_is_wrong(tmp_path):
    import numpy as np
    np.savez(tmp_path / "mine_train.npz", x=np.zeros((1, 4, 4, 3), np.uint8), y=np.zeros(1))
    at = app(None, None, ds="npz", root=str(tmp_path), train_file="nope.npz")
    assert any("Cannot load" in e.value for e in at.error)
    assert any("mine_train.npz" in i.value for i in at.info)


def test_setup_refuses_a_teacher_with_another_class_order(tmp_path):
    names = list(load_dataset("shapes", **TINY_DATA).config.class_names)
    names[0], names[1] = names[1], names[0]
    at = app(tiny_teacher(tmp_path / "swapped.pt", names))
    assert any("Refused" in e.value and "class order" in e.value for e in at.error)


def test_pages_point_to_setup_when_the_teacher_is_refused(tmp_path):
    at = app(tiny_teacher(tmp_path / "five.pt", ["a", "b", "c", "d", "e"]), "2_explorer")
    assert any("cannot be used" in e.value for e in at.error)


# ---- Explorer -------------------------------------------------------------------------------
def test_explorer_sliders_change_what_is_shown(teacher_path):
    at = app(teacher_path, "2_explorer", classes="circle")
    assert not at.exception and len(at.image) >= 1
    captions = [c for im in at.image for c in im.captions]
    assert any("non-crit" in c for c in captions)
    assert metric(at, "Images") == "4"
    at.slider(key="tau").set_value(0.0).run()
    assert metric(at, "Non-critical share") == "0 %"
    at.slider(key="tau").set_value(1.0).run()
    assert metric(at, "Non-critical share") != "0 %"
    at.slider(key="per_class").set_value(2).run()
    assert metric(at, "Images") == "2"
    at.selectbox(key="cam_method").set_value("gradcam").run()
    assert not at.exception
    # the other tabs are computed only when open: no histogram, no CIDD crops until then
    assert [t.label for t in at.tabs] == ["CAM grid", "Class complexity", "CIDD candidate crops"]
    assert len(at.get("plotly_chart")) == 0 and "cidd_image" not in [w.key for w in at.selectbox]
    at.session_state["explorer_tab"] = "Class complexity"
    at.run()
    assert len(at.get("plotly_chart")) == 1 and "cidd_image" not in [w.key for w in at.selectbox]
    at.session_state["explorer_tab"] = "CIDD candidate crops"
    at.run()
    assert len(at.get("plotly_chart")) == 0 and not at.exception
    assert any("KEPT by" in c for im in at.image for c in im.captions)


def test_explorer_offers_only_layers_that_work_and_keeps_the_view_on_error(teacher_path,
                                                                          monkeypatch):
    from nrrdd_core.cam import get_cam
    from nrrdd_core.models import Teacher
    at = app(teacher_path, "2_explorer", classes="circle")
    t = Teacher.load(teacher_path)
    for method in ("cam", "gradcam"):
        at.selectbox(key="cam_method").set_value(method).run()
        offered = at.selectbox(key="cam_layer").options
        supported = get_cam(method).supported_layers(t)
        assert offered and all(layer in supported for layer in offered), (method, offered)
    assert at.query_params["cam_method"] == "gradcam"
    assert not any("classifier" in o or "linear" in o for o in offered)  # no Grad-CAM on logits
    early = at.selectbox(key="cam_layer").options[0]
    at.selectbox(key="cam_layer").set_value(early).run()
    at.selectbox(key="cam_method").set_value("cam").run()  # classic CAM: the last map only
    assert at.selectbox(key="cam_layer").value in get_cam("cam").supported_layers(t)
    at.selectbox(key="cam_cmap").set_value("viridis").run()
    assert at.query_params["cam_cmap"] == "viridis"  # method, layer, colour map in the URL
    # a CAM failure keeps the grid, with the last working method and layer
    from studio import cache
    real = cache.cam_maps

    def failing(key, method, *a, **k):
        if method == "xgradcam":
            raise RuntimeError("boom")
        return real(key, method, *a, **k)

    monkeypatch.setattr(cache, "cam_maps", failing)
    at.selectbox(key="cam_method").set_value("xgradcam").run()
    assert any("boom" in e.value and "instead" in e.value for e in at.error)
    assert metric(at, "Images") == "4"
    assert sum("non-crit" in c for im in at.image for c in im.captions) == 4  # the grid stays
    at.slider(key="tau").set_value(0.7).run()  # tau is carried over to Refine live
    assert at.session_state["knob.nrrdd.tau"] == 0.7


# ---- Refine ---------------------------------------------------------------------------------
def test_refine_runs_to_completion_and_saves(teacher_path, tmp_path):
    at = app(teacher_path, "3_refine", classes=["circle", "square"])
    # knobs in words with the paper's symbol, basic ones first
    assert at.slider(key="knob.nrrdd.tau").label == "CAM threshold τ (tau)"
    marks = [m.value for m in at.markdown]
    assert marks.index("**Basic**") < marks.index("**Advanced**")
    at.button(key="refine_start").click().run()
    poll(at, lambda a: progress_text(a).startswith(("done", "error")))
    assert progress_text(at).startswith("done"), [e.value for e in at.error]
    assert any("Current images" in c.value for c in at.caption)
    # one picture a frame: current, initial, mask over the images, mask, change, top to bottom
    assert len(at.image) == 1
    assert all(k in at.caption[[c.value.startswith("Current images") for c in
                                at.caption].index(True)].value
               for k in ("initial images", "mask over", "change since the start"))
    chart = at.get("vega_lite_chart")
    assert len(chart) == 1  # the loss terms, against the step within the phase, from 0
    import json
    spec = json.loads(chart[0].proto.spec)
    assert spec["encoding"]["x"]["axis"]["format"] == "d"  # integer steps
    assert spec["encoding"]["y"]["scale"]["type"] == "log"
    assert "step 0" in spec["title"]
    assert any(" steps = " in c.value and "selection + " in c.value for c in at.caption)
    assert len(at.get("download_button")) == 1  # the run as an animated GIF
    at.button(key="save_run").click().run()
    assert at.success, [e.value for e in at.error]
    assert len(list((tmp_path / "runs").iterdir())) == 1


def test_mosaic_places_each_image_in_its_cell():
    import numpy as np

    from studio.widgets import mosaic, mosaic_layout
    ims = [np.full((2, 3, 3), i, np.uint8) for i in range(5)]
    m = mosaic(ims, cols=2, gap=1, fill=255)
    assert m.shape == (3 * 3 - 1, 2 * 4 - 1, 3)
    assert (m[0:2, 0:3] == 0).all() and (m[0:2, 4:7] == 1).all() and (m[3:5, 0:3] == 2).all()
    assert (m[6:8, 0:3] == 4).all() and (m[6:8, 4:7] == 255).all()  # empty last cell
    assert (m[2] == 255).all() and (m[:, 3] == 255).all()  # the gaps
    assert mosaic_layout([0, 0, 1, 1], ["a", "b"]) == (2, "one row per class, top to bottom: a, b")
    cols, where = mosaic_layout(list(range(12)), [str(i) for i in range(12)])
    assert cols == 10 and "next row" in where


def test_live_frames_are_made_at_a_bounded_rate_and_only_while_watched(teacher_path,
                                                                       monkeypatch):
    from nrrdd_core.models import Teacher
    from studio import frames, jobs, runners
    from studio.setup import Setup
    b = load_dataset("shapes", **TINY_DATA)
    t = Teacher.load(teacher_path)
    s = Setup("shapes", tuple(sorted(TINY_DATA.items())), ("circle",), "file", str(teacher_path),
              "", "cpu", 2, 0)
    cfg = {"iterations": 300, "mipc": 4, "num_crops": 2}
    for watched in (False, True):
        monkeypatch.setattr(jobs.Job, "watched_recently", lambda self, within=2.0, w=watched: w)
        job = jobs.Job("x", "refine")
        t0 = time.perf_counter()
        res = runners.distill(job, "nrrdd", cfg, t, b, [0], s)
        elapsed = time.perf_counter() - t0
        assert res["steps"] == job.step > 300
        interval = runners.FRAME_INTERVAL if watched else runners.UNWATCHED_INTERVAL
        assert 2 <= job.frames <= 3 + elapsed / interval, (watched, job.frames, elapsed)
        rows = job.frame["rows"]  # one encoded picture per frame, made by the worker
        assert len(rows) == 1 and frames.encoded(rows[0])[:4] == b"\x89PNG"


def test_a_frame_takes_the_teachers_confidence_from_the_diagnostics(teacher_path):
    """During NRR-DD's refinement a fresh frame reads the teacher's confidence and accuracy on
    the current images from the diagnostics (no second forward), and they are the teacher's."""
    from nrrdd_core.methods import make_distiller
    from nrrdd_core.models import Teacher
    from studio import runners
    b = load_dataset("shapes", **TINY_DATA)
    t = Teacher.load(teacher_path)
    names = list(b.config.class_names)
    with make_distiller("nrrdd", {"iterations": 5, "mipc": 4, "num_crops": 2}, teacher=t,
                        dataset=b, classes=[0, 1], ipc=2, device="cpu", seed=0) as d:
        while d.refiner is None or d.step_index < d.select_steps + 2:
            d.step()
        frame = runners.snapshot(d, t, names)
        x, y = d.images()
        probs = t.predict01(x)
    assert frame["diagnostics"] is not None
    assert frame["confidence"] == pytest.approx(float(probs.gather(1, y[:, None]).mean()),
                                                abs=1e-5)
    assert frame["accuracy"] == pytest.approx(float((probs.argmax(1) == y).float().mean()))


def test_a_watched_run_makes_one_picture_per_poll_just_before_it(monkeypatch):
    """The worker times its pictures from the page's polls: none while the last one waits for
    its poll, one when the next poll comes within two steps; without polls to go by, as often
    as allowed."""
    from studio import jobs, runners
    clock = {"now": 100.0}
    monkeypatch.setattr(runners.time, "monotonic", lambda: clock["now"])
    job = jobs.Job("x", "refine")
    assert runners.picture_due(job, made=0.0, step_s=0.1)  # no poll yet
    job.poll_interval, job.polled = 0.4, 100.0  # polled just now; next poll at 100.4
    assert not runners.picture_due(job, made=99.9, step_s=0.1)  # 0.4 s to go: too early
    clock["now"] = 100.15
    assert not runners.picture_due(job, made=99.9, step_s=0.1)  # 0.25 s > 2 steps + lead
    clock["now"] = 100.2
    assert runners.picture_due(job, made=99.9, step_s=0.1)  # 0.2 s <= 2 steps + lead
    assert not runners.picture_due(job, made=100.2, step_s=0.1)  # made for this poll already
    clock["now"] = 101.5  # the page stopped polling on time
    assert runners.picture_due(job, made=100.2, step_s=0.1)


def test_gif_of_a_run_has_one_frame_per_picture_and_the_film_spans_the_run():
    import io

    import numpy as np
    from PIL import Image

    from studio import frames, jobs
    pics = [frames.png(np.full((4, 6, 3), 40 * i, np.uint8)) for i in range(3)]
    g = Image.open(io.BytesIO(frames.gif(pics, scale=2)))
    assert g.format == "GIF" and g.n_frames == 3 and g.size == (12, 8)
    job = jobs.Job("x", "refine")
    for i in range(10):
        if job.film_due():
            job.add_film(bytes([i]), keep=4)
    assert job.film == [bytes([0]), bytes([4]), bytes([8])]  # thinned evenly, from the start on


def test_compare_grid_figure_has_a_column_per_set_and_a_row_per_class():
    import io

    from PIL import Image

    from studio import frames
    x = torch.zeros(4, 3, 8, 8)
    y = torch.tensor([0, 0, 1, 1])
    png = frames.grid_figure([("a", x, y), ("b", x[:2], torch.tensor([0, 1]))], [0, 1],
                             ["zero", "one"], scale=2, gap=6)
    img = Image.open(io.BytesIO(png))
    assert img.size == (90 + 2 * (2 * 18 + 6), 24 + 2 * (16 + 6))


def test_job_working_time_stops_while_paused():
    from studio import jobs
    job = jobs.Job("x", "refine", status="running")
    job.toggle_pause()
    t = job.elapsed
    time.sleep(0.3)
    assert job.elapsed - t < 0.05  # paused: the clock stands still
    job.toggle_pause()
    time.sleep(0.2)
    assert job.elapsed - t >= 0.15


def test_refine_reattaches_with_its_settings_and_open_in_refine_replaces_the_job(
        teacher_path, tmp_path):
    at = app(teacher_path, "3_refine", classes="circle")
    at.number_input(key="knob.nrrdd.iterations").set_value(100000).run()
    at.slider(key="knob.nrrdd.tau").set_value(0.7).run()
    at.button(key="refine_start").click().run()
    job_id = at.query_params["job"]
    again = app(teacher_path, "3_refine", classes="circle", job=job_id)  # a reload
    assert again.session_state["refine_job"] == job_id
    assert again.slider(key="knob.nrrdd.tau").value == 0.7  # the job's, not the default 0.5
    assert again.number_input(key="knob.nrrdd.iterations").value == 100000
    assert not again.button(key="refine_stop").disabled
    again.button(key="refine_stop").click().run()
    poll(again, lambda a: progress_text(a).startswith("stopped"), timeout=30)
    assert any(h.value == "Save this run" for h in again.subheader)
    saved_run(teacher_path, tmp_path / "runs")
    again.switch_page("app_pages/6_runs.py").run()
    again.button(key="run.refine.tiny_run").click().run()  # "Open in Refine"
    assert again.title[0].value == "Refine live"
    assert any("Reopened run" in e.label for e in again.expander)
    assert not any(h.value == "Save this run" for h in again.subheader)  # no old save box
    assert "refine_job" not in again.session_state and not again.get("progress")


def test_refine_failure_is_shown_and_app_stays_usable(teacher_path):
    at = app(teacher_path, "3_refine", classes="circle")
    at.number_input(key="knob.nrrdd.lr").set_value(1e38).run()
    at.number_input(key="knob.nrrdd.alpha_bn").set_value(1e38).run()
    at.button(key="refine_start").click().run()
    poll(at, lambda a: progress_text(a).startswith(("done", "error")))
    assert any("failed" in e.value for e in at.error)
    assert not at.button(key="refine_start").disabled


# ---- Compare --------------------------------------------------------------------------------
def test_compare_shows_one_column_per_method_plus_random_real(teacher_path):
    at = app(teacher_path, "4_compare", classes="circle")
    assert any(c.value.startswith("Estimated time: known after") for c in at.caption)
    header = [m.value for m in at.markdown if m.value.startswith("**") and "  \n" in m.value]
    assert len(header) == len(list_methods()) + 1
    quick = [m for m in list_methods() if m != "edf"]  # EDF first trains expert trajectories
    at.multiselect(key="compare_methods").set_value(quick).run()
    at.button(key="compare_start").click().run()
    poll(at, lambda a: progress_text(a).startswith(("done", "error", "stopped")), timeout=180)
    assert progress_text(at).startswith("done"), [e.value for e in at.error]
    assert at.dataframe[0].value["set"].tolist()[0] == "random real"
    assert len(at.dataframe[0].value) == len(quick) + 1
    assert len(at.get("plotly_chart")) == 1
    # a one-epoch check on 1 class: chance level and optimiser steps shown, and a warning
    assert any("Chance level: 100.0 %" in c.value and "Optimiser steps" in c.value
               for c in at.caption)
    assert any("too short to rank" in w.value for w in at.warning)
    assert len(at.get("download_button")) == 1  # the grid as a PNG figure
    assert at.radio(key="compare_budget").value == "quick"
    assert any(c.value.startswith("Estimated time: about") for c in at.caption)  # known now
    at.button(key="compare_save").click().run()  # every set is saved, the random one too
    saved = sorted(p.name for p in (Path(os.environ["NRRDD_RUNS"])).iterdir())
    assert len(saved) == len(quick) + 1 and all("_shapes_ipc1_" in n for n in saved), saved
    assert any(n.startswith("compare_random_") for n in saved)


def test_quick_check_counts_optimiser_steps_and_flags_short_checks():
    from studio.runners import MIN_RANKING_STEPS, quick_check
    q = quick_check({"epochs": 3, "batch_size": 4}, n_images=10, n_classes=4)
    assert q == {"opt_steps": 9, "chance": 0.25, "too_short": True}
    long = quick_check({"epochs": MIN_RANKING_STEPS, "batch_size": 10}, 10, 4)
    assert long["opt_steps"] == MIN_RANKING_STEPS and not long["too_short"]


def test_compare_budgets_scale_the_published_step_counts(monkeypatch):
    from nrrdd_core.methods import get_method
    from studio.runners import BUDGETS, budget_config
    monkeypatch.delenv("NRRDD_STUDIO_TINY")
    fields = get_method("nrrdd").Config.describe()
    default = {f["name"]: f["default"] for f in fields}
    quick = budget_config(fields, BUDGETS["quick"][0])
    assert quick["iterations"] == round(0.1 * default["iterations"])
    assert quick["mipc"] == round(0.1 * default["mipc"])
    assert budget_config(fields, BUDGETS["paper"][0]) == {"iterations": default["iterations"],
                                                          "mipc": default["mipc"]}


def test_compare_reattaches_with_its_settings_after_a_reload(teacher_path, monkeypatch):
    from studio import runners

    def endless(j, methods, *args, **kwargs):  # a comparison that runs until stopped
        j.progress(total=len(methods) + 1, message="working")
        while not j.should_stop():
            time.sleep(0.05)
        return {}

    monkeypatch.setattr(runners, "compare", endless)
    at = app(teacher_path, "4_compare", classes="circle")
    at.multiselect(key="compare_methods").set_value(["rded"]).run()
    at.number_input(key="compare_epochs").set_value(3).run()
    at.button(key="compare_start").click().run()
    job_id = at.query_params["job"]
    # a reload: a new session on the same URL finds the job, its settings and Stop
    again = app(teacher_path, "4_compare", classes="circle", job=job_id)
    assert again.session_state["compare_job"] == job_id
    assert again.multiselect(key="compare_methods").value == ["rded"]
    assert again.number_input(key="compare_epochs").value == 3
    assert progress_text(again).startswith("running")
    assert not again.button(key="compare_stop").disabled
    again.button(key="compare_stop").click().run()
    poll(again, lambda a: progress_text(a).startswith("stopped"), timeout=10)
    # another page's job in the URL is not taken for this page's
    other = app(teacher_path, "3_refine", classes="circle", job=job_id)
    assert "refine_job" not in other.session_state and "job" not in other.query_params


# ---- Runs and Evaluate ----------------------------------------------------------------------
def saved_run(teacher_path: Path, root: Path, method: str = "rded", extras=None) -> Path:
    b = load_dataset("shapes", **TINY_DATA)
    t = Teacher.load(teacher_path)
    x, y = b.train.float01(torch.arange(4)), b.train.y[:4]
    mf = build_manifest(method=method, config={}, teacher=t, bundle=b, classes=sorted(set(
        y.tolist())), ipc=1, seed=0, dataset_args=TINY_DATA)
    return save_run(root, "tiny_run", x, y, mf, extras=extras)


def test_runs_offers_a_download(teacher_path, tmp_path):
    saved_run(teacher_path, tmp_path / "runs")
    at = app(teacher_path, "6_runs")
    assert len(at.get("download_button")) == 1
    assert at.dataframe[0].value["run"].tolist() == ["tiny_run"]


def test_evaluate_trains_a_student_on_a_saved_run(teacher_path, tmp_path):
    saved_run(teacher_path, tmp_path / "runs")
    at = app(teacher_path, "5_evaluate")
    assert at.multiselect(key="eval_runs").value == ["tiny_run"]  # the newest run by default
    at.button(key="eval_start").click().run()
    poll(at, lambda a: progress_text(a).startswith(("done", "error", "stopped")))
    rows = at.dataframe[0].value
    assert rows["run"].tolist() == ["tiny_run"] and 0 <= rows["final_acc"][0] <= 100


def test_evaluate_lists_this_dataset_first_and_reattaches_with_its_settings(
        teacher_path, tmp_path, monkeypatch):
    import json

    from studio import runners
    other = saved_run(teacher_path, tmp_path / "runs")
    mf = json.loads((other / "manifest.json").read_text())
    mf["dataset"]["name"] = "cifar10"  # a run of another dataset, saved later
    mf["created"] = "9999"
    (other / "manifest.json").write_text(json.dumps(mf))
    other.rename(other.parent / "other_run")
    saved_run(teacher_path, tmp_path / "runs")

    def endless(j, paths, *args, **kwargs):  # an evaluation that runs until stopped
        j.progress(total=1, message="working")
        while not j.should_stop():
            time.sleep(0.05)
        return []

    monkeypatch.setattr(runners, "evaluate_runs", endless)
    at = app(teacher_path, "5_evaluate")
    ms = at.multiselect(key="eval_runs")
    assert ms.options[0].startswith("tiny_run") and "other dataset" in ms.options[1]
    assert ms.value == ["tiny_run"]  # the newest run of the current dataset
    at.number_input(key="eval_epochs").set_value(7).run()
    at.radio(key="eval_labels").set_value("hard").run()
    at.button(key="eval_start").click().run()
    again = app(teacher_path, "5_evaluate", job=at.query_params["job"])  # a reload
    assert again.number_input(key="eval_epochs").value == 7
    assert again.radio(key="eval_labels").value == "hard"
    assert not again.button(key="eval_stop").disabled
    again.button(key="eval_stop").click().run()
    poll(again, lambda a: progress_text(a).startswith("stopped"), timeout=10)


def test_evaluate_offers_edf_protocol_for_edf_runs(teacher_path, tmp_path, monkeypatch):
    saved_run(teacher_path, tmp_path / "runs")
    radio = app(teacher_path, "5_evaluate").radio(key="eval_protocol")
    assert len(radio.options) == 1 and radio.value == "kd"  # no EDF extras: KD only
    monkeypatch.setenv("NRRDD_RUNS", str(tmp_path / "edf_runs"))
    logits = torch.nn.functional.one_hot(torch.arange(4) % 2, 10).float() * 5
    saved_run(teacher_path, tmp_path / "edf_runs", "edf",
              {"label_logits": logits, "syn_lr": 0.01, "arch_kwargs": {"depth": 1, "width": 8}})
    at = app(teacher_path, "5_evaluate")
    radio = at.radio(key="eval_protocol")
    assert len(radio.options) == 2 and radio.value == "edf"  # EDF runs default to their own
    assert at.selectbox(key="eval_student").disabled
    at.button(key="eval_start").click().run()
    poll(at, lambda a: progress_text(a).startswith(("done", "error", "stopped")))
    assert progress_text(at).startswith("done"), [e.value for e in at.error]
    rows = at.dataframe[0].value
    assert rows["protocol"].tolist() == ["edf"] and "error" not in rows
    assert any("EDF (METHODS.md §5.6) protocol" in m.value for m in at.markdown)


def test_setup_trains_a_teacher_with_progress(monkeypatch):
    at = app(None)
    at.radio(key="teacher").set_value("train").run()
    at.selectbox(key="train_arch").set_value("convnet_bn").run()
    at.button(key="train_start").click().run()
    poll(at, lambda a: progress_text(a).startswith(("done", "error", "stopped")))
    assert progress_text(at).startswith("done"), [e.value for e in at.error]
    assert at.session_state["teacher_path"].startswith("train:")  # a TeacherRef to the cache
    assert "%" in metric(at, "Test accuracy")


def test_two_sessions_refine_independently(teacher_path):
    a = app(teacher_path, "3_refine", classes="circle", seed=0)
    b = app(teacher_path, "3_refine", classes="circle", seed=1)
    for at in (a, b):
        at.button(key="refine_start").click().run()
    for at in (a, b):
        poll(at, lambda x: progress_text(x).startswith(("done", "error")))
        assert progress_text(at).startswith("done")
    assert a.session_state["refine_job"] != b.session_state["refine_job"]
    assert a.image[0].value != b.image[0].value  # different seeds, different images


def test_refine_pause_and_stop_act_between_steps(teacher_path):
    at = app(teacher_path, "3_refine", classes="circle")
    at.number_input(key="knob.nrrdd.iterations").set_value(100000).run()
    at.button(key="refine_start").click().run()
    poll(at, lambda a: " 0/" not in progress_text(a) and progress_text(a).startswith("running"))
    at.button(key="refine_pause").click().run()
    time.sleep(0.5)  # a step in flight may still finish
    steps = at.run().get("progress")[0].proto.text.split(" · ")[1]
    time.sleep(1.0)
    assert progress_text(at.run()).startswith("paused")
    assert at.get("progress")[0].proto.text.split(" · ")[1] == steps
    at.button(key="refine_stop").click().run()
    poll(at, lambda a: progress_text(a).startswith("stopped"), timeout=10)
    assert at.button(key="save_run")  # the partial result can be saved


def test_cifar10_npz_with_the_public_resnet20(shared_data):
    at = app(None, None, ds="npz", root=str(shared_data), teacher="resnet_cifar",
             teacher_path=str(shared_data / "cifar10_resnet20_akamaster.th"), classes="cat")
    assert any("Matches the dataset" in s.value for s in at.success), [e.value for e in at.error]
    assert float(metric(at, "Test accuracy").split()[0]) > 60  # JPEG copy: about 81 %
    at.switch_page("app_pages/2_explorer.py").run()
    assert not at.exception and metric(at, "Images") == "4"


def test_setup_suggests_the_architecture_that_fits_a_checkpoint(shared_data):
    at = app(None, None, ds="npz", root=str(shared_data), teacher="resnet_cifar",
             teacher_path=str(shared_data / "cifar10_resnet20_akamaster.th"),
             teacher_arch="resnet32_cifar", classes="cat")
    assert any("Cannot load the teacher" in e.value for e in at.error)
    assert any("fits **resnet20_cifar**" in i.value for i in at.info)
    at.button(key="teacher_suggest").click().run()
    assert any("Matches the dataset" in s.value for s in at.success), [e.value for e in at.error]


def test_startup_warm_up_loads_the_default_setup(caplog):
    import logging

    from studio import warm
    with caplog.at_level(logging.INFO, logger="studio.warm"):
        seconds = warm.warm()
    assert seconds > 0
    assert "warm-up stopped" not in caplog.text, caplog.text
    assert "warm-up done" in caplog.text


def test_warm_up_leaves_the_first_page_alone(monkeypatch):
    """The later pages' imports wait for the first page to be shown (they hold the GIL beside
    its CAMs), and the warm-up's own CAM is skipped once a page has started."""
    import threading

    import nrrdd_core.cam as cam
    from studio import warm
    calls = []
    monkeypatch.setattr(cam.ClassicCAM, "attribute", lambda self, *a: calls.append(1))
    monkeypatch.setattr(warm, "SETTLE_S", 0.0)
    monkeypatch.setattr(warm, "PAGE_STARTED", threading.Event())  # as in a fresh process
    monkeypatch.setattr(warm, "PAGE_SHOWN", threading.Event())
    thread = threading.Thread(target=warm.warm, args=(30.0,), daemon=True)
    thread.start()
    thread.join(5.0)
    assert thread.is_alive() and calls == [1]  # CAM done, later imports waiting for the page
    warm.PAGE_SHOWN.set()
    thread.join(10.0)
    assert not thread.is_alive()
    warm.PAGE_STARTED.set()
    warm.warm()
    assert calls == [1]  # a page has started: no second CAM


def test_background_imports_yield_to_the_users_script_runs(monkeypatch):
    """The later pages' imports wait while a script run goes on, and until none started or
    ended for the quiet time (a tau press right after load must not wait for pandas)."""
    from studio import warm
    monkeypatch.setattr(warm, "_activity", {"running": 0, "last": 0.0})
    assert warm.wait_quiet(0.3, timeout=0.0)  # nothing ran for long
    warm.run_started()
    t0 = time.monotonic()
    assert not warm.wait_quiet(0.0, timeout=0.5)  # a run is going on
    assert time.monotonic() - t0 >= 0.5
    warm.run_ended()
    t0 = time.monotonic()
    assert warm.wait_quiet(0.3, timeout=5.0)
    assert 0.3 <= time.monotonic() - t0 < 2.0  # quiet for 0.3 s after the run ended
    time.sleep(0.4)
    warm.touch()  # a tau change in the explorer's grid fragment counts too
    t0 = time.monotonic()
    assert warm.wait_quiet(0.3, timeout=5.0)
    assert 0.3 <= time.monotonic() - t0 < 2.0


def test_make_run_starts_without_a_terminal(tmp_path):
    """``make run``'s command (``python -m studio``, config from .streamlit/config.toml, headless
    off) on a fresh account (no ~/.streamlit) with no stdin: it must serve, not wait for
    Streamlit's first-run email prompt."""
    import os
    import socket
    import subprocess
    import sys
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = Path(APP).parent
    env = {**os.environ, "HOME": str(tmp_path), "BROWSER": "true"}  # no browser opens
    proc = subprocess.Popen([sys.executable, "-m", "studio", "--server.port", str(port)], cwd=repo,
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    health = f"http://127.0.0.1:{port}/_stcore/health"
    served = False
    try:
        end = time.time() + 60
        while time.time() < end and proc.poll() is None and not served:
            try:
                with urllib.request.urlopen(health, timeout=1) as r:
                    served = r.read().strip() == b"ok"
            except OSError:
                time.sleep(0.2)
        assert proc.poll() is None and served, "no health answer within 60 s"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
            assert r.status == 200 and b"<html" in r.read().lower()
    finally:
        proc.terminate()
        proc.wait(10)


def test_refine_polls_slower_and_says_so_while_the_cpu_is_contended(teacher_path, monkeypatch):
    from studio import pressure

    contended = {"now": True}
    monkeypatch.setattr(pressure, "busy", lambda was_busy, gauge=None: contended["now"])
    at = app(teacher_path, "3_refine", classes="circle")
    at.number_input(key="knob.nrrdd.iterations").set_value(100000).run()
    at.button(key="refine_start").click().run()
    note = "Other programs are using the CPU"

    def noted(a: AppTest) -> bool:
        return any(note in c.value for c in a.caption)
    poll(at, lambda a: noted(a) and progress_text(a).startswith("running"))
    assert at.session_state["live_busy"] is True
    from studio import jobs
    job = jobs.get(at.session_state["refine_job"])
    assert job.poll_interval == 1.5 and job.polled > 0  # the worker times its pictures by these
    contended["now"] = False
    poll(at, lambda a: not noted(a))
    assert at.session_state["live_busy"] is False
    at.button(key="refine_stop").click().run()
    poll(at, lambda a: progress_text(a).startswith("stopped"), timeout=10)
