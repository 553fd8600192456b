"""Compare: every method on the same classes, teacher and seed, beside a random real subset."""

import time

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
import torch

from nrrdd_core.errors import NrrddError
from nrrdd_core.evaluate import EvalConfig
from nrrdd_core.export import build_manifest, default_runs_root, save_run
from nrrdd_core.methods import list_methods
from studio import cache, diagnostics, frames, jobs, runners, settings, widgets
from studio import keys as K

#: Seconds between two polls while a comparison runs (its results arrive one set at a time).
POLL_INTERVAL = 1.0
#: Seconds between two polls of the results grid, table and chart during a comparison.
RESULTS_INTERVAL = 3.0
#: Side of one image in the grid [px] (the cells are narrow).
CELL_PX = 64
LABELS = {"random": "random real", "sre2l": "SRe2L", "rded": "RDED", "nrrdd": "NRR-DD",
          "edf": "EDF"}

st.title("Compare")
ctx = widgets.require_context()
st.write("Distil the chosen classes with every method (published defaults, the same teacher and "
         "seed) and put them beside a random real subset of the same size: the baseline every "
         "distilled set must beat.")



def restore(params: dict) -> None:
    """Put a comparison's settings back into the widgets (a reload or a new session)."""
    for key, name in ((K.COMPARE_METHODS, "methods"), (K.COMPARE_EPOCHS, "epochs"),
                      (K.COMPARE_RECOMPUTE, "recompute"), (K.COMPARE_BUDGET, "budget")):
        if name in params:
            st.session_state[key] = params[name]


job = widgets.page_job("compare", K.COMPARE_JOB, restore)
running = job is not None and job.active
available = [m for m in LABELS if m in list_methods()] + \
    [m for m in list_methods() if m not in LABELS]
st.session_state[K.COMPARE_METHODS] = [m for m in st.session_state.get(
    K.COMPARE_METHODS, available) if m in available]
methods = st.multiselect("Methods", available, key=K.COMPARE_METHODS, disabled=running,
                         format_func=lambda m: LABELS.get(m, m), persist_state="session")


def budget_changed() -> None:
    """A budget preset also sets its student epochs (1 in tiny mode)."""
    st.session_state[K.COMPARE_EPOCHS] = 1 if settings.tiny() else \
        runners.BUDGETS[st.session_state[K.COMPARE_BUDGET]][1]


budget = st.radio("Budget", list(runners.BUDGETS), key=K.COMPARE_BUDGET, horizontal=True,
                  index=0, disabled=running, on_change=budget_changed,
                  format_func=lambda b: f"{b} ({runners.BUDGETS[b][0]:.0%} of the published "
                  f"steps, {runners.BUDGETS[b][1]} student epochs)", persist_state="session",
                  help="The share of each method's published optimisation steps and candidate "
                       "images per class, and the student epochs of the quick check.")
share = runners.BUDGETS[budget][0]
estimate = runners.compare_estimate(cache.compare_store(), ctx.setup, ctx.classes, methods, share)
st.caption("Estimated time: " + (f"about {widgets.duration(estimate)} (from earlier runs of "
                                 "these methods on this setup)" if estimate else
                                 "known after a first run of these methods on this setup."))
c = st.columns([1, 1, 2], vertical_alignment="bottom")
b = c[2].container(horizontal=True)
if K.COMPARE_EPOCHS not in st.session_state:
    budget_changed()
epochs = c[0].number_input("Student epochs (quick check)", 1, 300, key=K.COMPARE_EPOCHS,
                           help="METHODS.md §1.4 trains 300 epochs; a few give a quick ranking.",
                           persist_state="session")
recompute = c[1].toggle("Recompute", key=K.COMPARE_RECOMPUTE,
                        help="Off: reuse results of the same setup computed earlier.")
