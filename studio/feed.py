"""The live feed: a running job's picture and progress shown without Streamlit reruns.

A Streamlit fragment that polls a job costs, at every poll, a script run on the server and a
re-render of the fragment in the browser (measured on 2 cores: about 0.2 of a core in each for
a progress bar and one picture 2.5 times a second, whatever changed). The feed takes the live
picture out of that loop:

- the worker writes its pictures and a small ``state.json`` (step, status, the progress line,
  the picture's number and title) into a per-job folder (:meth:`Feed.publish`, atomic writes; pictures as uncompressed BMP, cheap to make);
- the folder tree is served by Streamlit's own static file route for components
  (``components.v1.declare_component(path=...)``: ``component/studio.feed.feed/<job>/...``);
- a small in-page element (``st.components.v2``, no iframe) fetches ``state.json`` every
  :data:`STATE_POLL_MS` ms, moves its progress bar, and loads a picture only when the worker
  made a new one.

So a new picture costs the browser one image fetch and decode, and the server one file read
(the same measurement: about 0.06 of a core in the browser and 0.04 in the server). The feed
works wherever a Streamlit server runs this process (``python -m studio``, ``streamlit run
app.py``, an installed ``nrrdd ui``); without one (AppTest) :func:`available` is False and the
pages poll in fragments as before. ``NRRDD_STUDIO_FEED=0`` turns it off.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

from .frames import progress_text

#: Milliseconds between two fetches of a job's ``state.json`` by the page (a fetch that finds
#: nothing new changes nothing on the page).
STATE_POLL_MS = 250
#: Pictures kept per job (older ones are deleted; a page still loading one finds it).
KEEP_PICTURES = 3
#: Format of the feed's pictures: BMP (uncompressed) costs the worker 0.3 ms per picture where
#: a PNG costs about 9 ms (the built-in default, 338 x 192 px; 2.5 pictures per second), and
#: the browser reads it from this machine.
PICTURE_FORMAT = "bmp"
#: Seconds between two ``state.json`` writes of a running job (progress only; a new picture
#: is always written at once).
STATE_EVERY_S = 0.1


class Feed:
    """A folder of per-job live feeds (``<root>/<job id>/state.json`` and ``<n>.bmp``).

    Args:
        root: the folder (created if missing); by default a new temporary folder, removed when
            the process exits.
    """

    def __init__(self, root: str | Path | None = None) -> None:
        if root is None:
            shm = Path("/dev/shm")
            root = tempfile.mkdtemp(prefix="nrrdd-feed-", dir=shm if shm.is_dir() and
                                    os.access(shm, os.W_OK) else None)
            atexit.register(shutil.rmtree, root, True)
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def folder(self, job_id: str) -> Path:
        """The folder of ``job_id``'s feed (a 10-character hex id; anything else is refused).

        Raises:
            ValueError: ``job_id`` is not a plain name.
        """
        if not job_id or not job_id.isalnum():
            raise ValueError(f"not a job id: {job_id!r}")
        return self.root / job_id

    def publish(self, job_id: str, state: dict, picture: bytes | None = None) -> None:
        """Write ``state`` as the job's ``state.json`` and, with ``picture`` (encoded as
        :data:`PICTURE_FORMAT`), that picture as ``<n>.bmp`` first, where ``n = state["picture"]``; keeps the last
        :data:`KEEP_PICTURES` pictures. Both writes are atomic (temp file, then rename), so the
        page never reads half a file; the picture exists before the state names it."""
        folder = self.folder(job_id)
        with self._lock:
            folder.mkdir(exist_ok=True)
            if picture is not None:
                n = int(state["picture"])
                _atomic_write(folder / f"{n}.{PICTURE_FORMAT}", picture)
                old = folder / f"{n - KEEP_PICTURES}.{PICTURE_FORMAT}"
                if n > KEEP_PICTURES and old.exists():
                    old.unlink(missing_ok=True)
            _atomic_write(folder / "state.json", json.dumps(state).encode())

    def state(self, job_id: str) -> dict | None:
        """The job's last published state, or None."""
        try:
            return json.loads((self.folder(job_id) / "state.json").read_text())
        except (OSError, ValueError):
            return None

    def drop(self, job_id: str) -> None:
        """Delete the job's feed folder."""
        shutil.rmtree(self.folder(job_id), ignore_errors=True)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def job_state(job, picture: int, title: str = "", width: int = 0, tile: int = 0,
              rate: float | None = None) -> dict:
    """What the page's live element shows of ``job`` (a :class:`studio.jobs.Job`), as written to
    ``state.json``: ``status``, ``step``, ``total``, ``fraction`` (of the bar), ``text`` (the
    progress line, :func:`studio.frames.progress_text`), ``picture`` (number of the latest
    picture, 0 = none yet), its ``title``, its ``width`` and the side of one image in it
    (``tile``) in the picture's pixels. Reading the job this way does not count as watching it."""
    v = job.view(history=False, watch=False)
    return {"status": v["status"], "step": v["step"], "total": v["total"],
            "fraction": min(1.0, v["step"] / max(1, v["total"])),
            "text": progress_text(v, "steps", rate), "picture": picture, "title": title,
            "width": width, "tile": tile}


