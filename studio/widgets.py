"""Widgets and renderers shared by the pages."""

from __future__ import annotations

import io
import math
from collections import Counter
from typing import Callable

import numpy as np
import plotly.graph_objects as go
import streamlit as st
import torch
from PIL import Image

from nrrdd_core.errors import NrrddError

from . import jobs
from . import keys as K
from .cache import Context, context

#: Display side of one image in grids, in pixels (small images are upscaled, nearest-neighbour).
TILE_PX = 96

#: Page CSS (``st.html``, added by ``app.py`` on every run): images are sent at their own size
#: and the browser upscales them nearest-neighbour, so a 32 px image stays sharp and cheap.
PIXELATED_CSS = "<style>[data-testid='stImage'] img {image-rendering: pixelated;}</style>"


def require_context(with_teacher: bool = True) -> Context:
    """The session's :class:`Context`, or an error box pointing at Setup and ``st.stop()``."""
    try:
        ctx = context(with_teacher)
    except (NrrddError, KeyError) as exc:
        st.error(f"The setup cannot be used: {exc}")
        st.page_link("app_pages/1_setup.py", label="Fix it on the Setup page",
                     icon=":material/tune:")
        st.stop()
    setup_caption(ctx)
    return ctx


def setup_caption(ctx: Context) -> None:
    """One line saying what the page works on."""
    names = ctx.class_names
    shown = ", ".join(names[:6]) + (f" … (+{len(names) - 6})" if len(names) > 6 else "")
    teacher = f"teacher {ctx.teacher.arch}" if ctx.teacher is not None else "no teacher"
    st.caption(f"**{ctx.bundle.config.name}** ({ctx.bundle.config.image_size} px) · classes: "
               f"{shown} · {teacher} · IPC {ctx.setup.ipc} · seed {ctx.setup.seed} · "
               f"device {ctx.device.type}")


def to_hwc(x01) -> np.ndarray:
    """Image ``(3,H,W)`` / ``(H,W,3)`` float [0,1] or uint8 -> uint8 ``(H,W,3)``."""
    a = x01.detach().cpu().numpy() if isinstance(x01, torch.Tensor) else np.asarray(x01)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(1, 2, 0)
    if a.dtype != np.uint8:
        a = (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return a


def png(img: np.ndarray) -> bytes:
    """A uint8 ``(H,W,3)`` image as PNG bytes (for grids redrawn often with the same images)."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _width(img: np.ndarray | bytes) -> int:
    return img.shape[1] if isinstance(img, np.ndarray) else Image.open(io.BytesIO(img)).size[0]


def heat(values: np.ndarray) -> np.ndarray:
    """A ``(H,W)`` array in [0,1] as a uint8 ``(H,W,3)`` grey-to-orange heat image."""
    v = np.clip(values, 0, 1)[..., None]
    lo, hi = np.array([20, 20, 35], float), np.array([255, 170, 40], float)
    return (lo + (hi - lo) * v).astype(np.uint8)


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


def mosaic(images: list[np.ndarray], cols: int, gap: int = 2, fill: int = 255) -> np.ndarray:
    """Tile uint8 ``(H,W,3)`` images of one size row-major, ``cols`` per row, ``gap`` pixels of
    ``fill`` between them: one ``(rows*(H+gap)-gap, cols*(W+gap)-gap, 3)`` uint8 image. A live
    view sends one picture per row kind instead of one per image (fewer files to fetch and lay
    out per frame)."""
    if not images:
        raise ValueError("mosaic needs at least one image")
    h, w, ch = images[0].shape
    cols = max(1, min(cols, len(images)))
    rows = -(-len(images) // cols)
    out = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, ch), fill, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        out[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = im
    return out


def mosaic_layout(labels: list[int], class_names: list[str], max_cols: int = 10) -> tuple[int, str]:
    """Columns of a :func:`mosaic` of images grouped by class (``labels`` in class order) and a
    caption naming where each class is: one row per class when a class has several images,
    else the classes left to right (wrapping every ``max_cols``)."""
    counts = Counter(labels)  # in first-seen (class) order
    per = max(counts.values(), default=1)
    names = ", ".join(class_names[c] for c in counts)
    if per > 1 and all(n == per for n in counts.values()):
        return per, f"one row per class, top to bottom: {names}"
    cols = min(len(labels), max_cols)
    if per > 1:
        return cols, f"grouped by class, in this order: {names}"
    where = "left to right" + (", then the next row" if len(labels) > cols else "")
    return cols, f"classes {where}: {names}"


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


def config_knobs(method: str, fields: list[dict], overrides: dict | None = None,
                 disabled: bool = False, columns: int = 3) -> dict:
    """Widgets generated from ``Config.describe()`` rows (fields with ``ui=False`` are left at
    their default). Values persist for the session; ``overrides`` replace the published defaults for
    fields the user has not touched yet (tiny mode, a reopened run). Returns ``{name: value}``."""
    overrides = overrides or {}
    shown = [f for f in fields if f.get("ui", True)]
    cols = st.columns(columns)
    values = {}
    for i, f in enumerate(shown):
        key = K.knob(method, f["name"])
        default = overrides.get(f["name"], f["default"])
        if key not in st.session_state:
            st.session_state[key] = default
        unit = f" [{f['unit']}]" if f.get("unit") and f["unit"] != "1" else ""
        help_ = f"{f.get('doc') or ''} · default {f['default']!r}" + (
            f" ({f['source']})" if f.get("source") else "")
        label = f"{f['name']}{unit}"
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


def live(job_id: str | None, render: Callable[[jobs.Job | None], None],
         interval: float = 0.3) -> None:
    """Draw ``render(job)`` in a fragment that re-runs every ``interval`` s while the job is
    active, then triggers one full rerun when it ends (so the rest of the page catches up)."""
    job = jobs.get(job_id)
    was_active = job is not None and job.active

    @st.fragment(run_every=interval if was_active else None)
    def _poll() -> None:
        j = jobs.get(job_id)
        render(j)
        if was_active and j is not None and not j.active:
            st.rerun()

    _poll()


def job_status(view: dict, unit: str = "steps") -> None:
    """Progress bar and status line of a job view (from :meth:`Job.view`)."""
    total = max(1, view["total"])
    st.progress(min(1.0, view["step"] / total),
                text=f"{view['status']} · {view['step']}/{view['total']} {unit} · "
                     f"{view['elapsed']:.1f} s"
                     + (f" · {view['message']}" if view["message"] else ""))
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