if b.button("Run comparison", key=K.COMPARE_START, type="primary", disabled=running,
               icon=":material/play_arrow:"):
    eval_cfg = {"epochs": int(epochs)}

    def work(j, ctx=ctx, eval_cfg=eval_cfg, recompute=recompute, methods=methods, share=share):
        return runners.compare(j, methods, ctx.teacher, ctx.bundle, ctx.classes, ctx.setup,
                               eval_cfg, cache.compare_store(), recompute, budget=share)

    job = jobs.start("compare", work, {"epochs": int(epochs), "methods": list(methods),
                                       "recompute": bool(recompute), "budget": budget})
    widgets.keep_job(K.COMPARE_JOB, job)
    st.rerun()
b.button("Stop comparison", key=K.COMPARE_STOP, disabled=not running,
            on_click=job.request_stop if running else None, icon=":material/stop:")
st.caption(f"Student: {EvalConfig().student}, soft labels, CutMix (METHODS.md §1.4) · "
           f"{len(ctx.classes)} class{'es' if len(ctx.classes) > 1 else ''} × IPC {ctx.setup.ipc}")


def cell_png(j: jobs.Job | None, name: str, title: str, r: dict, sel: list[int]):
    """One class's images of one set as a PNG strip and its display width (encoded once per job,
    set and row: a poll re-sends the same bytes)."""
    cells = st.session_state.setdefault(K.COMPARE_CELLS, {})
    key = (j.id if j is not None else None, name, title, len(r["labels"]))
    if key not in cells:
        m = widgets.mosaic([widgets.to_hwc(r["images"][i]) for i in sel], cols=len(sel))
        side = r["images"].shape[-1]
        cells[key] = (widgets.png(m), m.shape[1] * max(1, round(CELL_PX / side)))
    return cells[key]


def render_status(j: jobs.Job | None) -> None:
    """The progress bar, every :data:`POLL_INTERVAL` s."""
    if j is not None:
        widgets.job_status(j.view(history=False), "sets")


def render(j: jobs.Job | None) -> None:
    """The grid, the table and the chart: they change once per finished set, so they are
    polled only every :data:`RESULTS_INTERVAL` s (costly for the browser to draw again)."""
    v = j.view(history=False) if j is not None else None
    results = (v["result"] or v["frame"].get("results", {})) if v else {}
    columns = ["random"] + (list(v["params"].get("methods", methods)) if v else methods)
    # side by side: rows = classes, columns = methods + the random real baseline
    head = st.columns([1] + [2] * len(columns))
    head[0].markdown("**class**")
    for col, name in zip(head[1:], columns):
        r = results.get(name)
        note = ("reused" if r.get("reused") else f"{r['seconds']:.1f} s") if r else "not run yet"
        col.markdown(f"**{LABELS.get(name, name)}**  \n{note}")
    chosen = torch.tensor(ctx.classes)
    rows = [(ctx.bundle.config.class_names[c_], lambda y, c_=c_: y == c_) for c_ in ctx.classes]
    if any(not torch.isin(r["labels"], chosen).all() for r in results.values()):
        rows.append(("other label (learned)", lambda y: ~torch.isin(y, chosen)))
    for title, match in rows:
        row = st.columns([1] + [2] * len(columns), vertical_alignment="center")
        row[0].markdown(title)
        for col, name in zip(row[1:], columns):
            r = results.get(name)
            sel = match(r["labels"]).nonzero().flatten().tolist() if r is not None else []
            if sel:
                with col:
                    png, width = cell_png(j, name, title, r, sel)
                    st.image(png, width=width, output_format="PNG")
    if not results:
        return
    table = pd.DataFrame([{
        "set": LABELS.get(n, n), "teacher acc %": 100 * r["teacher_acc"],
        "teacher conf %": 100 * r["teacher_conf"], "CAM area %": 100 * r["cam_area"],
        "diversity": r["diversity"], "time s": r["seconds"],
        "soft labels MB (300 ep)": r["label_bytes"]["soft"] / 1e6,
        "DBR labels MB (300 ep)": r["label_bytes"]["dbr"] / 1e6,
        "student acc %": 100 * r["student_acc"], **diagnostics.table_columns(r)}
        for n, r in results.items()])
    st.dataframe(table, hide_index=True, column_config={
        k: st.column_config.NumberColumn(format="%.2f") for k in table.columns
        if k not in ("set", "warning")})
    st.caption("Teacher accuracy / confidence on the synthetic images; CAM area = share of "
               "pixels with CAM ≥ 0.5; diversity = mean pairwise distance of the teacher's "
               "pooled CAM-layer features within a class (across all the set's images at IPC 1; "
               "empty for a single image); label storage by the METHODS.md §4.4 arithmetic. "
               "Teacher / independent agrees = share of images whose top-1 class is their label, "
               "for the teacher and for a second network trained on the same data (METHODS.md "
               "§4.6): refinement that raises only the teacher's fools it; mean change = mean "
               "|x - x̃₀| of NRR-DD's refinement.")
    for n, r in results.items():
        if (r.get("diagnostics") or {}).get("warning"):
            st.warning(f"{LABELS.get(n, n)}: {r['diagnostics']['warning']}",
                       icon=":material/warning:")
    first = next(iter(results.values()))
    chance = 100 * first.get("chance", 1 / len(ctx.classes))
    steps = {r.get("opt_steps") for r in results.values() if r.get("opt_steps") is not None}
    fig = go.Figure(go.Bar(x=table["set"], y=table["student acc %"],
                           text=[f"{a:.1f}" for a in table["student acc %"]]))
    fig.add_hline(y=chance, line_dash="dash", annotation_text=f"chance {chance:.1f} %")
    fig.update_layout(height=300, yaxis_title="student top-1 %",
                      margin=dict(l=10, r=10, t=30, b=10),
                      title=f"Quick student evaluation ({v['params'].get('epochs')} epochs, "
                            f"{', '.join(map(str, sorted(steps))) or '?'} optimiser steps)")
    st.plotly_chart(fig, key=K.COMPARE_CHART)
    st.caption(f"Chance level: {chance:.1f} % ({len(ctx.classes)} classes). Optimiser steps of "
               f"the student: {', '.join(map(str, sorted(steps))) or '?'} (epochs × batches).")
    if any(r.get("too_short") for r in results.values()):
        st.warning(f"This check is too short to rank anything: fewer than "
                   f"{runners.MIN_RANKING_STEPS} optimiser steps, so the accuracies sit near "
                   f"chance ({chance:.1f} %) whatever the set. Raise the student epochs, or use "
                   "the Evaluate page's full protocol.", icon=":material/warning:")


