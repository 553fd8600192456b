"""Refine live and Compare show NRR-DD's refinement diagnostics (METHODS.md §4.6), AppTest,
tiny settings (see tests/test_app.py)."""

from __future__ import annotations

import pytest

from test_app import app, poll, progress_text, tiny_teacher

WARNING = "TEST: refinement may be fooling the teacher"


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    return tiny_teacher(tmp_path_factory.mktemp("teacher") / "tiny.pt")


@pytest.fixture(autouse=True)
def _tiny(monkeypatch, tmp_path):
    monkeypatch.setenv("NRRDD_STUDIO_TINY", "1")
    monkeypatch.setenv("NRRDD_RUNS", str(tmp_path / "runs"))


@pytest.fixture
def always_warn(monkeypatch):
    """Every diagnostics summary warns (the worker runs in this process)."""
    import nrrdd_core.diagnostics as nd
    import studio.diagnostics as sd
    monkeypatch.setattr(nd, "fooling_warning", lambda s, thresholds=None: WARNING)
    monkeypatch.setattr(sd, "fooling_warning", lambda s, thresholds=None: WARNING)


def test_refine_live_shows_the_diagnostics(teacher_path, always_warn):
    at = app(teacher_path, "3_refine", classes=["circle", "square"])
    at.button(key="refine_start").click().run()
    poll(at, lambda a: progress_text(a).startswith(("done", "error")))
    assert progress_text(at).startswith("done"), [e.value for e in at.error]
    metrics = {m.label: m.value for m in at.metric}
    for label in ("Teacher agrees with label", "Independent model agrees",
                  "Mean / max pixel change", "Frozen pixels"):
        assert label in metrics, metrics
    assert metrics["Independent model agrees"].endswith("%")  # an independent model was trained
    assert metrics["Frozen pixels"].endswith("%")
    assert any(WARNING in w.value for w in at.warning)
    table = at.dataframe[0].value
    assert {"teacher p(y) before", "teacher p(y) after", "independent agrees after",
            "mean change /255", "frozen share"} <= set(table.columns)
    assert len(table) >= 2 and set(table["class"]) == {"circle", "square"}


def test_compare_shows_agreement_columns(teacher_path, always_warn):
    at = app(teacher_path, "4_compare", classes="circle")
    at.multiselect(key="compare_methods").set_value(["rded", "nrrdd"]).run()
    at.button(key="compare_start").click().run()
    poll(at, lambda a: progress_text(a).startswith(("done", "error", "stopped")), timeout=180)
    assert progress_text(at).startswith("done"), [e.value for e in at.error]
    table = at.dataframe[0].value
    for col in ("teacher agrees %", "independent agrees %", "mean change /255", "warning"):
        assert col in table.columns, list(table.columns)
    assert table["set"].tolist() == ["random real", "RDED", "NRR-DD"]
    assert ((table["teacher agrees %"] >= 0) & (table["teacher agrees %"] <= 100)).all()
    assert any("NRR-DD" in w.value and WARNING in w.value for w in at.warning)
