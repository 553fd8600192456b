"""Grad-CAM explorer: where does the teacher look, and what would NRR-DD freeze?

The controls and the CAM grid draw from :mod:`studio.explorer` (NumPy arrays, stored on disk),
so a stored view appears without importing torch; the complexity and CIDD tabs load the teacher.
"""

import numpy as np
import streamlit as st

from nrrdd_core.display import COLORMAPS, draw_boxes, noncritical_share, overlay
from nrrdd_core.errors import NrrddError
from studio import explorer, jobs, settings, setup, warm, widgets
from studio import keys as K

METHOD_LABELS, FILTERS = explorer.METHOD_LABELS, explorer.FILTERS
CAM_METHODS = tuple(METHOD_LABELS)
PERSIST = {"persist_state": "session"}


def colourbar(cmap: str) -> np.ndarray:
    """A 12 x 256 px strip of the colour map from CAM 0 (left) to 1 (right)."""
    ramp = np.tile(np.linspace(0, 1, 256, dtype=np.float32), (12, 1))
    return overlay(np.zeros((12, 256, 3), np.float32), ramp, 1.0, cmap)


st.title("Grad-CAM explorer")
caption = st.empty()  # what the page works on, once the controls are known
s = setup.current()
refine_job = jobs.get(st.session_state.get(K.REFINE_JOB))
refine_running = refine_job is not None and refine_job.active
st.write("Each image shows the teacher's CAM for its true class (left) and, for the threshold "
         "tau, the **critical** region that NRR-DD keeps frozen in its own colours and the "
         "**non-critical** rest that it refines, tinted blue (right).")

# ---- controls -------------------------------------------------------------------------------


URL_KEYS = (K.CAM_METHOD, K.CAM_LAYER, K.CAM_CMAP)  # in the URL: a link reopens the same view
for key in URL_KEYS:
    if key in st.query_params and st.session_state.get(K.CAM_URL_READ) is None:
        st.session_state[key] = st.query_params[key]
st.session_state[K.CAM_URL_READ] = True
URL = PERSIST
c = st.columns([2, 1, 1, 1, 1])
if st.session_state.get(K.CAM_METHOD) not in CAM_METHODS:
    st.session_state[K.CAM_METHOD] = CAM_METHODS[0]
method = c[0].selectbox("CAM method", CAM_METHODS, key=K.CAM_METHOD,
                        format_func=lambda m: METHOD_LABELS.get(m, m), **URL)
try:
    ctl = explorer.controls(s.data_key, s.teacher_key, s.classes, method)
except (NrrddError, KeyError) as exc:
    widgets.setup_error(exc)
names = ctl.class_names
caption.caption(widgets.setup_text(ctl.dataset, ctl.image_size, [names[c] for c in ctl.classes],
                                   ctl.teacher, s.ipc, s.seed, ctl.device))
layers = ctl.layers
if st.session_state.get(K.CAM_LAYER) not in layers:
    old = st.session_state.get(K.CAM_LAYER)
    st.session_state[K.CAM_LAYER] = ctl.teacher_layer if ctl.teacher_layer in layers \
        else layers[-1]
    if old:
        st.toast(f"Layer {old} does not work with {METHOD_LABELS.get(method, method)}: "
                 f"showing {st.session_state[K.CAM_LAYER]}.")
layer = c[1].selectbox("Layer", layers, key=K.CAM_LAYER, help="Only the layers this CAM method "
                       "can use are offered.", **URL)
if st.session_state.get(K.CAM_CMAP) not in COLORMAPS:
    st.session_state[K.CAM_CMAP] = next(iter(COLORMAPS))
cmap = c[2].selectbox("Colour map", list(COLORMAPS), key=K.CAM_CMAP, **URL)
for key, value in zip(URL_KEYS, (method, layer, cmap)):
    st.query_params[key] = value
alpha = c[3].slider("Overlay opacity", 0.0, 1.0, 0.5, 0.05, key=K.CAM_ALPHA, **PERSIST)
c[4].slider("Image size [px]", 64, 256, widgets.TILE_PX, 32, key=K.TILE_PX,
            help="Side of one image on screen.", **PERSIST)
tile = int(st.session_state.get(K.TILE_PX, widgets.TILE_PX))
st.image(colourbar(cmap), width=320, output_format="PNG",
         caption="CAM colour scale: 0 (left, ignored) → 1 (right, most important for the class); "
                 "each map is min-max normalised per image.")
c = st.columns(3)
per_class = c[0].slider("Images per class", 1, 12, 4, key=K.PER_CLASS, **PERSIST)
topk = c[1].slider("Top-k predictions", 1, 5, 3, key=K.TOPK, **PERSIST)
which = c[2].radio("Show", list(FILTERS), key=K.FILTER, format_func=FILTERS.get,
                   horizontal=True, **PERSIST)

