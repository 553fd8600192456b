"""Widgets and renderers shared by the pages."""

from __future__ import annotations

import io
import math
import time
from typing import TYPE_CHECKING, Callable

import numpy as np
import streamlit as st
from PIL import Image

from nrrdd_core.errors import NrrddError

from . import feed, jobs, pressure
from . import keys as K
from .cache import Context, context
from .frames import (duration, heat, mosaic, mosaic_layout, png,  # noqa: F401 - re-exported
                     progress_text, to_hwc)

if TYPE_CHECKING:  # imported where used: the explorer draws a saved view before torch is imported
    import plotly.graph_objects as go
    import torch

#: Display side of one image in grids, in pixels (small images are upscaled, nearest-neighbour).
TILE_PX = 128

#: Page CSS (``st.html``, added by ``app.py`` on every run): images are sent at their own size
#: and the browser upscales them nearest-neighbour, so a 32 px image stays sharp and cheap.
PIXELATED_CSS = "<style>[data-testid='stImage'] img {image-rendering: pixelated;}</style>"


def app_icon():
    """The browser tab's icon, drawn here (nothing fetched from the internet): a white disc
    with a blue "critical" core on dark blue, 32 x 32 px."""
    from PIL import ImageDraw

    img = Image.new("RGB", (32, 32), (20, 30, 60))
    draw = ImageDraw.Draw(img)
    draw.ellipse((4, 4, 27, 27), fill=(235, 235, 240))
    draw.ellipse((11, 11, 20, 20), fill=(70, 120, 230))
    return img


def require_context(with_teacher: bool = True, caption: bool = True) -> Context:
    """The session's :class:`Context`, or an error box pointing at Setup and ``st.stop()``;
    with ``caption``, a line saying what the page works on (:func:`setup_caption`)."""
    try:
        ctx = context(with_teacher)
    except (NrrddError, KeyError) as exc:
        setup_error(exc)
    if caption:
        setup_caption(ctx)
    return ctx


def setup_error(exc: Exception) -> None:
    """An error box saying why the setup cannot be used, a link to Setup, and ``st.stop()``."""
    st.error(f"The setup cannot be used: {exc}")
    st.page_link("app_pages/1_setup.py", label="Fix it on the Setup page", icon=":material/tune:")
    st.stop()


def setup_text(dataset: str, image_size: int, class_names: list[str], teacher: str | None,
               ipc: int, seed: int, device: str) -> str:
    """One line (markdown) saying what a page works on: the dataset's name and image side in
    px, the chosen classes' names, the teacher's architecture (None: no teacher), IPC, seed and
    device type."""
    shown = ", ".join(class_names[:6]) + (f" … (+{len(class_names) - 6})"
                                          if len(class_names) > 6 else "")
    teacher = f"teacher {teacher}" if teacher is not None else "no teacher"
    return (f"**{dataset}** ({image_size} px) · classes: {shown} · {teacher} · IPC {ipc} · "
            f"seed {seed} · device {device}")


def setup_caption(ctx: Context) -> None:
    """One line saying what the page works on (:func:`setup_text`)."""
    st.caption(setup_text(ctx.bundle.config.name, ctx.bundle.config.image_size, ctx.class_names,
                          ctx.teacher.arch if ctx.teacher is not None else None, ctx.setup.ipc,
                          ctx.setup.seed, ctx.device.type))


def _width(img: np.ndarray | bytes) -> int:
    return img.shape[1] if isinstance(img, np.ndarray) else Image.open(io.BytesIO(img)).size[0]


def critical_view(img: np.ndarray, cam: np.ndarray, tau: float) -> np.ndarray:
    """Show the critical region (``C >= tau``, frozen) in its own colours and the non-critical
    rest (refined by NRR-DD) greyed and tinted blue. ``img`` uint8 ``(H,W,3)``, ``cam``
    ``(H,W)``."""
    crit = (cam >= tau)[..., None]
    grey = img.mean(-1, keepdims=True)
    tint = 0.45 * grey + 0.55 * np.array([70.0, 120.0, 230.0])
    return np.where(crit, img, tint).astype(np.uint8)


