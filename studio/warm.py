"""Start-up warm-up of the server process (no ``st.*``: it runs before any script).

``python -m studio`` (what ``make run`` starts) calls :func:`start` before Streamlit's server
boots. Once the server has started, a thread imports torch and ``nrrdd_core`` while the browser
loads the page, so the first script run finds them (nearly) imported instead of starting the
3 s import after the browser connected; the modules of the other pages follow once the first
page has been shown. ``streamlit run app.py`` works too, with less of a head start
(``studio.cache.prewarm`` then imports in the background per process).
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger(__name__)

#: Modules the first page needs (imported first), then the ones later pages import.
FIRST = ("torch", "nrrdd_core.data", "nrrdd_core.models", "nrrdd_core.cam")
LATER = ("PIL.Image", "pandas", "plotly.graph_objects", "plotly.express", "nrrdd_core.methods",
         "nrrdd_core.export", "nrrdd_core.evaluate")
#: Imported in the background when Refine live is first opened (not at start-up, where it
#: would compete with the first page): the first ``torch.optim`` optimiser of a process
#: imports ``torch._dynamo`` (about 870 modules, sympy included: 3 s on 2 cores, far more
#: while a page polls), which stalled a live run's first refinement step.
BEFORE_A_RUN = ("torch._dynamo",)

#: Images in the warm-up CAM batch: the explorer's default grid (10 classes x 4 images).
WARM_BATCH = 40


#: Set by ``app.py`` when a script run of this process starts: the warm-up then skips its own
#: CAM (the page computes the same and the two would take turns on the GIL).
PAGE_STARTED = threading.Event()
#: Set by ``app.py`` when a script run of this process has ended: the imports for later pages
#: (:data:`LATER`) wait for it. Imports hold the GIL, and a torch forward re-takes it after
#: every op, so importing pandas and plotly beside the first page's CAMs made those take 0.8 s
#: instead of 0.1 s (measured at start-up, 2 cores).
PAGE_SHOWN = threading.Event()
#: Seconds without a script run that the later imports wait for, after :data:`PAGE_SHOWN` and
#: again before each module (:func:`wait_quiet`): the browser still fetches and draws the page's
#: images after a run, and a user's next action (a tau key press, 0.3 s to redraw) must not wait
#: for pandas' import (measured: the first presses after load took 0.6-0.9 s beside them).
SETTLE_S = 3.0

_activity = {"running": 0, "last": 0.0}
_activity_lock = threading.Lock()


def run_started() -> None:
    """Called by ``app.py`` when a script run starts (see :func:`wait_quiet`)."""
    with _activity_lock:
        _activity["running"] += 1
        _activity["last"] = time.monotonic()


def run_ended() -> None:
    """Called by ``app.py`` when a script run ends, however it ends."""
    with _activity_lock:
        _activity["running"] = max(0, _activity["running"] - 1)
        _activity["last"] = time.monotonic()


def wait_quiet(quiet_s: float | None = None, timeout: float = 60.0, every: float = 0.1) -> bool:
    """Wait until no script run of this process is going on and none started or ended for
    ``quiet_s`` (default :data:`SETTLE_S`) seconds: background work then yields to the user's
    clicks. Fragment reruns (live views) do not count. False after ``timeout`` s."""
    quiet_s = SETTLE_S if quiet_s is None else quiet_s
    end = time.monotonic() + timeout
    while True:
        with _activity_lock:
            busy, since = _activity["running"] > 0, time.monotonic() - _activity["last"]
        if not busy and since >= quiet_s:
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(every if busy else min(every, quiet_s - since) + 0.001)


def warm(page_wait_s: float = 0.0) -> float:
    """Import :data:`FIRST`; unless a page has started (:data:`PAGE_STARTED`), load the default
    setup's dataset (built-in ``shapes``) and run the shipped teacher's classic CAM once on a
    batch of :data:`WARM_BATCH` training images on the default device; then wait up to
    ``page_wait_s`` seconds for the first page to be shown (:data:`PAGE_SHOWN`) and import
    :data:`LATER`, each module once the app has been quiet for :data:`SETTLE_S` s
    (:func:`wait_quiet`, at most ``page_wait_s`` s each). Returns the seconds it took. Never raises: a failure is logged (the page
    that needs the data reports its own errors)."""
    t0 = time.perf_counter()
    try:
        import importlib
        for name in FIRST:
            importlib.import_module(name)
        if not PAGE_STARTED.is_set():
            from nrrdd_core.cam import ClassicCAM
            from nrrdd_core.data import load_dataset
            from nrrdd_core.device import resolve_device
            from nrrdd_core.models import shipped_teacher

            from .settings import shapes_kwargs
            bundle = load_dataset("shapes", **shapes_kwargs())
            teacher = shipped_teacher(resolve_device("auto"))  # a private copy: hooks stay local
            idx = list(range(min(WARM_BATCH, len(bundle.train))))
            x = teacher.data_config.normalize(bundle.train.float01(idx).to(teacher.device))
            ClassicCAM(teacher).attribute(x, bundle.train.y[idx])
        import_later(page_wait_s)
    except Exception as exc:  # noqa: BLE001 - a warm-up must never stop the server
        log.info("warm-up stopped: %s", exc)
    seconds = time.perf_counter() - t0
    log.info("warm-up done in %.1f s", seconds)
    return seconds


def import_later(wait_s: float = 0.0) -> None:
    """Import :data:`LATER`; with ``wait_s``, first wait up to that long for the first page to
    be shown (:data:`PAGE_SHOWN`), and before each module up to that long for the app to be
    quiet (:func:`wait_quiet`: the imports hold the GIL and yield to the user's clicks)."""
    import importlib

    if wait_s:
        PAGE_SHOWN.wait(wait_s)
    for name in LATER:
        if wait_s:
            wait_quiet(timeout=wait_s)
        importlib.import_module(name)


#: Seconds the warm-up's later imports wait at most for the first page (a server whose browser
#: never connects still gets them).
PAGE_WAIT_S = 30.0
#: Seconds the warm-up waits at most for Streamlit's server to start before it imports torch.
SERVER_WAIT_S = 10.0


def server_started(timeout: float = SERVER_WAIT_S, every: float = 0.02) -> bool:
    """Wait until Streamlit's runtime in this process has started (its server then answers the
    browser), polling every ``every`` s; False after ``timeout`` s."""
    from streamlit.runtime import Runtime, RuntimeState
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if Runtime.exists() and Runtime.instance().state != RuntimeState.INITIAL:
            return True
        time.sleep(every)
    return False


def start(after_server: bool = True) -> threading.Thread:
    """Run :func:`warm` in a daemon thread and return it. With ``after_server`` the thread
    first waits for Streamlit's server to start (:func:`server_started`): the imports hold the
    GIL, and the server's boot and the browser's first requests then come first, while the
    browser loads the page torch is imported (start to the explorer's grid, 2 cores: see
    ``bench/ui_speed.py``). The later imports wait up to :data:`PAGE_WAIT_S` for the first
    page (:data:`PAGE_SHOWN`)."""

    def run() -> None:
        if after_server:
            server_started()
        warm(PAGE_WAIT_S)

    thread = threading.Thread(target=run, name="nrrdd-warm", daemon=True)
    thread.start()
    return thread
