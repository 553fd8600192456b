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
runs = list_runs(root, damaged=True)
st.write(f"Distilled sets saved under `{root}` (set `NRRDD_RUNS` to use another folder).")
if not runs:
    st.info("No saved runs yet: save one on **Refine live** or **Compare**.")
    st.page_link("app_pages/3_refine.py", label="Go to Refine live",
                 icon=":material/auto_fix_high:")
    st.stop()


def summary(mf: dict) -> dict:
    ds = mf.get("dataset") or {}
    return {"method": mf.get("method"), "dataset": ds.get("name"),
            "classes": len(ds.get("classes") or []),
            "IPC": mf.get("ipc"), "images": mf.get("num_images"), "seed": mf.get("seed"),
            "complete": mf.get("complete", True),
            "seconds": (mf.get("timings") or {}).get("seconds"),
            "created": mf.get("created")}


def delete_button(r) -> None:
    with st.popover("Delete", icon=":material/delete:"):
        st.write(f"Delete `{r.path}` and everything in it?")
        if st.button("Yes, delete", key=K.run_key("delete", r.name), type="primary"):
            try:
                delete_run(r.path, root)
            except (NrrddError, OSError) as exc:
                st.error(f"Cannot delete this run: {exc}")
            else:
                st.rerun()


st.dataframe(pd.DataFrame([{"run": r.name, **summary(r.manifest),
                            "problem": r.error or ""} for r in runs]),
             hide_index=True,
             column_config={"seconds": st.column_config.NumberColumn(format="%.1f")})

for i, r in enumerate(runs):
    if r.error:  # damaged: say why, offer only Delete
        with st.expander(f"**{r.name}** · damaged", expanded=i == 0):
            st.error(f"Cannot read this run: {r.error}")
            delete_button(r)
        continue
    with st.expander(f"**{r.name}** · {r.manifest.get('method')} · "
                     f"{r.manifest.get('num_images')} images", expanded=i == 0):
        try:
            run = load_run(r.path, root)
        except NrrddError as exc:
            st.error(f"Cannot read this run: {exc}")
            delete_button(r)
            continue
        if r.manifest.get("complete") is False:
            st.warning(f"Stopped before the end: {r.manifest.get('stopped', 'interrupted')}")
        all_names = (r.manifest.get("dataset") or {}).get("all_class_names") or []
        names = {c: all_names[c] if 0 <= c < len(all_names) else f"class {c}"
                 for c in set(run.labels.tolist())}
        classes = sorted(set(run.labels.tolist()))
        widgets.class_rows(run.images01, run.labels, classes, [names[c] for c in classes], px=48)
        b = st.container(horizontal=True)
        b.download_button("Download zip", data=lambda p=r.path: zip_run(p, root),
                             file_name=f"{r.name}.zip", mime="application/zip",
                             key=K.run_key("zip", r.name), icon=":material/download:")
        if b.button("Open in Refine", key=K.run_key("refine", r.name),
                       icon=":material/auto_fix_high:"):
            st.session_state[K.OPEN_RUN] = str(r.path)
            st.switch_page("app_pages/3_refine.py")
        if b.button("Evaluate", key=K.run_key("eval", r.name), icon=":material/school:"):
            st.session_state[K.EVAL_RUNS] = [r.name]
            st.switch_page("app_pages/5_evaluate.py")
        with b:
            delete_button(r)
        evals = list_evals(r.path)
        if evals:
            st.caption("Student evaluations")
            st.dataframe(pd.DataFrame([{
                "student": e["config"].get("student"), "labels": e["config"].get("label_mode"),
                "epochs": e["config"].get("epochs"),
                "final %": 100 * e.get("final_acc", float("nan")),
                "best %": 100 * e.get("best_acc", float("nan")),
                "tested on": ", ".join(e.get("test_classes") or []), "file": e["_file"]}
                for e in evals]),
                hide_index=True)
        st.json(r.manifest, expanded=False)