widgets.live(job.id if job else None, render_status, interval=POLL_INTERVAL, slow=render,
             slow_interval=RESULTS_INTERVAL)

if job is not None and not job.active and job.result:
    sets = [(LABELS.get(n, n), r["images"], r["labels"]) for n, r in job.result.items()]
    st.download_button("Grid as a figure (PNG)", key=K.COMPARE_FIGURE, mime="image/png",
                       data=lambda sets=sets: frames.grid_figure(
                           sets, ctx.classes, ctx.bundle.config.class_names),
                       file_name=f"compare_{ctx.bundle.config.name}_ipc{ctx.setup.ipc}.png",
                       icon=":material/image:", help="Every set side by side, one row per "
                       "class, for slides.")
    if st.button("Save the distilled sets as runs", key=K.COMPARE_SAVE, icon=":material/save:"):
        stamp = time.strftime("%m%d-%H%M%S")
        for name, r in job.result.items():
            manifest = r.get("manifest")
            if manifest is None:  # the random real subset: a run too (the baseline to beat)
                manifest = build_manifest(
                    method="random_real", config={"seed": ctx.setup.seed}, teacher=ctx.teacher,
                    bundle=ctx.bundle, classes=ctx.classes, ipc=ctx.setup.ipc,
                    seed=ctx.setup.seed, dataset_args=dict(ctx.setup.dataset_kwargs))
            try:
                path = save_run(default_runs_root(), f"compare_{name}_{ctx.bundle.config.name}_"
                                f"ipc{ctx.setup.ipc}_{stamp}", r["images"], r["labels"],
                                manifest, extras=r.get("extras"))
                st.success(f"Saved {path}")
            except NrrddError as exc:
                st.error(f"{name}: not saved: {exc}")
