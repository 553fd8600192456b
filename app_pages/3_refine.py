"""Refine live: run a method step by step and watch the images change."""

import time

import numpy as np
import streamlit as st

from nrrdd_core.errors import NrrddError
from nrrdd_core.export import default_runs_root, load_run, save_run
from nrrdd_core.methods import get_method, list_methods
from studio import jobs, reopen, runners, settings, widgets
from studio import keys as K

PX = 64
#: Seconds between two redraws of the loss chart during a run.
CHART_INTERVAL = 2.0
METHOD_LABELS = {"nrrdd": "NRR-DD (CIDD + non-critical refinement)", "sre2l": "SRe2L (recover)",
                 "rded": "RDED (select real patches, no refinement)", "edf": "EDF (trajectory "
                 "matching + CPD + DAE)"}

st.title("Refine live")
ctx = widgets.require_context()

# ---- a run reopened from the Runs page: show it and load its settings into the knobs ---------
opened = st.session_state.get(K.OPEN_RUN)
if opened:
    try:
        run = load_run(opened)
    except NrrddError as exc:
        st.error(f"Cannot reopen {opened}: {exc}")
        run = None
    if run is not None:
        mf = run.manifest
        values = reopen.knob_values(mf)
        if st.session_state.get(K.OPEN_RUN_APPLIED) != opened and values:
            st.session_state.update(values)
            st.session_state[K.OPEN_RUN_APPLIED] = opened
        with st.expander(f"Reopened run **{run.name}** ({mf.get('method')}, "
                         f"{len(run.labels)} images) — its settings are loaded below",
                         expanded=True):
            widgets.class_rows(run.images01, run.labels, *reopen.run_classes(run), px=PX)
            if st.button("Close", key=K.CLOSE_RUN):
                del st.session_state[K.OPEN_RUN]
                st.rerun()

# ---- the job of this session (also found again from the URL after a refresh) ---------------
if not st.session_state.get(K.REFINE_JOB) and K.JOB_PARAM in st.query_params:
    st.session_state[K.REFINE_JOB] = st.query_params[K.JOB_PARAM]
job = jobs.get(st.session_state.get(K.REFINE_JOB))
running = job is not None and job.active

# ---- method and knobs -----------------------------------------------------------------------
methods = [m for m in METHOD_LABELS if m in list_methods()] + \
    [m for m in list_methods() if m not in METHOD_LABELS]
if st.session_state.get(K.METHOD) not in methods:
    st.session_state[K.METHOD] = "nrrdd" if "nrrdd" in methods else methods[0]
c = st.columns([2, 1])
method = c[0].selectbox("Method", methods, key=K.METHOD, format_func=lambda m: METHOD_LABELS.get(
    m, m), disabled=running, persist_state="session")
every = c[1].slider("Redraw every k steps", 1, 50, 1, key=K.REFINE_EVERY,
                    help="The page polls about 3 times a second; the images change at most "
                         "that often.",
                    persist_state="session")
fields = get_method(method).Config.describe()
with st.expander(f"Settings of {METHOD_LABELS.get(method, method)} — defaults from the papers",
                 expanded=job is None):
    values = widgets.config_knobs(method, fields, settings.method_overrides(fields),
                                  disabled=running)
    if settings.tiny():
        st.caption("Tiny mode (NRRDD_STUDIO_TINY=1): step counts are shortened.")

# ---- controls -------------------------------------------------------------------------------
b = st.container(horizontal=True)
if b.button("Start refinement", key=K.REFINE_START, type="primary", disabled=running,
               icon=":material/play_arrow:"):
    try:
        cfg = get_method(method).Config.from_dict(values).to_dict()
    except NrrddError as exc:
        st.error(f"Invalid settings: {exc}")
    else:
        def work(j, method=method, cfg=cfg, ctx=ctx, every=every):
            return runners.distill(j, method, cfg, ctx.teacher, ctx.bundle, ctx.classes,
                                   ctx.setup, every=every)

        job = jobs.start("refine", work, {"method": method, "config": cfg})
        st.session_state[K.REFINE_JOB] = job.id
        st.query_params[K.JOB_PARAM] = job.id
        st.rerun()
paused = job is not None and job.status == "paused"
b.button("Resume" if paused else "Pause", key=K.REFINE_PAUSE, disabled=not running,
            on_click=job.toggle_pause if running else None, icon=":material/pause:")
b.button("Stop run", key=K.REFINE_STOP, disabled=not running,
            on_click=job.request_stop if running else None, icon=":material/stop:")


def scaled(a: np.ndarray) -> np.ndarray:
    return a / max(float(a.max()), 1e-8)


