"""Refinement diagnostics in the app (METHODS.md §4.6): measured in the worker
(:func:`frame_diagnostics`, :func:`set_diagnostics`), drawn by the pages (:func:`show`,
:func:`table_columns`). The library does the measuring (:mod:`nrrdd_core.diagnostics`)."""

from __future__ import annotations

import threading

from nrrdd_core.data import DatasetBundle
from nrrdd_core.diagnostics import diagnose, fooling_warning, independent_model
from nrrdd_core.models.teacher import Teacher

_LOCK = threading.Lock()
_MODELS: dict = {}


def independent_for(bundle: DatasetBundle, device) -> Teacher | None:
    """The independent model of ``bundle`` (:func:`nrrdd_core.diagnostics.independent_model`,
    trained on first use and cached on disk; one per dataset in this process), or None when it
    cannot be trained (the diagnostics then go without it)."""
    key = (bundle.config.name, len(bundle.train), str(device))
    with _LOCK:
        if key not in _MODELS:
            try:
                _MODELS[key] = independent_model(bundle, device)
            except Exception:  # noqa: BLE001 - diagnostics are optional: run without them
                _MODELS[key] = None
        return _MODELS[key]


def frame_diagnostics(d, class_names: list[str]) -> dict | None:
    """``{"summary", "warning", "rows"}`` of a distiller that has ``diagnostics()`` (NRR-DD) once
    its refinement has started, else None. Call in the worker thread, between steps."""
    if not hasattr(d, "diagnostics") or getattr(d, "refiner", None) is None:
        return None
    diag = d.diagnostics()
    return {"summary": diag.summary(), "warning": diag.warning(), "rows": diag.rows(class_names),
            "independent": diag.has_independent}


def set_diagnostics(teacher: Teacher, x01, labels, independent: Teacher | None,
                    before01=None) -> dict:
    """The summary (+ ``warning``) of a finished set against its initial images ``before01``
    (the set itself when None: agreement only, no change)."""
    diag = diagnose(teacher, x01 if before01 is None else before01, x01, labels, independent)
    s = diag.summary()
    return {**s, "warning": fooling_warning(s)}


def _pct(v: float) -> str:
    return "–" if v != v else f"{100 * v:.0f} %"


def show(diag: dict | None) -> None:
    """Four metrics (teacher agreement, independent agreement, pixel change, frozen share), the
    warning when refinement looks adversarial, and the per-image table in an expander."""
    import pandas as pd
    import streamlit as st

    if not diag:
        return
    s = diag["summary"]
    st.markdown("**Is refinement adding class features or fooling the teacher?** "
                "(METHODS.md §4.6)")
    m = st.columns(4)
    m[0].metric("Teacher agrees with label", _pct(s["teacher_agree_after"]),
                f"{100 * (s['teacher_agree_after'] - s['teacher_agree_before']):+.0f} pts since x̃₀",
                help="Share of images whose teacher top-1 class is their label, now vs the initial "
                     "images x̃₀.")
    if diag.get("independent"):
        m[1].metric("Independent model agrees", _pct(s["independent_agree_after"]),
                    f"{100 * (s['independent_agree_after'] - s['independent_agree_before']):+.0f}"
                    " pts since x̃₀",
                    help="A second network trained on the same data that refinement never saw: "
                         "real class features move it too; an adversarial perturbation does not.")
    else:
        m[1].metric("Independent model agrees", "–", help="No independent model available.")
    m[2].metric("Mean / max pixel change", f"{255 * s['change_mean']:.1f} / "
                f"{255 * s['change_max']:.0f} /255")
    m[3].metric("Frozen pixels", _pct(s.get("frozen_share", float("nan"))),
                help="Share of pixels with update weight 0 (critical region, CAM ≥ tau).")
    if diag.get("warning"):
        st.warning(diag["warning"], icon=":material/warning:")
    with st.expander("Per-image diagnostics"):
        st.dataframe(pd.DataFrame(diag["rows"]), hide_index=True)


#: Compare table columns: label -> summary key (agreement shares in %).
TABLE_COLUMNS = {"teacher agrees %": "teacher_agree_after",
                 "independent agrees %": "independent_agree_after",
                 "mean change /255": "change_mean"}


def table_columns(res: dict) -> dict:
    """The diagnostics columns of one Compare row (empty without diagnostics)."""
    s = res.get("diagnostics")
    if not s:
        return {}
    out = {}
    for label, key in TABLE_COLUMNS.items():
        v = s.get(key, float("nan"))
        out[label] = 255 * v if key == "change_mean" else 100 * v
    out["warning"] = "⚠ may fool the teacher" if s.get("warning") else ""
    return out