def image_grid(images: list[np.ndarray | bytes], captions: list[str] | None = None,
               px: int = TILE_PX) -> None:
    """Images (uint8 ``(H,W,3)`` arrays or :func:`png` bytes) side by side, wrapping, sent as
    PNG at their own size and shown an integer number of times larger, about ``px`` wide (the
    browser upscales nearest-neighbour, :data:`PIXELATED_CSS`)."""
    if not images:
        st.info("No images to show.")
        return
    w = max(_width(im) for im in images)
    st.image(images, caption=captions, width=max(1, round(px / w)) * w, output_format="PNG")


def class_rows(x01: torch.Tensor, labels: torch.Tensor, class_ids: list[int],
               class_names: list[str], px: int = 64) -> None:
    """One row per class of a set of images ``(N,3,H,W)`` in [0,1] with labels ``(N,)``."""
    for c, name in zip(class_ids, class_names):
        idx = (labels == c).nonzero().flatten().tolist()
        cols = st.columns([1, 6], vertical_alignment="center")
        cols[0].markdown(f"**{name}**")
        with cols[1]:
            if idx:
                image_grid([to_hwc(x01[i]) for i in idx], px=px)
            else:
                st.caption("no images")


#: The knobs a newcomer tunes first, per method (the rest are shown under "Advanced").
BASIC_KNOBS = {"nrrdd": ("iterations", "lr", "tau", "mask_mode", "alpha_bn", "mipc", "top_t"),
               "sre2l": ("iterations", "lr", "r_bn"), "rded": ("mipc", "num_crops", "factor"),
               "edf": ("iterations", "syn_steps", "expert_epochs", "max_start_epoch", "cpd_alpha",
                       "dae_beta")}
#: Knob names in words, with the papers' symbol where they have one (METHODS.md).
KNOB_WORDS = {
    "iterations": "optimisation steps", "lr": "learning rate η", "tau": "CAM threshold τ",
    "mask_mode": "mask form", "alpha_bn": "BN-statistics loss weight α", "r_bn":
    "BN-statistics loss weight α", "mipc": "candidate images per class", "top_t":
    "boxes kept by CAM ratio t", "num_crops": "candidate crops per image m", "factor":
    "patches per side", "syn_steps": "student steps per iteration N", "expert_epochs":
    "expert epochs matched M", "max_start_epoch": "latest start epoch T⁺", "cpd_alpha":
    "CPD weight α", "dae_beta": "DAE weight β", "min_scale": "smallest crop share"}


def knob_label(f: dict) -> str:
    """``"CAM threshold τ (tau)"``: the knob in words with its symbol, the field name (the CLI
    flag) and the unit."""
    unit = f" [{f['unit']}]" if f.get("unit") and f["unit"] not in ("1", None) else ""
    words = KNOB_WORDS.get(f["name"])
    return f"{words} ({f['name']}){unit}" if words else f"{f['name']}{unit}"


def config_knobs(method: str, fields: list[dict], overrides: dict | None = None,
                 disabled: bool = False, columns: int = 3) -> dict:
    """Widgets generated from ``Config.describe()`` rows (fields with ``ui=False`` are left at
    their default), the basic ones (:data:`BASIC_KNOBS`) first and the others under
    "Advanced", each named in words with the paper's symbol (:func:`knob_label`). Values persist
    for the session; ``overrides`` replace the published defaults for fields the user has not
    touched yet (tiny mode, a reopened run). Returns ``{name: value}``."""
    overrides = overrides or {}
    shown = [f for f in fields if f.get("ui", True)]
    basic = BASIC_KNOBS.get(method, ())
    groups = [("Basic", [f for f in shown if f["name"] in basic]),
              ("Advanced", [f for f in shown if f["name"] not in basic])]
    values = {}
    for title, group in groups:
        if group:
            st.markdown(f"**{title}**")
            values.update(_knob_widgets(method, group, overrides, disabled, columns))
    return values


