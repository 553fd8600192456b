"""Runs: saved distilled sets with their manifests; download, delete, reopen."""

import pandas as pd
import streamlit as st

from nrrdd_core.errors import NrrddError
from nrrdd_core.export import default_runs_root, delete_run, list_evals, list_runs, load_run, \
    zip_run
from studio import widgets
from studio import keys as K

st.title("Runs")
root = default_runs_root()
runs = list_runs(root)
st.write(f"Distilled sets saved under `{root}` (set `NRRDD_RUNS` to use another folder).")
if not runs:
    st.info("No saved runs yet: save one on **Refine live** or **Compare**.")
    st.page_link("app_pages/3_refine.py", label="Go to Refine live",
                 icon=":material/auto_fix_high:")
    st.stop()


def summary(mf: dict) -> dict:
    ds = mf.get("dataset", {})
    return {"method": mf.get("method"), "dataset": ds.get("name"),
            "classes": len(ds.get("classes", [])),
            "IPC": mf.get("ipc"), "images": mf.get("num_images"), "seed": mf.get("seed"),
            "complete": mf.get("complete", True), "seconds": mf.get("timings", {}).get("seconds"),
            "created": mf.get("created")}


st.dataframe(pd.DataFrame([{"run": r.name, **summary(r.manifest)} for r in runs]),
             hide_index=True,
             column_config={"seconds": st.column_config.NumberColumn(format="%.1f")})

for i, r in enumerate(runs):
    with st.expander(f"**{r.name}** · {r.manifest.get('method')} · "
                     f"{r.manifest.get('num_images')} images", expanded=i == 0):
        try:
            run = load_run(r.path)
        except NrrddError as exc:
            st.error(f"Cannot read this run: {exc}")
            continue
        names = r.manifest["dataset"]["all_class_names"]
        classes = sorted(set(run.labels.tolist()))
        widgets.class_rows(run.images01, run.labels, classes, [names[c] for c in classes], px=48)
        b = st.container(horizontal=True)
        b.download_button("Download zip", data=lambda p=r.path: zip_run(p),
                             file_name=f"{r.name}.zip", mime="application/zip",
                             key=K.run_key("zip", r.name), icon=":material/download:")
        if b.button("Open in Refine", key=K.run_key("refine", r.name),
                       icon=":material/auto_fix_high:"):
            st.session_state[K.OPEN_RUN] = str(r.path)
            st.switch_page("app_pages/3_refine.py")
        if b.button("Evaluate", key=K.run_key("eval", r.name), icon=":material/school:"):
            st.session_state[K.EVAL_RUNS] = [r.name]
            st.switch_page("app_pages/5_evaluate.py")
        with b.popover("Delete", icon=":material/delete:"):
            st.write(f"Delete `{r.path}` and everything in it?")
            if st.button("Yes, delete", key=K.run_key("delete", r.name), type="primary"):
                delete_run(r.path)
                st.rerun()
        evals = list_evals(r.path)
        if evals:
            st.caption("Student evaluations")
            st.dataframe(pd.DataFrame([{
                "student": e["config"].get("student"), "labels": e["config"].get("label_mode"),
                "epochs": e["config"].get("epochs"), "final %": 100 * e["final_acc"],
                "best %": 100 * e["best_acc"], "file": e["_file"]} for e in evals]),
                hide_index=True)
        st.json(r.manifest, expanded=False)