if method == "scorecam" and not st.checkbox("Compute Score-CAM anyway (slow)", key=K.SCORECAM_OK):
    st.info("Score-CAM needs one forward pass per channel and image: tick the box to run it.")
    st.stop()

# ---- data: the shown images, their predictions and CAMs (cached, stored on disk) -------------
sample_n = 8 if settings.tiny() else 32  # images per class for the complexity histogram
classes = tuple(ctl.classes)


def grid_data(method: str, layer: str) -> explorer.GridData:
    return explorer.grid_data(s.data_key, s.teacher_key, classes, method, layer, per_class, which,
                              sample_n)


try:
    data = grid_data(method, layer)
    st.session_state[K.CAM_LAST_GOOD] = (method, layer)
except Exception as exc:  # noqa: BLE001 - the view stays: the last working method and layer
    good = st.session_state.get(K.CAM_LAST_GOOD) or ("cam", ctl.teacher_layer)
    st.error(f"{METHOD_LABELS.get(method, method)} failed on layer {layer}: {exc}. Showing "
             f"{METHOD_LABELS.get(good[0], good[0])} on layer {good[1]} instead.")
    method, layer = good
    data = grid_data(method, layer)
if len(data.idx) == 0:
    st.info(f"No {FILTERS[which]} images among the first {data.pool_n} of each chosen class.")
    st.stop()
idx, labels, probs, cams, images = data.idx, data.labels, data.probs, data.cams, data.images
correct = probs.argmax(1) == labels
overlays = [overlay(images[i] / np.float32(255), cams[i], alpha, cmap) for i in range(len(idx))]
gap = np.full((images[0].shape[0], 1, 3), 255, np.uint8)
top = np.argsort(-probs, 1)[:, :topk]
predicted = [" · ".join(f"{names[t]} {100 * probs[i, t]:.0f}%" for t in top[i])
             for i in range(len(idx))]


@st.fragment
def grid() -> None:
    """tau slider, metrics and the grid: a tau change re-thresholds the cached maps here only."""
    warm.touch()  # the background imports wait while the user moves tau (studio.warm)
    tau = st.slider("tau: CAM threshold of the critical region", 0.0, 1.0, 0.5, 0.05, key=K.TAU,
                    bind="query-params", help="Pixels with CAM >= tau are critical (frozen by "
                    "NRR-DD); the rest is non-critical and refined (METHODS.md §4.3, paper default "
                    "0.5). Refine live starts NRR-DD with the tau chosen here.")
    if not refine_running:
        st.session_state[K.knob("nrrdd", "tau")] = float(tau)  # carried over to Refine live
    noncrit = noncritical_share(cams, tau)
    m = st.columns(3)
    m[0].metric("Non-critical share", f"{100 * noncrit.mean():.0f} %", help="Share of pixels "
                "with CAM < tau over the images shown: what NRR-DD may change.")
    m[1].metric("Teacher accuracy on these images", f"{100 * correct.mean():.0f} %")
    m[2].metric("Images", f"{len(idx)}")
    for cl in classes:  # one row per class
        rows = np.flatnonzero(labels == cl).tolist()
        cols = st.columns([1, 7], vertical_alignment="center")
        share = f"{100 * noncrit[rows].mean():.0f} % non-critical" if rows else "none shown"
        cols[0].markdown(f"**{names[cl]}**  \n{share}")
        tiles = [np.concatenate([overlays[i], gap, widgets.critical_view(images[i], cams[i], tau)],
                                1) for i in rows]
        caps = [f"{'✓' if top[i][0] == cl else '✗'} {predicted[i]} | "
                f"{100 * noncrit[i]:.0f}% non-crit." for i in rows]
        with cols[1]:
            if tiles:
                widgets.image_grid(tiles, caps, px=2 * tile)
            else:
                st.caption(f"no {FILTERS[which]} images")


# ---- per-class complexity -------------------------------------------------------------------


def complexity() -> None:
    """Histogram of the Comp-DD complexity of the first ``sample_n`` images of each class."""
    import pandas as pd
    import plotly.express as px
    import torch

    from nrrdd_core.cam import complexity_score
    from studio import cache

    ctx = widgets.require_context(caption=False)

    st.caption("Comp-DD complexity of an image: 1 − share of pixels with CAM ≥ 0.5 (METHODS.md "
               f"§7); a class's score is the mean over its images (first {sample_n} per class).")
    sample = cache.pool_indices(s.data_key, classes, sample_n)
    sample_cams = cache.cam_maps(s.teacher_key, method, layer, tuple(sample.tolist()),
                                 ctx.teacher, ctx.bundle)
    score = complexity_score(torch.from_numpy(sample_cams)).numpy()
    df = pd.DataFrame({"complexity": score,
                       "class": [names[y] for y in ctx.bundle.train.y[sample].tolist()]})
    fig = px.histogram(df, x="complexity", color="class", barmode="overlay", nbins=20,
                       opacity=0.6, range_x=[0, 1], height=320,
                       color_discrete_sequence=px.colors.qualitative.Dark24)  # one per class
    means = df.groupby("class", sort=False)["complexity"].mean()
    fig.update_layout(margin=dict(l=10, r=10, t=10, b=10), legend_title_text="class (mean)")
    fig.for_each_trace(lambda t: t.update(name=f"{t.name} ({means[t.name]:.2f})"))
    st.plotly_chart(fig, key=K.COMPLEXITY_CHART)