def _knob_widgets(method: str, shown: list[dict], overrides: dict, disabled: bool,
                  columns: int) -> dict:
    cols = st.columns(columns)
    values = {}
    for i, f in enumerate(shown):
        key = K.knob(method, f["name"])
        default = overrides.get(f["name"], f["default"])
        if key not in st.session_state:
            st.session_state[key] = default
        help_ = f"{f.get('doc') or ''} · default {f['default']!r}" + (
            f" ({f['source']})" if f.get("source") else "")
        label = knob_label(f)
        lo, hi = f.get("lo"), f.get("hi")
        with cols[i % columns]:
            if f.get("choices"):
                values[f["name"]] = st.selectbox(label, list(f["choices"]), key=key, help=help_,
                                                 disabled=disabled, persist_state="session")
            elif f["type"] == "bool":
                values[f["name"]] = st.toggle(label, key=key, help=help_, disabled=disabled,
                                              persist_state="session")
            elif f["type"] == "float" and lo is not None and hi is not None and hi - lo <= 10:
                values[f["name"]] = st.slider(label, float(lo), float(hi), key=key, help=help_,
                                              step=(hi - lo) / 100, disabled=disabled,
                                              persist_state="session")
            elif f["type"] in ("int", "float"):
                is_int = f["type"] == "int"
                conv = int if is_int else float
                values[f["name"]] = st.number_input(
                    label, min_value=None if lo is None else conv(lo),
                    max_value=None if hi is None else conv(hi), key=key, help=help_,
                    step=1 if is_int else None, format=None if is_int else "%g",
                    disabled=disabled, persist_state="session")
            else:
                values[f["name"]] = st.text_input(label, key=key, help=help_, disabled=disabled,
                                                  persist_state="session")
    return values


def page_job(kind: str, state_key: str,
             restore: Callable[[dict], None] | None = None) -> jobs.Job | None:
    """The job a job page shows: this session's (``session_state[state_key]``), else the one
    named in the URL (``?job=``, so a reload or a copied link reattaches) when it is of this
    ``kind``. Keeps its id in the URL. The first time a session shows a job, ``restore(params)``
    puts the job's settings back into the page's widget keys (call this before the widgets)."""
    job = jobs.get(st.session_state.get(state_key))
    if job is None or job.kind != kind:
        job = jobs.get(st.query_params.get(K.JOB_PARAM))
        if job is not None and job.kind != kind:
            job = None
    if job is None:
        st.session_state.pop(state_key, None)
        if K.JOB_PARAM in st.query_params:
            del st.query_params[K.JOB_PARAM]
        return None
    st.session_state[state_key] = job.id
    st.query_params[K.JOB_PARAM] = job.id
    if restore is not None and st.session_state.get(K.applied(kind)) != job.id:
        restore(job.params)
    st.session_state[K.applied(kind)] = job.id
    return job


def keep_job(state_key: str, job: jobs.Job) -> None:
    """Remember a job just started by this page (session and URL; its settings are the
    widgets' own, nothing to restore)."""
    st.session_state[state_key] = job.id
    st.session_state[K.applied(job.kind)] = job.id
    st.query_params[K.JOB_PARAM] = job.id


def drop_job(state_key: str) -> None:
    """Stop showing this page's job (it keeps running if it runs)."""
    st.session_state.pop(state_key, None)
    if K.JOB_PARAM in st.query_params:
        del st.query_params[K.JOB_PARAM]


#: While the CPU is contended, the ``head`` and ``slow`` parts of a live view poll this many
#: times less often (:func:`live`).
BUSY_SLOWDOWN = 4


