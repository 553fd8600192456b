"""nrrdd_core.compare: one comparison policy for the app and the bench."""

from __future__ import annotations

import torch

from nrrdd_core.compare import RANDOM, DistilledSet, compare_methods
from nrrdd_core.evaluate import EvalConfig

from test_methods import _bundle, _teacher

EVAL = EvalConfig(student="convnet_bn", student_width=8, student_depth=2, epochs=1)


def test_every_set_gets_the_same_evaluation_and_the_own_protocol():
    bundle = _bundle()
    teacher = _teacher(bundle)
    calls, seen = [], []

    def fake_distill(method, config):
        calls.append((method, config))
        x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(len(calls)))
        extras = {"label_logits": torch.randn(4, 3), "syn_lr": 0.01,
                  "arch_kwargs": {"depth": 1, "width": 4}} if method == "edf" else {}
        return DistilledSet(x, torch.tensor([0, 0, 2, 2]), 1.5, 7, extras)

    res = compare_methods(["rded", "edf"], teacher, bundle, [0, 2], ipc=2, seed=0, eval_cfg=EVAL,
                          device="cpu", configs={"rded": {"factor": 2}}, distill=fake_distill,
                          on_result=lambda r: seen.append(r.name))
    assert list(res) == [RANDOM, "rded", "edf"] == seen
    assert calls == [("rded", {"factor": 2}), ("edf", {})]
    assert [sorted(r.evals) for r in res.values()] == [["kd"], ["kd"], ["edf", "kd"]]
    assert res[RANDOM].distilled.images01.shape == (4, 3, 16, 16)
    assert res[RANDOM].distilled.labels.tolist() == [0, 0, 2, 2]
    for r in res.values():
        assert r.evals["kd"].config["epochs"] == 1 and r.evals["kd"].n_test == 8
    assert res["edf"].evals["edf"].config["soft_labels"]           # the run's learned labels
    assert res["edf"].evals["edf"].config["arch_kwargs"] == {"depth": 1, "width": 4}
    # own_protocol=False: one protocol for all; a cached result is reused; a stop ends it
    done = []
    res2 = compare_methods(["rded", "edf"], teacher, bundle, [0, 2], ipc=2, seed=0, eval_cfg=EVAL,
                           device="cpu", own_protocol=False, distill=fake_distill,
                           cached=lambda n: res[n] if n == "rded" else None,
                           on_result=lambda r: done.append(r.name),
                           should_stop=lambda: "rded" in done)
    assert list(res2) == [RANDOM, "rded"] and res2["rded"].reused and len(calls) == 2
    res3 = compare_methods(["edf"], teacher, bundle, [0, 2], ipc=2, seed=0, eval_cfg=EVAL,
                           device="cpu", own_protocol=False, distill=fake_distill)
    assert sorted(res3["edf"].evals) == ["kd"]


def test_default_distillation_runs_the_method():
    bundle = _bundle()
    teacher = _teacher(bundle)
    res = compare_methods(["rded"], teacher, bundle, [1], ipc=1, seed=3, eval_cfg=EVAL,
                          device="cpu", configs={"rded": {"num_crops": 2, "mipc": 4}})
    d = res["rded"].distilled
    assert d.images01.shape == (1, 3, 16, 16) and d.labels.tolist() == [1] and d.steps >= 1
    assert d.info["config"]["num_crops"] == 2 and d.seconds > 0
    assert 0.0 <= res["rded"].evals["kd"].final_acc <= 1.0
