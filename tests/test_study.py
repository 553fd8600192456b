"""The like-with-like accuracy study (bench/study.py via ``bench/accuracy.py --study``) at its
tiny setting, and its report."""

from __future__ import annotations

import json


def test_study_tiny_rows_seeds_diagnostics_and_report(bench, tmp_path, monkeypatch):
    acc, study, report = bench("accuracy"), bench("study"), bench("report")
    out = tmp_path / "res"
    assert acc.main(["--study", "tiny", "--out", str(out)]) == 0
    path = study.out_path("tiny", "shapes", out)
    doc = json.loads(path.read_text())
    budget = study.STUDIES["tiny"]
    assert doc["status"] == "complete" and doc["student"] == "convnet_bn"
    assert doc["eval"]["randaugment"] is True and doc["eval"]["student"] == "convnet_bn"
    names = [r["variant"] for r in doc["rows"]]
    assert sorted(names) == sorted(v.name for v in budget.settings[0].variants)
    for r in doc["rows"]:
        assert r["n"] == len(budget.student_seeds) == len(r["accs"])
    rows = {r["variant"]: r for r in doc["rows"]}
    # CIDD alone stops after the selection; CIDD + NRR refines for its iterations after it
    cidd, nrr = rows["CIDD (max_prob)"], rows["CIDD + NRR 2 (max_prob)"]
    assert nrr["steps"] == cidd["steps"] + 2
    assert rows["CIDD + NRR 2 + label refinement (true_class)"]["overrides"]["label_refine_weight"] > 0

    # a second run is served from the cache
    calls = []
    monkeypatch.setattr(study, "evaluate_student", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(study, "make_distiller", lambda *a, **k: calls.append(1))
    assert acc.main(["--study", "tiny", "--out", str(out)]) == 0
    assert calls == []
    monkeypatch.undo()

    # diagnostics: the NRR set is compared with the CIDD set of the same confidence reading
    assert acc.main(["--study", "tiny", "--diagnostics", "--out", str(out)]) == 0
    doc = next(d for d in study.load_docs(out) if d["setting"] == "shapes")
    diag = doc["diagnostics"]
    assert diag["CIDD + NRR 2 (max_prob)"]["before"] == "CIDD" and diag["RDED"]["before"] == "itself"
    assert diag["RDED"]["change_mean"] == 0
    assert 0 <= diag["CIDD + NRR 2 (max_prob)"]["independent_agree_after"] <= 1
    assert 0 <= doc["independent"]["test_acc"] <= 1
    text = report.study_markdown([doc])
    assert "| CIDD + NRR 2 (max_prob) |" in text and "independent agrees %" in text


def test_a_setting_can_give_its_students_more_epochs(bench, tmp_path):
    import dataclasses

    study = bench("study")
    budget = study.STUDIES["tiny"]
    base = budget.settings[0]
    for setting, want in ((base, budget.eval_epochs), (dataclasses.replace(base, eval_epochs=7), 7)):
        s = study.Study(budget, setting, "cpu", tmp_path / f"{want}.json", [])
        assert s.eval_config().epochs == want and s.doc["eval"]["epochs"] == want
        assert s.eval_config().eval_every == want  # tested after the last epoch only
