"""Refine live: run a method step by step and watch the images change."""

import importlib
import threading
import time

import streamlit as st

from nrrdd_core.errors import NrrddError
from nrrdd_core.export import default_runs_root, load_run, save_run
from nrrdd_core.methods import get_method, list_methods
from studio import diagnostics, feed, frames, jobs, reopen, runners, settings, warm, widgets
from studio import keys as K

#: Without the live feed (no Streamlit server, or NRRDD_STUDIO_FEED=0): seconds between two
#: polls of the live picture and the progress bar. The worker makes one picture for each poll,
#: just before it (studio.runners.picture_due): 2.4 new pictures per second, without polls that
#: find nothing new (each costs the browser a re-render).
POLL_INTERVAL = 0.4
#: Seconds between two pictures of the live feed (studio.feed: the browser fetches each new
#: picture by itself, without a script rerun): about 2.5 new pictures per second.
PICTURE_INTERVAL = 0.35
#: Seconds between two polls of the run's figures above the picture (phase, steps per second,
#: teacher confidence): costly for the browser to draw again (measured with the live feed on 2
#: cores: the figures every 1.5 s cost the browser about 0.03 of a core), and the progress
#: line above the picture already moves with every step.
HEAD_INTERVAL = 3.0
#: Seconds between two polls of the diagnostics table and the loss chart below the picture: the
#: worker renews the diagnostics at most every 6 s (studio.runners.SCORES_INTERVAL), and a vega
#: chart is the costliest element for the browser to draw again (both every 3 s: about 0.07 of
#: a core).
SLOW_INTERVAL = 6.0
METHOD_LABELS = {"nrrdd": "NRR-DD (CIDD + non-critical refinement)", "sre2l": "SRe2L (recover)",
                 "rded": "RDED (select real patches, no refinement)", "edf": "EDF (trajectory "
                 "matching + CPD + DAE)"}



@st.cache_resource(show_spinner=False)
def warm_optimiser() -> threading.Thread:
    """Once per process, in the background: the imports of a run's first optimiser step
    (:data:`studio.warm.BEFORE_A_RUN`), done while the user looks at the settings."""
    def work() -> None:
        for name in warm.BEFORE_A_RUN:
            importlib.import_module(name)

    thread = threading.Thread(target=work, name="nrrdd-warm-optimiser", daemon=True)
    thread.start()
    return thread


st.title("Refine live")
ctx = widgets.require_context()
warm_optimiser()

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
            previous = jobs.get(st.session_state.get(K.REFINE_JOB))
            if previous is None or not previous.active:  # its images and save box would
                widgets.drop_job(K.REFINE_JOB)          # show under the reopened run
            st.session_state.update(values)
            st.session_state[K.OPEN_RUN_APPLIED] = opened
        with st.expander(f"Reopened run **{run.name}** ({mf.get('method')}, "
                         f"{len(run.labels)} images) — its settings are loaded below",
                         expanded=True):
            widgets.class_rows(run.images01, run.labels, *reopen.run_classes(run),
                               px=st.session_state.get(K.TILE_PX, widgets.TILE_PX))
            if st.button("Close", key=K.CLOSE_RUN):
                del st.session_state[K.OPEN_RUN]
                st.rerun()

# ---- the job of this session (also found again from the URL after a reload, with its settings)


def restore(params: dict) -> None:
    """Put a job's settings back into the widgets (a reload or a new session on its URL)."""
    st.session_state.update(reopen.knob_values(params))  # method and config, as for a run
    if params.get("every"):
        st.session_state[K.REFINE_EVERY] = int(params["every"])


job = widgets.page_job("refine", K.REFINE_JOB, restore)
running = job is not None and job.active

# ---- method and knobs -----------------------------------------------------------------------
methods = [m for m in METHOD_LABELS if m in list_methods()] + \
    [m for m in list_methods() if m not in METHOD_LABELS]
