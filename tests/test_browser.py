"""Real-browser walk: Streamlit server + Debian's Chromium driven by Playwright.

Skipped (with the reason) when Debian's ``chromium`` is missing (the ``playwright`` package is a
declared test dependency, so its absence is an error, not a skip). Uses the
same code as ``scripts/screenshots.py`` (the README's screenshots).
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from urllib.parse import urlencode

import pytest

from test_app import tiny_teacher

pytestmark = pytest.mark.browser
REPO = Path(__file__).resolve().parents[1]

if shutil.which("chromium") is None:
    pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)",
                allow_module_level=True)
import playwright  # noqa: E402, F401 - a declared test dependency (the test extra): no skip

spec = importlib.util.spec_from_file_location("screenshots", REPO / "scripts" / "screenshots.py")
shots = importlib.util.module_from_spec(spec)
spec.loader.exec_module(shots)


def test_walk_choose_class_move_tau_refine_live_stop(tmp_path):
    teacher = tiny_teacher(tmp_path / "tiny.pt")
    env = {"NRRDD_STUDIO_TINY": "1", "NRRDD_RUNS": str(tmp_path / "runs"),
           "NRRDD_CACHE": str(tmp_path / "cache")}
    query = urlencode({"teacher": "file", "teacher_path": str(teacher)})
    outside = []  # offline: the app fetches nothing from the internet (the tab icon included)
    with shots.serve(env) as (base, _), shots.browser() as page:
        page.on("request", lambda r: outside.append(r.url)
                if not r.url.startswith((base, "data:", "blob:")) else None)
        out = shots.walk(page, base, query, shots=tmp_path / "shots", iterations=3000)
    assert outside == []
    assert "classes=circle" in out["url_after_class"]  # the setup is kept in the URL
    assert out["noncritical"][0] != out["noncritical"][1]
    assert len({src for _, src in out["live"]}) >= 3  # the live image changed at least twice
    assert all("/component/" in src for _, src in out["live"])  # fetched from the live feed
    assert (tmp_path / "shots" / "refine.png").stat().st_size > 10_000
    assert len(list((tmp_path / "runs").iterdir())) == 1


def test_compare_reload_mid_run_finds_the_job_its_settings_and_stop(tmp_path):
    import re

    teacher = tiny_teacher(tmp_path / "tiny.pt")
    env = {"NRRDD_STUDIO_TINY": "1", "NRRDD_RUNS": str(tmp_path / "runs"),
           "NRRDD_CACHE": str(tmp_path / "cache")}
    query = urlencode({"teacher": "file", "teacher_path": str(teacher), "classes": "circle"})
    running = re.compile(r"^running")
    with shots.serve(env) as (base, _), shots.browser() as page:
        page.goto(f"{base}/compare?{query}")
        page.get_by_role("heading", name="Compare", exact=True).wait_for()
        shots.idle(page)
        shots.set_number(page, "Student epochs", 300)  # long enough to be mid-run at the reload
        page.get_by_role("button", name="Run comparison").click()
        page.locator('[data-testid="stProgress"]').filter(has_text=running).wait_for()
        assert "job=" in page.url
        page.reload()
        page.get_by_role("heading", name="Compare", exact=True).wait_for()
        page.locator('[data-testid="stProgress"]').filter(has_text=running).wait_for()
        epochs = page.locator('[data-testid="stNumberInput"]').filter(has_text="Student epochs")
        assert epochs.locator("input").input_value() == "300"  # its settings, not the defaults
        stop = page.get_by_role("button", name="Stop comparison")
        assert stop.is_enabled()
        stop.click()
        page.get_by_text("Stopped on request").wait_for()


def test_ui_speed_bench_tiny(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("ui_speed", REPO / "bench" / "ui_speed.py")
    ui_speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ui_speed)
    teacher = tiny_teacher(tmp_path / "tiny.pt")
    query = urlencode({"teacher": "file", "teacher_path": str(teacher)})
    out = tmp_path / "ui.json"
    assert ui_speed.main(["--tiny", "--query", query, "--out", str(out)]) == 0
    import json
    doc = json.loads(out.read_text())
    assert doc["start_to_explorer_s"]["median"] > doc["start_to_explorer_s"]["server_ready_s"][0] > 0
    assert len(doc["tau_redraw_40_images_s"]["runs"]) == 2
    assert doc["live_refinement"]["updates_per_s"] > 0
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import report
    md = report.ui_markdown(doc)
    assert "| UI updates during live NRR-DD refinement |" in md and "bench/ui_speed.py --tiny" in md