def image_rows(j: jobs.Job, v: dict) -> list[tuple[str, bytes, int]]:
    """The latest frame as one PNG per row kind (current, initial, mask, change; a
    :func:`widgets.mosaic` each), with its display width; encoded once per frame (the fragment
    polls more often than frames arrive; unchanged bytes keep their URLs, so nothing reloads)."""
    key = (j.id, v["frames"])
    cached = st.session_state.get(K.REFINE_ROWS)
    if cached is not None and cached[0] == key:
        return cached[1]
    f = v["frame"]
    rows = []
    if "images" in f and len(f["images"]):
        labels = f["labels"].tolist()
        cols, where = widgets.mosaic_layout(labels, ctx.bundle.config.class_names)
        rows.append((f"Current images ({where})", [widgets.to_hwc(x) for x in f["images"]]))
        if "initial" in f:
            rows.append(("Initial images x̃₀", [widgets.to_hwc(x) for x in f["initial"]]))
        if "mask" in f:
            mk = scaled(f["mask"][:, 0].numpy())
            rows.append(("Mask: update weight (white = free, black = critical, frozen)",
                         [widgets.to_hwc(x) for x in mk]))
        if "change" in f:
            ch = f["change"].numpy()
            rows.append((f"Change since the start (brightest = {ch.max():.3f} in [0,1] pixels)",
                         [widgets.heat(x) for x in scaled(ch)]))
        rows = [(title, widgets.png(m := widgets.mosaic(imgs, cols)),
                 m.shape[1] * max(1, round(PX / imgs[0].shape[1]))) for title, imgs in rows]
    st.session_state[K.REFINE_ROWS] = (key, rows)
    return rows


def render(j: jobs.Job | None) -> None:
    if j is None:
        st.info("Press **Start refinement** to run the method; the images are redrawn while "
                "it works.")
        return
    v = j.view()
    widgets.job_status(v)
    f, hist = v["frame"], v["history"]
    m = st.columns(4)
    m[0].metric("Phase", v["message"] or "–")
    m[1].metric("Steps per second", f"{runners.steps_per_second(hist):.1f}" if hist else "–")
    m[2].metric("Teacher confidence", f"{100 * f['confidence']:.1f} %" if "confidence" in f
                else "–", help="Mean teacher probability of each image's label.")
    m[3].metric("Frames drawn", v["frames"])
    for title, png, width in image_rows(j, v):
        st.caption(title)
        st.image(png, width=width, output_format="PNG")
    fig = loss_figure(j, hist)
    if fig is not None:
        st.plotly_chart(fig, key=K.LOSS_CHART)


def loss_figure(j: jobs.Job, hist: list[dict]):
    """The loss terms of the current phase, rebuilt at most once per
    :data:`CHART_INTERVAL` s while the job runs (a changed chart costs the browser a replot,
    far more than the images; an unchanged one is sent again as is)."""
    cached = st.session_state.get(K.LOSS_FIG)
    if cached is not None and cached[0] == j.id and (
            time.monotonic() - cached[1] < CHART_INTERVAL and j.active):
        return cached[2]
    fig = None
    if hist:
        phase = [r for r in hist if r["phase"] == hist[-1]["phase"]]
        phase = phase[::max(1, len(phase) // 400)]
        fig = widgets.curves(phase, "step", [k for k in hist[-1] if k not in (
            "step", "phase", "seconds")], title=f"Loss terms ({hist[-1]['phase']})", log_y=True)
    st.session_state[K.LOSS_FIG] = (j.id, time.monotonic(), fig)
    return fig


widgets.live(job.id if job else None, render, interval=0.3)

# ---- save the result ------------------------------------------------------------------------
if job is not None and not job.active and job.result is not None:
    res = job.result
    st.subheader("Save this run")
    default = f"{method}_{ctx.bundle.config.name}_ipc{ctx.setup.ipc}_{time.strftime('%m%d-%H%M%S')}"
    c = st.columns([3, 1], vertical_alignment="bottom")
    name = c[0].text_input("Run name", value=default, key=K.RUN_NAME)
    if c[1].button("Save run", key=K.SAVE_RUN, icon=":material/save:"):
        try:
            path = save_run(default_runs_root(), name, res["images"], res["labels"],
                            res["manifest"], extras=res.get("extras"))
        except NrrddError as exc:
            st.error(f"Not saved: {exc}")
        else:
            st.success(f"Saved to {path}.")
            st.page_link("app_pages/6_runs.py", label="Open the Runs page",
                         icon=":material/folder_open:")