if st.session_state.get(K.METHOD) not in methods:
    st.session_state[K.METHOD] = "nrrdd" if "nrrdd" in methods else methods[0]
c = st.columns([2, 1, 1])
method = c[0].selectbox("Method", methods, key=K.METHOD, format_func=lambda m: METHOD_LABELS.get(
    m, m), disabled=running, persist_state="session")
every = c[1].slider("Redraw every k steps", 1, 50, 1, key=K.REFINE_EVERY,
                    help="A new picture at most every k steps and about 2.5 times a second; "
                         "drawing never takes more than about 5 % of the run's time.",
                    disabled=running, persist_state="session")
c[2].slider("Image size on screen [px]", 32, 256, widgets.TILE_PX, 32, key=K.TILE_PX,
            help="Side of one image in the live view (shown an integer number of times "
                 "larger than its own pixels, no smoothing).", persist_state="session")
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

        job = jobs.start("refine", work, {"method": method, "config": cfg, "every": every})
        widgets.keep_job(K.REFINE_JOB, job)
        st.session_state.pop(K.OPEN_RUN, None)  # the new run replaces a reopened one
        st.rerun()
paused = job is not None and job.status == "paused"
b.button("Resume" if paused else "Pause", key=K.REFINE_PAUSE, disabled=not running,
         on_click=job.toggle_pause if running else None,
         icon=":material/play_arrow:" if paused else ":material/pause:")
b.button("Stop run", key=K.REFINE_STOP, disabled=not running,
            on_click=job.request_stop if running else None, icon=":material/stop:")


def plan_caption(params: dict, total: int) -> str:
    """What a step is: ``"124 steps = 24 selection + 100 refinement"``."""
    phases = params.get("phases") or {}
    if not phases:
        return f"{total} steps of {params.get('method', '')}."
    parts = " + ".join(f"{n} {name}" for name, n in phases.items())
    return (f"{total} steps = {parts}. A selection step scores one batch of real images "
            "(CIDD, METHODS.md §4.2); a refinement step is one optimiser update of every "
            "synthetic image (METHODS.md §4.3).")


def render_head(j: jobs.Job | None) -> None:
    """What a step is and the run's figures (phase, rate, teacher confidence, pictures drawn),
    refreshed every :data:`HEAD_INTERVAL` s."""
    if j is None:
        return
    v = j.view(history=False)
    tail = j.history_tail(20)
    rate = runners.steps_per_second(tail) if tail else float("nan")
    st.caption(plan_caption(v["params"], v["total"]))
    f = v["frame"]
    m = st.columns(4)
    m[0].metric("Phase", v["message"] or "–")
    m[1].metric("Steps per second", f"{rate:.1f}" if tail else "–",
                help="Mean over the last 20 steps (compute time of a step; pauses excluded).")
    m[2].metric("Teacher confidence", f"{100 * f['confidence']:.1f} %" if "confidence" in f
                else "–", help="Mean teacher probability of each image's label, at the "
                "last picture.")
    m[3].metric("Pictures drawn", v["frames"], help="Made by the run itself, about 2.5 per "
                "second and only while this page is open.")


def render(j: jobs.Job | None) -> None:
    """One poll (every :data:`POLL_INTERVAL` s): the progress bar and the live picture that
    the worker made, nothing else (each element costs the browser a re-render per poll)."""
    if j is None:
        st.info("Press **Start refinement** to run the method; the images are redrawn while "
                "it works.")
        return
    v = j.view(history=False)
    tail = j.history_tail(20)
    widgets.job_status(v, rate=runners.steps_per_second(tail) if tail else float("nan"))
    tile = int(st.session_state.get(K.TILE_PX, widgets.TILE_PX))
    for row in v["frame"].get("rows", []):
        st.caption(row["title"])
        st.image(frames.encoded(row), width=row["width"] * max(1, round(tile / row["tile"])),
                 output_format="PNG")


