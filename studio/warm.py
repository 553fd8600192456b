"""Start-up warm-up of the server process (no ``st.*``: it runs before any script).

``python -m studio`` (what ``make run`` starts) calls :func:`start` before Streamlit's server
boots, so the first page finds torch and ``nrrdd_core`` imported, the default dataset in memory
and the teacher's first forward/backward (thread pools, kernel selection) already paid for,
instead of doing all of that after the browser connects. ``streamlit run app.py`` works too,
without this head start (``studio.cache.prewarm`` then imports in the background per process).
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


def warm() -> float:
    """Import :data:`FIRST`, load the default setup's dataset (built-in ``shapes``), run the
    shipped teacher's classic CAM once on a batch of :data:`WARM_BATCH` training images on the
    default device, then import :data:`LATER`. Returns the seconds it took. Never raises: a
    failure is logged (the page that needs the data reports its own errors)."""
    t0 = time.perf_counter()
    try:
        import importlib
        for name in FIRST:
            importlib.import_module(name)
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
        for name in LATER:
            importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - a warm-up must never stop the server
        log.info("warm-up stopped: %s", exc)
    seconds = time.perf_counter() - t0
    log.info("warm-up done in %.1f s", seconds)
    return seconds


def start() -> threading.Thread:
    """Run :func:`warm` in a daemon thread and return it."""
    thread = threading.Thread(target=warm, name="nrrdd-warm", daemon=True)
    thread.start()
    return thread
