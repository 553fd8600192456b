"""Evaluate: train a student on saved runs and compare with the published figures."""

import pandas as pd
import streamlit as st

from nrrdd_core.evaluate import EvalConfig
from nrrdd_core.evaluate.edf import RUN_EXTRAS
from nrrdd_core.export import default_runs_root, list_runs
from nrrdd_core.models import list_models
from studio import jobs, runners, settings, widgets
from studio import keys as K

PERSIST = {"persist_state": "session"}
#: Seconds between two polls of the accuracy curves and the results table during an evaluation.
RESULTS_INTERVAL = 3.0
LABEL_MODES = {"soft": "soft labels (teacher, per batch)", "dbr": "DBR distances (2 numbers "
               "per image)", "hard": "hard one-hot labels"}
PROTOCOL_NAMES = {"kd": "KD (METHODS.md §1.4)", "edf": "EDF (METHODS.md §5.6)"}
PROTOCOLS = {"kd": f"{PROTOCOL_NAMES['kd']}: student distilled from the teacher's labels",
             "edf": f"{PROTOCOL_NAMES['edf']}: ConvNet-IN on the run's learned labels and lr"}


def has_edf_extras(manifest: dict) -> bool:
    """True when a saved run carries EDF's extras (learned labels, lr...), kept by ``save_run``."""
    names = {**(manifest.get("extras") or {}), **(manifest.get("extra_tensors") or {})}
    return any(k in names for k in RUN_EXTRAS)


st.title("Evaluate")
ctx = widgets.require_context()
st.write("Train a fresh student on each chosen distilled set and test it on the real test split: "
         "with the KD protocol of RDED (docs/METHODS.md §1.4), or for EDF runs also with EDF's own "
         "protocol (docs/METHODS.md §5.6). Results are stored in each run's folder.")

here = ctx.bundle.config.name


def dataset_of(info) -> str:
    return (info.manifest.get("dataset") or {}).get("name", "?")


# the current dataset's runs first, newest first within each group
infos = sorted(list_runs(default_runs_root()), key=lambda r: r.manifest.get("created", ""),
               reverse=True)
infos = [r for r in infos if dataset_of(r) == here] + [r for r in infos if dataset_of(r) != here]
runs = {r.name: str(r.path) for r in infos}
run_dataset = {r.name: dataset_of(r) for r in infos}
if not runs:
    st.info("No saved runs yet: save one on **Refine live** or **Compare**.")
    st.page_link("app_pages/3_refine.py", label="Go to Refine live",
                 icon=":material/auto_fix_high:")
    st.stop()


def restore(params: dict) -> None:
    """Put an evaluation's settings back into the widgets (a reload or a new session)."""
    for key, name in ((K.EVAL_RUNS, "runs"), (K.EVAL_PROTOCOL, "protocol"),
                      (K.EVAL_STUDENT, "student"), (K.EVAL_LABELS, "label_mode"),
                      (K.EVAL_EPOCHS, "epochs")):
        if name in params:
            st.session_state[key] = params[name]


job = widgets.page_job("evaluate", K.EVAL_JOB, restore)
running = job is not None and job.active

st.session_state[K.EVAL_RUNS] = [r for r in st.session_state.get(K.EVAL_RUNS, list(runs)[:1])
                                 if r in runs]  # default: the newest run of this dataset
chosen = st.multiselect("Runs", list(runs), key=K.EVAL_RUNS, disabled=running,
                        format_func=lambda n: n if run_dataset[n] == here else
                        f"{n} (other dataset: {run_dataset[n]})",
                        placeholder="choose one or more saved runs", **PERSIST)
manifests = {r.name: r.manifest for r in infos}
edf_ok = bool(chosen) and all(has_edf_extras(manifests[n]) for n in chosen)
offered = ["kd", "edf"] if edf_ok else ["kd"]
if st.session_state.get(K.EVAL_PROTOCOL) not in offered:
    st.session_state[K.EVAL_PROTOCOL] = offered[-1]  # EDF runs default to their own protocol