def render_feed(j: jobs.Job, busy: bool) -> None:
    """A running job through the live feed: the progress bar and the live picture, refreshed by
    the browser itself (no script reruns; its state every second while the CPU is contended)."""
    tile = int(st.session_state.get(K.TILE_PX, widgets.TILE_PX))
    widgets.feed_view(j, tile, every_ms=4 * feed.STATE_POLL_MS if busy else feed.STATE_POLL_MS)


def render_slow(j: jobs.Job | None) -> None:
    """The parts a browser needs long to draw again (diagnostics table, loss chart), polled
    every :data:`SLOW_INTERVAL` s."""
    if j is None:
        return
    v = j.view(history=False)
    diagnostics.show(v["frame"].get("diagnostics"))
    data = loss_data(j, v["history_len"])
    if data is not None:
        st.vega_lite_chart(data[1], data[0], key=K.LOSS_CHART)


def loss_data(j: jobs.Job, n: int):
    """``(vega-lite spec, long table)`` of the loss terms of the current phase against the step
    within the phase (0 = its first step, e.g. the first refinement step), on a log scale.
    Rebuilt when new steps arrived (this runs in the slow fragment, so at most every
    :data:`SLOW_INTERVAL` s); else the cached one is sent again (a few kB of Arrow)."""
    import pandas as pd

    cached = st.session_state.get(K.LOSS_FIG)
    if cached is not None and cached[0] == j.id and cached[1] == n:
        return cached[2]
    hist = j.history_tail(n) if n else []
    data = None
    if hist:
        phase = hist[-1]["phase"]
        rows = [r for r in hist if r["phase"] == phase]
        rows = rows[::max(1, len(rows) // 400)] + ([rows[-1]] if len(rows) > 400 else [])
        terms = [k for k in hist[-1] if k not in ("step", "phase", "phase_step", "seconds")]
        table = pd.DataFrame([{"step": r.get("phase_step", r["step"]), "term": k, "value": r[k]}
                              for r in rows for k in terms
                              if isinstance(r.get(k), (int, float)) and r[k] > 0])
        spec = {
            "title": f"Loss terms of the {phase} phase (step 0 = its first step)",
            "height": 280, "mark": {"type": "line", "interpolate": "linear"},
            "encoding": {
                "x": {"field": "step", "type": "quantitative", "title": f"{phase} step",
                      "axis": {"format": "d", "tickMinStep": 1}},
                "y": {"field": "value", "type": "quantitative", "title": "value (log scale)",
                      "scale": {"type": "log"}, "axis": {"format": "~g"}},
                "color": {"field": "term", "type": "nominal", "title": "term"}}}
        data = (spec, table) if len(table) else None
    st.session_state[K.LOSS_FIG] = (j.id, n, data)
    return data


widgets.live(job.id if job else None, render, interval=POLL_INTERVAL, head=render_head,
             head_interval=HEAD_INTERVAL, slow=render_slow, slow_interval=SLOW_INTERVAL,
             feed_render=render_feed, picture_interval=PICTURE_INTERVAL)

# ---- save the result ------------------------------------------------------------------------
if job is not None and not job.active and job.result is not None:
    res = job.result
    st.subheader("Save this run")
    default = (f"{job.params.get('method', method)}_{ctx.bundle.config.name}_ipc{ctx.setup.ipc}_"
               f"{time.strftime('%m%d-%H%M%S', time.localtime(job.started))}")
    c = st.columns([3, 1, 1], vertical_alignment="bottom")
    name = c[0].text_input("Run name", value=default, key=K.RUN_NAME)
    if job.film:
        c[2].download_button("Animation (GIF)", data=lambda film=list(job.film): frames.gif(film),
                             file_name=f"{default}.gif", mime="image/gif", key=K.REFINE_GIF,
                             icon=":material/movie:", help=f"The {len(job.film)} pictures "
                             "drawn during the run, for slides.")
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