@st.cache_resource(show_spinner=False)
def _feed_element():
    """Once per process: the live feed's folder registered with Streamlit's component file
    route, and the in-page element (:mod:`studio.feed`). Returns ``(url path of the folder,
    mount function)``, or None where no Streamlit server runs this process (AppTest) or the
    feed is turned off (``NRRDD_STUDIO_FEED=0``)."""
    from streamlit.runtime import Runtime, RuntimeState

    if not feed.enabled() or not Runtime.exists():
        return None
    # AppTest runs scripts under a stand-in runtime (no server, nothing is served); a real one
    # has a state of its own
    if not isinstance(Runtime.instance().state, RuntimeState):
        return None
    import streamlit.components.v1 as components_v1
    try:
        served = components_v1.declare_component("feed", path=str(feed.shared().root))
        mount = st.components.v2.component("nrrdd_live_feed", js=feed.JS, isolate_styles=False)
    except Exception as exc:  # noqa: BLE001 - the fragment view still works without it
        import logging
        logging.getLogger(__name__).warning("live feed unavailable: %s", exc)
        return None
    return f"component/{served.name}", mount


def feed_available() -> bool:
    """Whether pages can show a running job through the live feed (:mod:`studio.feed`)."""
    return _feed_element() is not None


def feed_view(job: jobs.Job, tile_px: int, every_ms: int = feed.STATE_POLL_MS) -> None:
    """The live feed's element for ``job``: its progress line and bar, the title of its latest
    picture and the picture, each image about ``tile_px`` wide (an integer multiple of its
    pixels), refreshed by the browser itself every ``every_ms`` ms (no script reruns). Makes the
    job's worker publish to the feed. Call only when :func:`feed_available`."""
    base, mount = _feed_element()
    out = job.feed = feed.shared()
    if out.state(job.id) is None:  # until the worker's next step publishes
        out.publish(job.id, feed.job_state(job, picture=0))
    mount(data={"base": f"{base}/{job.id}", "tile_px": int(tile_px), "every": int(every_ms),
                "format": feed.PICTURE_FORMAT,
                "color": st.get_option("theme.primaryColor") or "#2f6fdd"},
          key=K.live_feed(job.id))