_FEED: Feed | None = None
_FEED_LOCK = threading.Lock()


def shared() -> Feed:
    """The process's feed (one temporary folder for all jobs)."""
    global _FEED
    with _FEED_LOCK:
        if _FEED is None:
            _FEED = Feed()
        return _FEED


def enabled() -> bool:
    """False when ``NRRDD_STUDIO_FEED`` is set to a false value (``0``, ``false``, ``off``)."""
    return os.environ.get("NRRDD_STUDIO_FEED", "1").lower() not in ("0", "false", "no", "off")


#: The in-page element: a progress line and bar, the picture's title and the picture. It polls
#: ``state.json`` (``data.base``) every ``data.every`` ms and loads ``<n>.<data.format>`` when ``n``
#: changed, shown ``data.scale`` times larger (nearest-neighbour). One poll loop per element:
#: a re-render with new data stops the previous loop.
JS = """
export default function(component) {
  const root = component.parentElement;
  const data = component.data || {};
  if (root.__nrrddStop) root.__nrrddStop();
  if (!root.__nrrdd) {
    root.innerHTML = `<div class="nrrdd-live">
      <div data-testid="nrrdd-live-progress">
        <div class="nrrdd-bar-text" style="font-size: 14px; margin-bottom: 6px;"></div>
        <div style="height: 8px; border-radius: 4px; background: rgba(49, 51, 63, 0.1);">
          <div class="nrrdd-bar-fill" style="height: 8px; border-radius: 4px; width: 0;
               background: ${data.color || '#2f6fdd'};"></div></div></div>
      <div class="nrrdd-caption" data-testid="nrrdd-live-caption"
           style="font-size: 14px; color: rgba(49, 51, 63, 0.6); margin: 16px 0 8px 0;"></div>
      <img class="nrrdd-picture" data-testid="nrrdd-live-picture" alt="live picture"
           style="image-rendering: pixelated; display: block; max-width: 100%;"></div>`;
    root.__nrrdd = {shown: 0, text: null};
  }
  const mem = root.__nrrdd;
  const text = root.querySelector('.nrrdd-bar-text');
  const fill = root.querySelector('.nrrdd-bar-fill');
  const caption = root.querySelector('.nrrdd-caption');
  const img = root.querySelector('.nrrdd-picture');
  let stopped = false, timer = null;
  const show = (s) => {
    if (s.text !== mem.text) {
      text.textContent = s.text;
      fill.style.width = (100 * s.fraction).toFixed(2) + '%';
      mem.text = s.text;
    }
    if (s.picture && s.picture !== mem.shown) {
      const k = Math.max(1, Math.round(data.tile_px / Math.max(1, s.tile)));
      img.style.width = (s.width * k) + 'px';
      img.src = `${data.base}/${s.picture}.${data.format}`;
      if (caption.textContent !== s.title) caption.textContent = s.title;
      mem.shown = s.picture;
    }
  };
  const poll = async () => {
    try {
      const r = await fetch(`${data.base}/state.json?t=${Date.now()}`, {cache: 'no-store'});
      if (r.ok) show(await r.json());
    } catch (e) { /* the server restarted or the job's feed is gone: keep the last view */ }
    if (!stopped) timer = setTimeout(poll, data.every);
  };
  poll();
  const stop = () => { stopped = true; clearTimeout(timer); };
  root.__nrrddStop = stop;
  return stop;
}
"""

