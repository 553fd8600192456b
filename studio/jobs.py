"""Background jobs: one worker thread per job, polled by a ``st.fragment(run_every=...)``.

A worker never touches ``st.*`` (writes to ``st.session_state`` from a thread are lost): it
writes to its plain :class:`Job` under the job's lock. Jobs live in a process-wide registry
(``st.cache_resource``) keyed by an id that the page keeps in ``session_state`` and in the URL,
so a page refresh finds its job again and two browser sessions each see only their own.
Exceptions in the worker are caught and stored on the job (``status="error"``), so a failing run
shows its error and the app stays usable.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import streamlit as st

from nrrdd_core.errors import NrrddError, StoppedError

log = logging.getLogger(__name__)

ACTIVE = ("starting", "running", "paused")
_KEEP_FINISHED = 24


@dataclass
class Job:
    """State of one background job, shared between its worker thread and the pages.

    Attributes:
        id: registry key (also in the URL).
        kind: ``"refine"``, ``"compare"``, ``"evaluate"``, ``"teacher"``.
        status: ``starting | running | paused | done | stopped | error``.
        step, total: progress in the job's own unit (steps, epochs, methods).
        message: one line for the page.
        error: the error message when ``status == "error"``.
        history: one dict per step (loss terms, accuracy...), appended by the worker.
        frame: latest snapshot for display (numpy arrays, floats), replaced as a whole.
        frames: number of snapshots taken so far.
        result: what the worker returned (images, metrics...).
        params: the settings the job was started with; a page reopened on this job (a reload,
            a page switch) puts them back into its widgets.
        watched: ``time.monotonic()`` of the last time a page polled this job; the worker makes
            display frames only while someone watches (:meth:`watched_recently`).
        poll_interval: seconds between two polls of the page that watches (set by
            :func:`studio.widgets.live`; slower while the CPU is contended): the worker makes
            no more pictures than that.
        polled: ``time.monotonic()`` of the last poll of that page's picture (its fast
            fragment): the worker makes each picture just before the next poll
            (:func:`studio.runners.picture_due`); 0 when the page shows the live feed instead.
        watch_within: seconds after a page's last look at the job during which the worker
            still counts it as watched (0: the worker's default); a page that looks rarely
            (the live feed's figures, every few seconds) sets it longer.
        feed: the :class:`studio.feed.Feed` a page shows this job's picture and progress from
            (set by the page; the worker then publishes to it), or None.
    """

    id: str
    kind: str
    params: dict = field(default_factory=dict)
    status: str = "starting"
    step: int = 0
    total: int = 0
    message: str = ""
    error: str | None = None
    history: list = field(default_factory=list)
    frame: dict = field(default_factory=dict)
    frames: int = 0
    result: Any = None
    started: float = field(default_factory=time.time)
    finished: float | None = None
    paused_s: float = 0.0              # seconds spent paused (finished pauses)
    paused_at: float | None = None     # time.time() when the current pause began
    watched: float = 0.0
    poll_interval: float = 0.0
    polled: float = 0.0
    watch_within: float = 0.0
    feed: Any = None
    film: list = field(default_factory=list)  # PNG pictures of the run for a GIF (add_film)
    film_stride: int = 1                       # the film takes every film_stride-th picture
    film_offered: int = 0
    stop_event: threading.Event = field(default_factory=threading.Event, repr=False)
    pause_event: threading.Event = field(default_factory=threading.Event, repr=False)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # ---- read by pages ----------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def elapsed(self) -> float:
        """Seconds the job has been working: wall time since the start, pauses left out."""
        end = self.finished or time.time()
        pausing = end - self.paused_at if self.paused_at is not None else 0.0
        return max(0.0, end - self.started - self.paused_s - pausing)

    def view(self, history: bool = True, watch: bool = True) -> dict:
        """A consistent copy of the fields a page draws (taken under the lock). Polling pages
        that only need the latest records pass ``history=False`` and read ``history_len`` (the
        history is copied only when it is used). Marks the job as watched unless ``watch`` is
        False (the worker reading its own state)."""
        with self.lock:
            if watch:
                self.watched = time.monotonic()
            return {"status": self.status, "step": self.step, "total": self.total,
                    "message": self.message, "error": self.error,
                    "history": list(self.history) if history else [],
                    "history_len": len(self.history), "last": self.history[-1:],
                    "frame": dict(self.frame), "frames": self.frames, "result": self.result,
                    "elapsed": self.elapsed, "params": self.params}

    def history_tail(self, n: int) -> list:
        """The last ``n`` history records (a copy)."""
        with self.lock:
            return self.history[-n:]

    def watched_recently(self, within: float = 2.0) -> bool:
        """True when a page polled this job in the last ``within`` seconds."""
        return time.monotonic() - self.watched <= within

    # ---- controls (buttons) -----------------------------------------------------------------
    def request_stop(self) -> None:
        with self.lock:
            if self.paused_at is not None:
                self.paused_s += time.time() - self.paused_at
                self.paused_at = None
        self.stop_event.set()
        self.pause_event.clear()

    def toggle_pause(self) -> None:
        with self.lock:
            if self.status == "running":
                self.pause_event.set()
                self.status = "paused"
                self.paused_at = time.time()
            elif self.status == "paused":
                self.pause_event.clear()
                self.status = "running"
                if self.paused_at is not None:
                    self.paused_s += time.time() - self.paused_at
                self.paused_at = None

    # ---- written by the worker --------------------------------------------------------------
    def should_stop(self) -> bool:
        """True once Stop was pressed; blocks while paused (checked every 50 ms)."""
        while self.pause_event.is_set() and not self.stop_event.is_set():
            time.sleep(0.05)
        return self.stop_event.is_set()

    def progress(self, step: int | None = None, total: int | None = None,
                 message: str | None = None, record: dict | None = None,
                 frame: dict | None = None) -> None:
        """Record progress from the worker (any subset of the fields)."""
        with self.lock:
            if step is not None:
                self.step = step
            if total is not None:
                self.total = total
            if message is not None:
                self.message = message
            if record is not None:
                self.history.append(record)
            if frame is not None:
                self.frame = frame
                self.frames += 1

    def film_due(self) -> bool:
        """Whether the film takes the picture the worker just made (ask once per picture;
        encode it only when True): every ``film_stride``-th one."""
        self.film_offered += 1
        return (self.film_offered - 1) % self.film_stride == 0

    def add_film(self, picture: bytes, keep: int = 120) -> None:
        """Keep ``picture`` (PNG bytes) for the run's animation: at most ``keep``; when full,
        every other one is dropped and the film then takes every other picture
        (:meth:`film_due`), so it always spans the whole run evenly."""
        with self.lock:
            self.film.append(picture)
            if len(self.film) > keep:
                self.film = self.film[::2]
                self.film_stride *= 2

    def _finish(self, status: str, result: Any = None, error: str | None = None) -> None:
        with self.lock:
            self.status = status
            self.error = error
            if result is not None:
                self.result = result
            self.finished = time.time()


@st.cache_resource
def _registry() -> tuple[dict, threading.Lock]:
    return {}, threading.Lock()


def get(job_id: str | None) -> Job | None:
    """The job with this id, or None (unknown id, or the server restarted)."""
    if not job_id:
        return None
    jobs, lock = _registry()
    with lock:
        return jobs.get(job_id)


def _run(job: Job, target: Callable[[Job], Any]) -> None:
    with job.lock:
        job.status = "paused" if job.pause_event.is_set() else "running"
    try:
        result = target(job)
        job._finish("stopped" if job.stop_event.is_set() else "done", result=result)
    except StoppedError as exc:
        job._finish("stopped", error=None)
        log.info("job %s stopped: %s", job.id, exc)
    except NrrddError as exc:
        job._finish("error", error=str(exc))
    except Exception as exc:  # noqa: BLE001 - any failure must reach the page
        log.error("job %s failed:\n%s", job.id, traceback.format_exc())
        job._finish("error", error=f"{type(exc).__name__}: {exc}")


def start(kind: str, target: Callable[[Job], Any], params: dict | None = None) -> Job:
    """Start ``target(job)`` in a daemon thread and register the job.

    ``target`` reports through ``job.progress(...)``, checks ``job.should_stop()`` between bounded
    units of work, and returns the result (stored in ``job.result``).
    """
    job = Job(id=uuid.uuid4().hex[:10], kind=kind, params=dict(params or {}))
    jobs, lock = _registry()
    with lock:
        finished = sorted((j for j in jobs.values() if not j.active), key=lambda j: j.started)
        for old in finished[:max(0, len(finished) - _KEEP_FINISHED)]:
            del jobs[old.id]
            if old.feed is not None:
                old.feed.drop(old.id)
        jobs[job.id] = job
    threading.Thread(target=_run, args=(job, target), name=f"nrrdd-{kind}-{job.id}",
                     daemon=True).start()
    return job