def live(job_id: str | None, render: Callable[[jobs.Job | None], None],
         interval: float = 0.3, slow: Callable[[jobs.Job | None], None] | None = None,
         slow_interval: float = 1.5, head: Callable[[jobs.Job | None], None] | None = None,
         busy_interval: float = 1.5, head_interval: float | None = None,
         feed_render: Callable[[jobs.Job, bool], None] | None = None,
         picture_interval: float | None = None) -> None:
    """Draw ``render(job)`` in a fragment that re-runs every ``interval`` s while the job is
    active, then triggers one full rerun when it ends (so the rest of the page catches up).
    ``render`` must be cheap when nothing changed: it re-sends what the worker made (encoded
    images, numbers) and rebuilds anything costly only when the job's version changed.

    ``head(job)`` (above) and ``slow(job)`` (below), when given, are drawn in fragments of their
    own that re-run only every ``head_interval`` (default ``slow_interval``) and
    ``slow_interval`` s. The browser re-renders every element of a fragment on each of its
    runs (tens of ms of a core per metric, chart or table on a 2-core machine), so the fast
    fragment should hold only what changes several times a second (the progress bar and the
    live picture) and everything else belongs in ``head`` or ``slow``: that keeps the cost of
    watching a run small next to the run itself. Each run of the fast fragment stamps the
    job's ``polled`` time: a worker that draws makes one picture per poll, just before it
    (:func:`studio.runners.picture_due`).

    With ``feed_render(job, busy)`` and the live feed available (:func:`feed_available`), an
    active job is shown without the fast fragment: ``feed_render`` draws it once (e.g.
    :func:`feed_view`, which the browser refreshes by itself) and the worker makes a picture
    every ``picture_interval`` (default ``interval``) s; the ``head`` fragment then also notices
    the job's end and the machine's load.

    While the machine's CPU is contended (:func:`studio.pressure.busy`: other programs compete
    with the run) the fast fragment polls only every ``busy_interval`` s (with the feed: the
    worker makes a picture only that often) and says so, and ``head`` and ``slow``
    :data:`BUSY_SLOWDOWN` times less often: each redraw would come out of the run's share. The
    switch (either way) reruns the page once. The job's ``poll_interval`` tells its worker how
    often a picture can be shown."""
    job = jobs.get(job_id)
    was_active = job is not None and job.active
    adaptive = was_active and interval < busy_interval
    busy = adaptive and bool(st.session_state.get(K.LIVE_BUSY))
    every = (busy_interval if busy else interval) if was_active else None
    slowdown = BUSY_SLOWDOWN if busy else 1
    rarely = slow_interval * slowdown if was_active else None
    head_every = (head_interval or slow_interval) * slowdown if was_active else None
    fed = was_active and feed_render is not None and feed_available()
    if was_active:
        job.poll_interval = every  # the worker makes one picture per poll (Job.polled)
        if fed:  # no poll to time pictures by: one every `every` s, watched while head looks
            if not busy and picture_interval:
                job.poll_interval = picture_interval
            job.polled, job.watch_within = 0.0, 2 * head_every + 1.0

    def _watch(j: jobs.Job | None) -> None:
        """The end of the job (one full rerun) and the machine's load (the other rate)."""
        if busy:
            st.caption(f"Other programs are using the CPU: the picture is redrawn every "
                       f"{busy_interval:g} s so that the run keeps its share.")
        if was_active and j is not None and not j.active:
            st.rerun()
        if adaptive and pressure.busy(busy) != busy:
            st.session_state[K.LIVE_BUSY] = not busy
            st.rerun()  # the fragments again, at the other rate

    @st.fragment(run_every=head_every)
    def _poll_head() -> None:
        j = jobs.get(job_id)
        if head is not None:
            head(j)
        if fed:
            _watch(j)

    @st.fragment(run_every=rarely)
    def _poll_slow() -> None:
        slow(jobs.get(job_id))

    if head is not None or fed:
        _poll_head()

    @st.fragment(run_every=every)
    def _poll() -> None:
        j = jobs.get(job_id)
        if j is not None:
            j.polled = time.monotonic()  # the worker times its next picture from here
        render(j)
        _watch(j)

    if fed:
        feed_render(job, busy)
    else:
        _poll()
    if slow is not None:
        _poll_slow()


def job_status(view: dict, unit: str = "steps", rate: float | None = None) -> None:
    """Progress bar and status line of a job view (from :meth:`Job.view`): status, progress in
    ``unit``, working time (pauses left out) and, with ``rate`` (``unit`` per second), the
    estimated time left at that rate (:func:`studio.frames.progress_text`)."""
    st.progress(min(1.0, view["step"] / max(1, view["total"])),
                text=progress_text(view, unit, rate))
    if view["status"] == "error":
        st.error(f"The run failed: {view['error']}")
    elif view["status"] == "stopped":
        st.warning("Stopped on request; partial results are kept.")


def curves(history: list[dict], x: str, ys: list[str] | None = None, title: str = "",
           yaxis: str = "", log_y: bool = False) -> go.Figure:
    """A plotly line chart of ``history`` rows (dicts) with one line per numeric key."""
    # plotly's validators look pandas up in sys.modules: while a warm-up thread is importing it
    # they find a half-initialised module and fail. A real import waits for it to finish.
    import pandas  # noqa: F401
    import plotly.graph_objects as go

    ys = ys or sorted({k for r in history for k, v in r.items()
                       if k != x and isinstance(v, (int, float)) and not isinstance(v, bool)})
    fig = go.Figure()
    for k in ys:
        pts = [(r[x], r[k]) for r in history if k in r and r[k] is not None and math.isfinite(r[k])]
        if pts:
            xs, vs = zip(*pts)
            fig.add_trace(go.Scatter(x=xs, y=vs, mode="lines", name=k))
    fig.update_layout(title=title, height=300, margin=dict(l=10, r=10, t=40 if title else 10, b=10),
                      xaxis_title=x, yaxis_title=yaxis, legend=dict(orientation="h", y=-0.25))
    if log_y:
        fig.update_yaxes(type="log")
    return fig
