"""Smoke tests of the benchmark scripts at their ``--tiny`` settings (built-in shapes data)."""

from __future__ import annotations

import json

import pytest


def test_speed_tiny_writes_every_method(bench, tmp_path):
    out = tmp_path / "speed.json"
    assert bench("speed").main(["--tiny", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = doc["results"]
    assert [r["method"] for r in rows] == ["sre2l", "rded", "nrrdd", "edf"]
    for r in rows:
        assert "error" not in r, r
        assert r["seconds_per_step"] > 0 and r["floor_seconds"] > 0
        assert r["ratio"] == pytest.approx(r["seconds_per_step"] / r["floor_seconds"])
        assert r["steps_per_second"] == pytest.approx(1 / r["seconds_per_step"])
        assert len(r["step_seconds_all"]) == len(r["floor_seconds_all"]) == 3
        assert r["peak_rss_mb"] > 0
    assert {r["phase"] for r in rows} == {"recover", "select", "refine", "match"}
    assert doc["machine"]["device"] == "cpu"


def test_accuracy_tiny_writes_all_tables_and_resumes(bench, tmp_path, monkeypatch):
    acc = bench("accuracy")
    out = tmp_path / "acc.json"
    assert acc.main(["--tiny", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["status"] == "complete" and doc["budget"] == "tiny"
    assert 0 <= doc["teachers"]["convnet_bn"]["test_acc"] <= 1
    rows = doc["rows"]
    for ipc in (1, 2):  # the budget's IPC and its one-seed extra IPC
        comp = {(r["method"], r["protocol"]) for r in rows if r["table"] == "comparison" and r["ipc"] == ipc}
        assert comp == {("sre2l", "kd"), ("rded", "kd"), ("nrrdd", "kd"), ("edf", "kd"), ("edf", "edf"),
                        ("random", "kd")}
    edf2 = next(r for r in rows if r["table"] == "comparison" and r["ipc"] == 2 and r["method"] == "edf")
    assert edf2["method_budget"]["cpd_alpha"] == 0.5  # the per-IPC override
    for r in rows:
        assert r["n"] == len(r["accs"]) >= 1 and all(0 <= a <= 100 for a in r["accs"])
    labels = {r["label_mode"]: r for r in rows if r["table"] == "labels"}
    assert set(labels) == {"soft", "dbr", "hard"}
    assert labels["soft"]["label_bytes"] > labels["dbr"]["label_bytes"] > 0
    assert labels["soft"]["label_bytes"] == labels["soft"]["paper_bytes"]  # N x epochs x C fp16
    assert len([r for r in rows if r["table"] == "edf_grid"]) == 4
    assert {r["tau"] for r in rows if r["table"] == "nrrdd_tau"} == {0.1, 0.5}

    # a second run is served from the unit cache: nothing is distilled or evaluated again
    calls = []
    monkeypatch.setattr(acc, "evaluate_student", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(acc, "run_distiller", lambda *a, **k: calls.append(1))
    assert acc.main(["--tiny", "--out", str(out)]) == 0
    assert calls == [] and json.loads(out.read_text())["rows"] == rows

    # the report renders the document
    text = bench("report").accuracy_markdown(doc)
    assert "| sre2l |" in text and "alpha" in text


def test_edf_float_tiny_compares_the_float_tensor_with_the_png_images(bench, tmp_path):
    out = tmp_path / "edf_float.json"
    ef = bench("edf_float")
    assert ef.main(["--tiny", "--seeds", "0", "--lr-img", "1000", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    (row,) = doc["rows"]
    assert 0 < row["fraction_outside_01"] <= 1 and row["max_outside_01"] > 0  # PNGs lose these
    assert len(row["acc_float"]) == len(row["acc_png8"]) == 1
    assert row["float_minus_png8"] == pytest.approx(row["acc_float"][0] - row["acc_png8"][0])
    assert row["edf_config"]["dae_beta"] == 1.0 and "--tiny" in doc["command"]
    md = ef.markdown(doc)
    assert "| 1000 |" in md and f"{100 * row['fraction_outside_01']:.1f} %" in md
