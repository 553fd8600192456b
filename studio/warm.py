"""Start-up warm-up of the server process (no ``st.*``: it runs before any script).

``python -m studio`` (what ``make run`` starts) calls :func:`start` before Streamlit's server
boots; under ``streamlit run app.py``, ``app.py`` starts it at the first script run.
The warm-up imports torch and ``nrrdd_core`` in a background thread, then the modules of the
other pages once the first page has been shown. When it imports torch depends on the first page:

* a page that needs torch (Setup, Refine live...): at once, beside the page's own import;
* the Grad-CAM explorer, which draws a stored view without torch (:mod:`studio.explorer`):
  once it has been shown and nobody has run a script or moved tau for :data:`AFTER_LIGHT_S`
  (an import holds the GIL for long stretches and would slow every request of that page and
  the first tau changes: measured in ``bench/ui_speed.py``);
* no page within :data:`GRACE_S` of the server's start (nobody has the app open yet): then, so
  the first page finds torch imported.
"""

from __future__ import annotations

import importlib
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


#: Set by ``app.py`` (:func:`page_started`) when a script run of this process starts.
PAGE_STARTED = threading.Event()
#: URL paths of the pages that can draw their first view without torch (see the module doc).
LIGHT_PAGES = ("explorer",)
#: Seconds the warm-up waits after the server's start for a first page before importing torch.
GRACE_S = 2.0
#: Quiet seconds (:func:`wait_quiet`) after a light first page before torch is imported: the
#: browser fetches the page's images after the script run, and the user's first tau changes
#: (:func:`touch`) must not run beside the import (measured: a press 1 s after load took 1.3 s
#: with the import started 1 s after load, 0.2-0.3 s without).
AFTER_LIGHT_S = 3.0
_first_page = {"light": False}


def page_started(url_path: str) -> None:
    """Called by ``app.py`` before each page runs, with the page's URL path: the first one
    decides when the warm-up imports torch (see the module doc)."""
    if not PAGE_STARTED.is_set():
        _first_page["light"] = url_path in LIGHT_PAGES
    PAGE_STARTED.set()


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


def touch() -> None:
    """Called by a fragment the user drives (the explorer's tau grid): counts as activity for
    :func:`wait_quiet` like a script run (fragment reruns do not pass through ``app.py``)."""
    with _activity_lock:
        _activity["last"] = time.monotonic()


def wait_quiet(quiet_s: float | None = None, timeout: float = 60.0, every: float = 0.1) -> bool:
    """Wait until no script run of this process is going on and none started or ended for
    ``quiet_s`` (default :data:`SETTLE_S`) seconds: background work then yields to the user's
    clicks. Fragment reruns count only where they call :func:`touch` (the live views do not).
    False after ``timeout`` s."""
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


def _import(name: str) -> None:
    importlib.import_module(name)


def warm(page_wait_s: float = 0.0, grace_s: float = 0.0) -> float:
    """Wait up to ``grace_s`` s for a first page (:data:`PAGE_STARTED`); after a light one
    (:data:`LIGHT_PAGES`) wait until it has been shown and the app has been quiet for
    :data:`AFTER_LIGHT_S` s (at most ``page_wait_s`` s each). Then import :data:`FIRST`;
    unless a page has started, load the default setup's dataset (built-in ``shapes``) and run
    the shipped teacher's classic CAM once on a batch of :data:`WARM_BATCH` training images on
    the default device (first-call costs paid before anyone waits); then import :data:`LATER`
    (:func:`import_later`). Returns the seconds it took. Never raises: a failure is logged (the
    page that needs the data reports its own errors)."""
    t0 = time.perf_counter()
    try:
        if grace_s:
            PAGE_STARTED.wait(grace_s)
        if PAGE_STARTED.is_set() and _first_page["light"]:
            PAGE_SHOWN.wait(page_wait_s)
            wait_quiet(AFTER_LIGHT_S, timeout=page_wait_s)
        for name in FIRST:
            _import(name)
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
    if wait_s:
        PAGE_SHOWN.wait(wait_s)
    for name in LATER:
        if wait_s:
            wait_quiet(timeout=wait_s)
        _import(name)


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


_started: list[threading.Thread] = []
_start_lock = threading.Lock()


def start(after_server: bool = True) -> threading.Thread:
    """Run :func:`warm` in a daemon thread, once per process (a second call returns the first
    thread). With ``after_server`` the thread first waits for Streamlit's server to start
    (:func:`server_started`): the imports hold the GIL, and the server's boot comes first. It
    then waits up to :data:`GRACE_S` for a first page (see the module doc); the later imports
    wait up to :data:`PAGE_WAIT_S` for the first page (:data:`PAGE_SHOWN`)."""
    with _start_lock:
        if _started:
            return _started[0]

        def run() -> None:
            if after_server:
                server_started()
            warm(PAGE_WAIT_S, GRACE_S)

        thread = threading.Thread(target=run, name="nrrdd-warm", daemon=True)
        _started.append(thread)
        thread.start()
        return thread