protocol = st.radio("Protocol", offered, key=K.EVAL_PROTOCOL, format_func=PROTOCOLS.get,
                    horizontal=True, disabled=running,
                    help="EDF's protocol is offered when every chosen run was distilled by EDF "
                         "and saved with its learned labels.")
edf = protocol == "edf"
defaults = {f["name"]: f for f in EvalConfig.describe()}
c = st.columns(3)
students = list_models()
if st.session_state.get(K.EVAL_STUDENT) not in students:
    st.session_state[K.EVAL_STUDENT] = defaults["student"]["default"]
student = c[0].selectbox("Student", students, key=K.EVAL_STUDENT, disabled=running or edf,
                         help="EDF's protocol trains the run's own ConvNet-IN." if edf else None,
                         **PERSIST)
label_mode = c[1].radio("Labels", list(LABEL_MODES), key=K.EVAL_LABELS, disabled=running or edf,
                        format_func=LABEL_MODES.get, help="EDF's protocol uses the run's learned "
                        "labels." if edf else None, **PERSIST)
if K.EVAL_EPOCHS not in st.session_state:
    st.session_state[K.EVAL_EPOCHS] = 1 if settings.tiny() else 30
epochs = c[2].number_input("Epochs", 1, 5000, key=K.EVAL_EPOCHS, disabled=running,
                           help="The published figures use 300 epochs (KD, METHODS.md §1.4) or 1000 "
                                "(EDF, METHODS.md §5.6); fewer give a lower but quick estimate.",
                           **PERSIST)
b = st.container(horizontal=True)
if b.button("Start evaluation", key=K.EVAL_START, type="primary",
               disabled=running or not chosen, icon=":material/play_arrow:"):
    cfg = {"protocol": protocol, "student": student, "label_mode": label_mode,
           "epochs": int(epochs), "eval_every": max(1, int(epochs) // 20)}

    def work(j, paths=[runs[n] for n in chosen], cfg=cfg, ctx=ctx):
        return runners.evaluate_runs(j, paths, ctx.teacher, ctx.bundle, cfg, ctx.setup)

    job = jobs.start("evaluate", work, {**cfg, "runs": list(chosen)})
    widgets.keep_job(K.EVAL_JOB, job)
    st.rerun()
b.button("Stop evaluation", key=K.EVAL_STOP, disabled=not running,
            on_click=job.request_stop if running else None, icon=":material/stop:")


def render_status(j: jobs.Job | None) -> None:
    """The progress bar, every second."""
    if j is not None:
        widgets.job_status(j.view(history=False), "epochs")


def render(j: jobs.Job | None) -> None:
    """The accuracy curves and the results table, every :data:`RESULTS_INTERVAL` s (costly for
    the browser to draw again)."""
    if j is None:
        return
    v = j.view()
    hist = v["history"]
    if hist:
        fig = widgets.curves([], "epoch", title="Student test accuracy", yaxis="top-1 %")
        for name in dict.fromkeys(r["run"] for r in hist):
            pts = [(r["epoch"], 100 * r["acc"]) for r in hist if r["run"] == name and "acc" in r]
            if pts:
                fig.add_scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers",
                                name=name)
        fig.update_yaxes(range=[0, 100])
        st.plotly_chart(fig, key=K.EVAL_CHART)
    rows = v["result"] if v["result"] is not None else v["frame"].get("rows", [])
    if rows:
        used = v["params"].get("protocol", "kd")
        st.markdown(f"**Results — {PROTOCOL_NAMES[used]} protocol**")
        st.dataframe(pd.DataFrame(rows), hide_index=True, column_config={
            "final_acc": st.column_config.NumberColumn("final top-1 %", format="%.2f"),
            "best_acc": st.column_config.NumberColumn("best top-1 %", format="%.2f"),
            "published": st.column_config.NumberColumn("published % (METHODS.md §6)", format="%.1f"),
            "seconds": st.column_config.NumberColumn("time s", format="%.1f")})
        st.caption("The published figure appears where the setting (method, dataset, IPC, "
                   f"student family, all classes) matches METHODS.md §6; settings: "
                   f"{v['params']}.")


widgets.live(job.id if job else None, render_status, interval=1.0, slow=render,
             slow_interval=RESULTS_INTERVAL)
