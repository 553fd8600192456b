"""UI speed of the Streamlit app, measured in a real browser (Debian's Chromium via Playwright).

Measures, at the built-in defaults (``shapes`` 32 px, shipped teacher, all 10 classes):

1. seconds from starting the server as ``make run`` does (``python -m studio``) to the Grad-CAM
   explorer showing its CAM grid, the browser already open (target <= 5 s on 2 cores): first
   ``--cold-starts`` with the stored views deleted (the first start of a setup computes the
   view with torch and stores it, ``studio.store``), then ``--starts`` as every later start
   (the stored view is drawn before torch is imported); also with plain
   ``streamlit run app.py`` for comparison, and to the Setup page (teacher accuracy and class
   thumbnails shown); the dataset's disk cache is warmed first (one-time generation);
2. seconds from a tau key press to the explorer's 40 images redrawn (target <= 0.5 s), median
   of several presses;
3. the cost of watching a run: refinement steps per second of one NRR-DD run with Refine live
   open (watched in the browser) and closed (the Runs page shown), alternating ``--repeats``
   times for ``--window`` s each (pooled per state), on the machine as it is ("quiet") and with
   ``--hogs`` competing busy processes ("busy"; the live view then polls less often, see
   ``studio.pressure``), at the
   default setting and at a small one (4 classes, IPC 2: a step is short, drawing would
   dominate). ``live_view_throughput_ratio`` is the worst open / closed ratio of these four
   cases (target >= 0.8);
4. UI updates per second during live NRR-DD refinement (default setting, quiet, page open):
   distinct values of the first live image per second (target >= 2).

Usage: ``python bench/ui_speed.py [--query "teacher=file&teacher_path=..."] [--window 8]
[--out bench/results/ui_speed_cpu.json]`` (about 7 minutes on 2 cores); ``--tiny`` is a
short smoke run for tests (tiny app mode, one start, two tau presses, 2 s windows, one busy
process: the numbers mean nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("screenshots", REPO / "scripts" / "screenshots.py")
shots = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(shots)

#: The small setting of the live-view throughput (4 classes, IPC 2: a step is short, drawing
#: would dominate).
SMALL = "classes=circle&classes=square&classes=triangle&classes=star&ipc=2"

CAM_GRID_READY = """() => {
  const imgs = [...document.querySelectorAll('[data-testid="stImage"] img, img')];
  const caps = document.body.innerText.match(/non-crit\\./g) || [];
  return caps.length >= 40 && imgs.length >= 40 && imgs.every(i => i.complete);
}"""


#: The Setup page is ready: its teacher's test accuracy and class thumbnails shown, script idle.
SETUP_READY = """() => {
  const app = document.querySelector('[data-testid="stApp"]');
  const imgs = [...document.images];
  return app && app.dataset.testScriptState === 'notRunning'
    && document.body.innerText.includes('Test accuracy')
    && imgs.length >= 10 && imgs.every(i => i.complete);
}"""


def time_to_page(query: str, env: dict | None = None, plain: bool = False,
                 page_path: str = "explorer", ready: str = CAM_GRID_READY,
                 cold: bool = False) -> dict:
    """Seconds from starting the server to a page being ready (default: the explorer's CAM
    grid), with the browser already open (its own launch is not the app's start-up); also when
    the server answered its health check. ``cold``: the stored views (``studio.store``) are
    deleted first, as before the first start of a setup."""
    if cold:
        from nrrdd_core.io import cache_dir
        shutil.rmtree(cache_dir() / "views", ignore_errors=True)
    with shots.browser() as page, shots.serve(env, plain=plain) as (base, t0):
        health = time.perf_counter() - t0
        page.goto(f"{base}/{page_path}{'?' + query if query else ''}")
        page.wait_for_function(ready, timeout=120_000)
        return {"total_s": time.perf_counter() - t0, "server_ready_s": health}


REDRAWN = """(before) => {
  const app = document.querySelector('[data-testid="stApp"]');
  const m = [...document.querySelectorAll('[data-testid="stMetric"]')]
    .find(e => e.innerText.includes('Non-critical share'));
  return app.dataset.testScriptState === 'notRunning' && m && !m.innerText.includes(before)
    && [...document.images].every(i => i.complete);
}"""


def tau_redraw(page, presses: int = 6) -> list[float]:
    """Seconds from a tau key press (ArrowRight / ArrowLeft alternately, 0.05 steps) until the
    explorer shows the new non-critical share, the script is idle and every image has loaded."""
    out = []
    thumb = shots.slider(page, "tau")
    for k in range(presses):
        before = shots.metric_value(page, "Non-critical share")
        thumb.focus()
        t0 = time.perf_counter()
        page.keyboard.press("ArrowRight" if k % 2 == 0 else "ArrowLeft")
        page.wait_for_function(REDRAWN, arg=before, polling=10)
        out.append(time.perf_counter() - t0)
        shots.idle(page)
    return out


STEPS = re.compile(r"(\d+)/(\d+) steps")


def steps_done(page) -> int:
    """Steps done by the Refine page's job, read from its progress bar (waiting until it shows
    them: the live feed's bar is empty until its first fetch)."""
    text = page.locator(shots.PROGRESS).filter(has_text=STEPS).first.inner_text()
    return int(STEPS.search(text).group(1))


#: Counts changes of the live picture (the live feed's, else the first image after the caption
#: ``text``) inside the page, the way a person watches: a MutationObserver, no polling from
#: outside. The picture's element is looked up again only when it was replaced.
WATCH_JS = """(text) => {
  const find = () => {
    const fed = document.querySelector('[data-testid="nrrdd-live-picture"]');
    if (fed) return fed;
    const blocks = [...document.querySelectorAll('[data-testid="stElementContainer"]')];
    const i = blocks.findIndex(b => b.innerText.trim().startsWith(text));
    return i < 0 || i + 1 >= blocks.length ? null : blocks[i + 1].querySelector('img');
  };
  const w = window.__liveWatch = {n: 0, last: null, el: null};
  const check = () => {
    if (!w.el || !w.el.isConnected) w.el = find();
    const src = w.el ? w.el.src : null;
    if (src && src !== w.last) { if (w.last !== null) w.n++; w.last = src; }
  };
  check();
  w.obs = new MutationObserver(check);
  w.obs.observe(document.body, {subtree: true, childList: true, attributes: true,
                                attributeFilter: ['src']});
}"""


def watch_open(page, window: float) -> dict:
    """Refine live open for ``window`` s: steps per second from the progress bar (read at both
    ends), and distinct live pictures per second (UI updates), counted inside the page
    (:data:`WATCH_JS`) so that the measurement does not load the browser it measures;
    ``slowed``: the page said at the end that it polls less often (CPU contended)."""
    page.evaluate(WATCH_JS, "Current images")
    n0, t0 = steps_done(page), time.perf_counter()
    page.wait_for_timeout(window * 1000)
    n1, t1 = steps_done(page), time.perf_counter()
    seen = page.evaluate("() => { const w = window.__liveWatch; w.obs.disconnect(); return w.n; }")
    slowed = page.get_by_text("Other programs are using the CPU").count() > 0
    return {"steps_per_s": (n1 - n0) / (t1 - t0), "updates_per_s": seen / (t1 - t0),
            "window_s": t1 - t0, "slowed": slowed}


def watch_closed(page, window: float) -> dict:
    """Refine live closed (the Runs page shown) for ``window`` s: steps per second counted from
    the progress bar read just before leaving and just after coming back."""
    n0, t0 = steps_done(page), time.perf_counter()
    shots.goto_page(page, "Runs")
    page.wait_for_timeout(window * 1000)
    page.get_by_role("link", name="Refine live", exact=True).first.click()
    page.locator(shots.PROGRESS).first.wait_for()
    n1, t1 = steps_done(page), time.perf_counter()
    shots.idle(page)
    return {"steps_per_s": (n1 - n0) / (t1 - t0), "window_s": t1 - t0}


def wait_for_refinement(page, timeout: float = 1800.0, every: float = 10.0) -> None:
    """Wait, with Refine live mostly closed (the selection phase is not what is measured), until
    the run is in its refinement phase: look every ``every`` s."""
    end = time.time() + timeout
    phase = page.locator('[data-testid="stMetric"]').filter(has_text="Phase")
    while not phase.filter(has_text="refine").count():
        if time.time() > end:
            raise TimeoutError("the run did not reach its refinement phase")
        shots.goto_page(page, "Runs")
        page.wait_for_timeout(every * 1000)
        page.get_by_role("link", name="Refine live", exact=True).first.click()
        page.locator(shots.PROGRESS).first.wait_for()
        page.wait_for_timeout(1000)


@contextlib.contextmanager
def busy(n: int):
    """``n`` competing processes spinning on the CPU (a busy shared machine)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(1.0 if n else 0.0)
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def _pool(windows: list[dict]) -> dict:
    """Windows of one state pooled: steps per second over their whole time (and updates)."""
    secs = sum(w["window_s"] for w in windows)
    out = {"steps_per_s": sum(w["steps_per_s"] * w["window_s"] for w in windows) / secs,
           "window_s": secs, "windows": [round(w["steps_per_s"], 2) for w in windows]}
    if all("updates_per_s" in w for w in windows):
        out["updates_per_s"] = sum(w["updates_per_s"] * w["window_s"] for w in windows) / secs
        out["slowed_windows"] = sum(bool(w.get("slowed")) for w in windows)
    return out


def live_throughput(page, base: str, query: str, window: float, iterations: int | None,
                    hogs: int = 2, repeats: int = 2) -> dict:
    """Steps per second of one NRR-DD run in its refinement phase with Refine live open
    (watched in the browser) and closed (another page shown), on the machine as it is and with
    ``hogs`` competing busy processes; open and closed alternate ``repeats`` times per case and
    each state's windows are pooled (a shared machine's speed drifts: one window of each would
    compare two different machines). Returns each case's numbers and the worst open/closed
    ratio."""
    page.goto(f"{base}/refine{'?' + query if query else ''}")
    page.get_by_role("heading", name="Refine live", exact=True).wait_for()
    shots.idle(page)
    shots.set_number(page, "iterations", iterations or 100000)
    page.get_by_role("button", name="Start refinement").click()
    page.locator(shots.PROGRESS).first.wait_for()
    wait_for_refinement(page)
    page.wait_for_timeout(1000)
    cases = {}
    for load, n in (("quiet", 0), ("busy", hogs)):
        with busy(n):
            opened, closed = [], []
            for _ in range(repeats):
                opened.append(watch_open(page, window))
                closed.append(watch_closed(page, window))
        o, c = _pool(opened), _pool(closed)
        cases[load] = {"open": o, "closed": c,
                       "ratio": o["steps_per_s"] / max(c["steps_per_s"], 1e-9)}
    stop = page.get_by_role("button", name="Stop run")
    if stop.is_enabled():
        stop.click()
    shots.idle(page)
    return {"cases": cases, "worst_ratio": min(c["ratio"] for c in cases.values())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--query", default="", help="setup as a URL query (default: built-in)")
    ap.add_argument("--window", type=float, default=8.0,
                    help="seconds of live refinement watched (and as long with the page closed) "
                         "per case")
    ap.add_argument("--hogs", type=int, default=2, help="competing busy processes of the busy case")
    ap.add_argument("--repeats", type=int, default=2,
                    help="open / closed windows per case (alternating; pooled per state)")
    ap.add_argument("--starts", type=int, default=3, help="server starts timed")
    ap.add_argument("--presses", type=int, default=6, help="tau key presses timed")
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    ap.add_argument("--tiny", action="store_true", help="smoke setting for tests")
    ap.add_argument("--plain-starts", type=int, default=1,
                    help="server starts also timed with plain `streamlit run app.py`")
    ap.add_argument("--cold-starts", type=int, default=1,
                    help="server starts timed with the stored views deleted first (as the first "
                         "start of a setup), before the others")
    ap.add_argument("--setup-starts", type=int, default=3,
                    help="server starts timed to the Setup page (teacher accuracy shown)")
    args = ap.parse_args(argv)
    env, iterations = None, None
    if args.tiny:
        import tempfile
        tmp = Path(tempfile.mkdtemp(prefix="nrrdd_ui_speed_"))
        env = {"NRRDD_STUDIO_TINY": "1", "NRRDD_RUNS": str(tmp / "runs")}
        args.starts, args.presses, args.window, iterations = 1, 2, 2.0, 3000
        args.plain_starts, args.hogs, args.repeats = 0, 1, 1
        args.cold_starts, args.setup_starts = 0, 0

    from nrrdd_core.data import load_dataset
    load_dataset("shapes")  # warm the disk cache (one-time generation, not part of the timing)
    doc = {"command": "python bench/ui_speed.py " + " ".join(argv if argv is not None else
                                                              sys.argv[1:]),
           "query": args.query, "tiny": args.tiny, "cpu_count": os.cpu_count(),
           "load_avg_before": [round(v, 2) for v in os.getloadavg()]}

    def report(key, value):  # with the 1/5/15-minute load averages: the timings depend on them
        doc[key] = {**value, "load_avg": [round(v, 2) for v in os.getloadavg()]}
        print(json.dumps({key: doc[key]}), flush=True)

    def report_starts(key, starts):
        report(key, {"runs": [s["total_s"] for s in starts],
                     "server_ready_s": [s["server_ready_s"] for s in starts],
                     "median": statistics.median(s["total_s"] for s in starts)})

    # first the cold starts (no stored views: they compute and store them), then the usual ones
    if args.cold_starts:
        report_starts("start_to_explorer_cold_s", [time_to_page(args.query, env, cold=True)
                                                   for _ in range(args.cold_starts)])
    report_starts("start_to_explorer_s", [time_to_page(args.query, env)
                                          for _ in range(args.starts)])
    if args.plain_starts:
        report_starts("start_to_explorer_plain_s", [time_to_page(args.query, env, plain=True)
                                                    for _ in range(args.plain_starts)])
    if args.setup_starts:
        report_starts("start_to_setup_s", [time_to_page(args.query, env, page_path="setup",
                                                        ready=SETUP_READY)
                                           for _ in range(args.setup_starts)])
    with shots.browser() as page, shots.serve(env) as (base, _):
        page.goto(f"{base}/explorer{'?' + args.query if args.query else ''}")
        page.wait_for_function(CAM_GRID_READY, timeout=120_000)
        shots.idle(page)
        taus = tau_redraw(page, args.presses)
        report("tau_redraw_40_images_s", {"runs": taus, "median": statistics.median(taus)})
        settings = {"default": args.query,
                    "small": "&".join(filter(None, [args.query, SMALL]))}
        through = {}
        for name, query in settings.items():
            through[name] = live_throughput(page, base, query, args.window, iterations,
                                            args.hogs, args.repeats)
            report(f"live_view_{name}", through[name])
        quiet = through["default"]["cases"]["quiet"]["open"]
        report("live_refinement", {**quiet, "setting": "default, quiet, Refine live open"})
        doc["live_view_throughput_ratio"] = min(t["worst_ratio"] for t in through.values())
        print(json.dumps({"live_view_throughput_ratio": doc["live_view_throughput_ratio"]}))
    if args.out:
        sys.path.insert(0, str(REPO / "bench"))
        import common
        common.write_json(args.out, doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