# ---- CIDD candidates of one image -----------------------------------------------------------
@st.fragment
def cidd() -> None:
    """CIDD candidates of one image (its own widgets re-run only this part)."""
    import torch

    from nrrdd_core.methods import get_method
    from nrrdd_core.methods.common import cidd_candidates
    from studio import cache

    ctx = widgets.require_context(caption=False)
    cfg_fields = {f["name"]: f["default"] for f in get_method("nrrdd").Config.describe()}
    c = st.columns([2, 1, 1])
    pick = c[0].selectbox("Image", range(len(idx)), key=K.CIDD_IMAGE,
                          format_func=lambda i: f"{names[labels[i]]} · image #{idx[i]}")
    m_crops = c[1].slider("Candidates m", 2, 12, int(cfg_fields.get("num_crops", 5)),
                          key=K.CIDD_CANDIDATES)
    top_t = c[2].slider("Kept by CAM ratio (t)", 1, m_crops, min(m_crops, int(cfg_fields.get(
        "top_t", 1))), key=K.CIDD_TOP_T)
    label = int(labels[pick])
    x01 = ctx.bundle.train.float01([int(idx[pick])])[0]
    with cache.TEACHER_LOCK:
        cand = cidd_candidates(ctx.teacher, x01, torch.from_numpy(cams[pick]), label, m_crops,
                               top_t, seed=s.seed,
                               min_scale=float(cfg_fields.get("min_scale", 0.08)))
    # float32 scores of exactly 0 nats (confidence 1.0) tie: METHODS.md §3, "Ties"
    n_tied = int((cand.confidence == 1.0).sum())
    tiles, caps = [], []
    for r in range(m_crops):
        kept = [sel for sel, pos in (("lowest", cand.lowest), ("highest", cand.highest))
                if pos == r]
        tags = (["in top t"] if cand.kept[r] else []) + (
            [f"KEPT by {' & '.join(kept)}"] if kept else [])
        tiles.append(widgets.to_hwc(cand.crops01[r]))
        tied = " (tied)" if cand.confidence[r] == 1.0 and n_tied > 1 else ""
        caps.append(f"ratio {cand.ratio[r]:.2f} · conf {cand.confidence[r]:.2f}{tied}"
                    + (f" · {', '.join(tags)}" if tags else ""))
    boxed = draw_boxes(widgets.to_hwc(x01), cand.boxes[cand.kept])
    c = st.columns([1, 5])
    with c[0]:
        widgets.image_grid([overlay(x01, cams[pick], alpha, cmap), boxed],
                           ["CAM", "boxes kept by CAM ratio"])
    with c[1]:
        widgets.image_grid(tiles, caps)
    if n_tied > 1:
        st.caption(f"{n_tied} of {m_crops} candidates score exactly 0 nats in float32 (teacher "
                   "confidence 1.0): their order is a tie. RDED breaks ties by the teacher's "
                   "logit margin (tie_break) or scores in float64 (score_precision); a run's "
                   "step records count the ties (METHODS.md §3).")
    st.caption("Candidates are RandomResizedCrop boxes (RDED's sampler), sorted by CAM ratio "
               "(share of the CAM inside the box). CIDD scores the top t by the teacher's "
               "confidence and keeps the LOWEST-confidence (hardest) patches; the paper's "
               "appendix C compares keeping the highest.")


# ---- tabs: only the open one is computed (on_change="rerun"), so a first visit and every control
# change pay for the CAM grid alone, not for 320 more CAMs, pandas and plotly
TABS = ("CAM grid", "Class complexity", "CIDD candidate crops")
tab_grid, tab_complexity, tab_cidd = st.tabs(TABS, key=K.EXPLORER_TAB, on_change="rerun")
with tab_grid:
    grid()
with tab_complexity:
    if tab_complexity.open:
        complexity()
with tab_cidd:
    if tab_cidd.open:
        st.caption("The crops NRR-DD's first phase (CIDD) chooses between, for one of the images "
                   "of the grid.")
        cidd()
