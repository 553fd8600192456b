"""The live feed (studio.feed): a running job's picture and progress written by the worker and
fetched by the browser itself, and the Refine page that shows a run through it."""

from __future__ import annotations

import json
import time

import pytest

from nrrdd_core.data import load_dataset
from test_app import _tiny  # noqa: F401 - the tiny app settings, for every test here
from test_app import TINY_DATA, app, poll, progress_text, tiny_teacher


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    return tiny_teacher(tmp_path_factory.mktemp("teacher") / "tiny.pt")


def test_feed_writes_the_state_after_its_picture_and_keeps_the_last_three(tmp_path):
    from studio.feed import KEEP_PICTURES, Feed
    out = Feed(tmp_path)
    for n in range(1, 6):
        out.publish("ab12", {"picture": n, "step": 10 * n}, f"pic{n}".encode())
    folder = tmp_path / "ab12"
    assert sorted(p.name for p in folder.iterdir()) == ["3.bmp", "4.bmp", "5.bmp", "state.json"]
    assert KEEP_PICTURES == 3 and (folder / "5.bmp").read_bytes() == b"pic5"
    assert out.state("ab12") == {"picture": 5, "step": 50}
    out.publish("ab12", {"picture": 5, "step": 51})  # progress only: the pictures stay
    assert out.state("ab12")["step"] == 51 and (folder / "5.bmp").exists()
    with pytest.raises(ValueError):
        out.publish("../x", {"picture": 0})
    out.drop("ab12")
    assert not folder.exists()


def test_progress_line_by_hand():
    from studio.frames import progress_text as line
    view = {"status": "running", "step": 12, "total": 124, "elapsed": 4.1, "message": "refine"}
    assert line(view, "steps", rate=2.0) == \
        "running · 12/124 steps · 4.1 s · about 56.0 s left · refine"
    done = {**view, "status": "done", "step": 124, "elapsed": 75.2, "message": ""}
    assert line(done, "steps", rate=2.0) == "done · 124/124 steps · 1 min 15 s"


def test_a_run_shown_through_the_feed_publishes_each_picture_at_the_feeds_rate(
        teacher_path, tmp_path, monkeypatch):
    """A watched run with a feed set writes every picture it makes (numbered as the job counts
    them, the state naming the last one), no more often than the page's picture interval, and
    its final state says the last step."""
    from nrrdd_core.models import Teacher
    from studio import frames, jobs, runners
    from studio.feed import Feed
    from studio.setup import Setup
    b = load_dataset("shapes", **TINY_DATA)
    t = Teacher.load(teacher_path)
    s = Setup("shapes", tuple(sorted(TINY_DATA.items())), ("circle",), "file", str(teacher_path),
              "", "cpu", 2, 0)
    monkeypatch.setattr(jobs.Job, "watched_recently", lambda self, within=2.0: True)
    writes = []
    out = Feed(tmp_path)
    publish = out.publish
    monkeypatch.setattr(out, "publish", lambda job_id, state, picture=None: (
        writes.append((time.perf_counter(), state["picture"], picture is not None)),
        publish(job_id, state, picture)))
    job = jobs.Job("abc123", "refine")
    job.feed, job.poll_interval = out, 0.6
    t0 = time.perf_counter()
    runners.distill(job, "nrrdd", {"iterations": 400, "mipc": 4, "num_crops": 2}, t, b, [0], s)
    elapsed = time.perf_counter() - t0
    pictures = [(at, n) for at, n, new in writes if new]
    assert [n for _, n in pictures] == list(range(1, job.frames + 1))  # each one, in order
    assert 3 <= job.frames <= 3 + elapsed / 0.6, (job.frames, elapsed)  # the feed's rate
    state = json.loads((tmp_path / "abc123" / "state.json").read_text())
    assert state["step"] == job.step and state["picture"] == job.frames
    picture = (tmp_path / "abc123" / f"{job.frames}.bmp").read_bytes()
    assert picture[:2] == b"BM" and picture == frames.encoded(job.frame["rows"][0], "bmp")
    assert state["text"].startswith(f"{job.status} · {job.step}/{job.total} steps · ")


def test_refine_shows_a_running_job_through_the_feed_then_its_result(teacher_path,
                                                                      monkeypatch):
    """Where the feed is available the running job is drawn by the feed's element (no
    progress bar or picture re-sent by the page), the worker gets the feed and the picture
    interval; once the run ends the page shows the final progress and pictures itself."""
    from studio import widgets
    mounts = []
    monkeypatch.setattr(widgets, "_feed_element", lambda: (
        "component/feed", lambda data, key: mounts.append((data, key))))
    at = app(teacher_path, "3_refine", classes="circle")
    at.number_input(key="knob.nrrdd.iterations").set_value(100000).run()
    at.button(key="refine_start").click().run()
    from studio import jobs
    job = jobs.get(at.session_state["refine_job"])
    assert mounts and mounts[-1][0]["base"] == f"component/feed/{job.id}"
    assert mounts[-1][0]["tile_px"] == widgets.TILE_PX
    assert job.feed is not None and job.poll_interval == 0.35 and job.polled == 0.0
    assert not at.get("progress")  # the feed draws it, and the picture
    assert not any(c.value.startswith("Current images") for c in at.caption)
    at.button(key="refine_stop").click().run()
    poll(at, lambda a: progress_text(a).startswith("stopped"), timeout=20)
    assert any(c.value.startswith("Current images") for c in at.caption)  # drawn by the page
